"""What learners read speaks of QLoRA and this code only: no talk of how the project was made (issue numbers, who
did what, work sessions, which machines were or were not available, commit hashes, paths of the machine it was
made on) in the notebooks (sources and stored outputs), the README and the recorded results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each pattern names one kind of project meta; the message says what to write instead.
PATTERNS = [
    (r"\bissues?[ -]?#?\d+\b", "an issue number of this project"),
    (r"(?<![\w/.\"'-])#\d{1,5}\b(?!\s*(?:of|in)\b)", "an issue or pull-request number (cite others as owner/repo#N)"),
    (r"\b(?:the|a|an|another|each|every|one|by)\s+(?:[\w-]+\s+)?helpers?\b(?!\s+(?:function|module|class|script))",
     "who did the work"),
    (r"\bthe lead\b", "who did the work"),
    (r"\bsessions?\b", "a work session"),
    (r"\bwithh[eo]ld\b|\bmachines?\s+(?:were|was)\s+(?:not\s+)?(?:lent|available)\b|\blent\b", "which machines were lent"),
    (r"\bour facts file\b|\bfacts file\b|\.helpers\b|/work/|\bcoord\b|\bCOMMON\.md\b|\bSTATUS\.md\b",
     "a file outside the repository"),
    (r"\bcommit\s+[0-9a-f]{7,40}\b", "a commit hash"),
]
# A bare hexadecimal token that looks like a commit hash, unless it is labelled as a checksum.
HEX = re.compile(r"(?<![\w.])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![\w.])")
CHECKSUM = re.compile(r"sha-?256|fingerprint|hash|digest|0x", re.I)


def _texts() -> list[tuple[str, str]]:
    """(where, text) for every README paragraph, results file and notebook cell source or text output."""
    out = [("README.md", (ROOT / "README.md").read_text())]
    for f in sorted((ROOT / "results").rglob("*")):
        if f.is_file() and f.suffix in (".md", ".csv", ".txt", ".json", ".jsonl"):
            out.append((str(f.relative_to(ROOT)), f.read_text(errors="replace")))
    for nb in sorted((ROOT / "notebooks").glob("**/*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            where = f"{nb.relative_to(ROOT)} cell {i}"
            out.append((where, "".join(cell["source"])))
            for o in cell.get("outputs", []):
                text = o.get("text") or o.get("data", {}).get("text/plain") or ""
                out.append((f"{where} output", "".join(text)))
    return out


def find_meta(text: str) -> list[str]:
    """Every piece of project meta in `text`, as 'kind: ...context...'."""
    hits = []
    for pattern, kind in PATTERNS:
        for m in re.finditer(pattern, text, re.IGNORECASE):
            hits.append(f"{kind}: ...{text[max(0, m.start() - 40):m.end() + 20]}...".replace("\n", " "))
    for m in HEX.finditer(text):
        if not CHECKSUM.search(text[max(0, m.start() - 40):m.start()]):
            hits.append(f"a commit hash: ...{text[max(0, m.start() - 40):m.end() + 20]}...".replace("\n", " "))
    return hits


TEXTS = _texts()
FILES = sorted({w.split(" cell ")[0] for w, _ in TEXTS})


@pytest.mark.parametrize("name", FILES)
def test_no_project_meta(name):
    hits = [f"{where}: {h}" for where, text in TEXTS if where.split(" cell ")[0] == name for h in find_meta(text)]
    assert not hits, "project meta in what learners read:\n" + "\n".join(hits)


@pytest.mark.parametrize("text", [
    "Recorded by the issue-5 helper on the shared CPU", "see issue 8", "fixed in #12", "data of commit 9737c79",
    "the model of 972b856 was replaced", "this session ran it", "the two-GPU machines were withheld",
    "a note in our facts file", "/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py", "the lead re-ran it",
])
def test_the_scanner_finds_each_kind(text):
    assert find_meta(text), text


@pytest.mark.parametrize("text", [
    "artidoro/qlora#94 points this out", "fingerprint 7a5323f70d37ea6d", "adapter sha256 010a0e2781a16a15...",
    "a test helper function", "on a few shared helpers", "blocks of 64; 1,048,576 values", "0.0052083",
    "lora_dropout 0.05 for 7B", "the event in the story",
])
def test_the_scanner_leaves_facts_alone(text):
    assert not find_meta(text), find_meta(text)
