"""Write the embedded instruction data sets: data/stories/*.jsonl and data/qa/*.jsonl (seeded, reproducible).

    python scripts/build_data.py            # writes into data/ (or --out DIR)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlora_tutor import storyworld
from qlora_tutor.paths import REPO_ROOT, atomic_write_text


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write JSON Lines atomically (readers never see half a file)."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data", help="folder to write stories/ and qa/ into")
    args = parser.parse_args()
    for skill in ("stories", "qa"):
        for split, rows in storyworld.make_splits(skill).items():
            path = args.out / skill / f"{split}.jsonl"
            write_jsonl(path, rows)
            print(f"{path}: {len(rows)} examples, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
