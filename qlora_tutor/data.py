"""Instruction data: load it, put it in the one prompt template, tokenize it with the prompt masked, pad it.

The same functions serve the embedded data sets in ``data/`` (offline) and hub data sets in the two formats
learners meet most: Alpaca (``instruction``/``input``/``output``) and Guanaco/OpenAssistant text
(``### Human: ... ### Assistant: ...``). Only the response is learned: prompt tokens get the label -100.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from . import paths

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
FIELDS = ("instruction", "input", "output")
EMBEDDED_DATASETS = ("stories", "qa")
SPLITS = ("train", "validation", "test")


def resolve_dataset(name: str | Path, data_root: str | os.PathLike | None = None) -> Path | str:
    """Where a data set lives: an embedded name ('stories', 'qa', read from `data_root` or data/) or an existing
    path gives a Path; anything else is returned unchanged and treated as a hub id."""
    if isinstance(name, Path):
        return name
    if name in EMBEDDED_DATASETS:
        return paths.data_dir(data_root) / name
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    if paths.looks_like_local_path(name):
        raise paths.no_such_path(name, "data set")
    return name


# ----------------------------------------------------------------------------------------------- the template
def format_prompt(instruction: str, input: str = "") -> str:
    """THE prompt template, used for training, evaluation and generation alike (Alpaca's layout).

    The response follows directly after the returned text; the ``### Input:`` block appears only when
    there is an input.
    """
    if not isinstance(instruction, str) or not isinstance(input, str):
        raise TypeError("format_prompt needs strings: format_prompt(instruction: str, input: str = '')")
    prompt = f"### Instruction:\n{instruction.strip()}\n\n"
    if input.strip():
        prompt += f"### Input:\n{input.strip()}\n\n"
    return prompt + "### Response:\n"


# ------------------------------------------------------------------------------------------------- loading
_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def _guanaco_to_example(text: str, where: str) -> dict[str, str]:
    """First '### Human:' turn → instruction, the reply after it → output (later turns are dropped)."""
    parts = _GUANACO_TURN.split(text)
    # parts = [before, role, content, role, content, ...]
    turns = [(parts[i].lower(), parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if len(turns) < 2 or turns[0][0] != "human" or turns[1][0] != "assistant":
        raise ValueError(
            f"{where}: field 'text' is not in the Guanaco format: it needs '### Human: <question>' "
            "followed by '### Assistant: <answer>'."
        )
    return {"instruction": turns[0][1], "input": "", "output": turns[1][1]}


def _normalize(row: Any, where: str) -> dict[str, Any]:
    """One raw row (Alpaca or Guanaco layout) → {'instruction', 'input', 'output', ...}; errors say where."""
    if not isinstance(row, dict):
        raise TypeError(f"{where}: each example must be a JSON object, not {type(row).__name__}")
    if "instruction" not in row and "output" not in row and "text" in row:
        if not isinstance(row["text"], str):
            raise TypeError(f"{where}: field 'text' must be a string, not {type(row['text']).__name__}")
        example = _guanaco_to_example(row["text"], where)
    else:
        example = dict(row)
        example.setdefault("input", "")
        if example["input"] is None:
            example["input"] = ""
    for field in FIELDS:
        if field not in example:
            raise ValueError(
                f"{where}: field '{field}' is missing. Each example needs 'instruction' and 'output' "
                "(and optionally 'input'), or a Guanaco-style 'text' field."
            )
        if not isinstance(example[field], str):
            raise TypeError(
                f"{where}: field '{field}' must be a string, not {type(example[field]).__name__} "
                f"({example[field]!r:.60})"
            )
    if not example["output"].strip():
        raise ValueError(f"{where}: field 'output' is empty; there would be nothing to learn.")
    if not example["instruction"].strip():
        raise ValueError(f"{where}: field 'instruction' is empty; the model would learn an answer to nothing. "
                         "Fill it in or drop the example.")
    example["_where"] = where
    return example


def _utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Bytes of `path` (starting at line `first_line`) as UTF-8 text, or an error that names the file, the line,
    the column and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[:e.start].count(b"\n")
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}). "
                         "Save the file as UTF-8.") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            line = _utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}).") from None
            rows.append(_normalize(row, where))
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = _utf8(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}).") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data set must be a list of objects (or use JSON Lines, .jsonl).")
    return [_normalize(row, f"{path}, item {i}") for i, row in enumerate(data)]


def _read_with_datasets(source: str | Path, split: str) -> list[dict[str, Any]]:
    """A local folder laid out like a hub data set, or a hub id, through `datasets.load_dataset`."""
    import datasets

    if isinstance(source, Path) and not _data_files(source):
        held = sorted(p.name for p in source.iterdir())[:5]
        raise FileNotFoundError(
            f"data folder {source} holds no data file (looked for {split}.jsonl, or {', '.join(DATA_SUFFIXES)} "
            f"files); it holds {', '.join(held) if held else 'nothing'}. Give a .jsonl file or a folder with "
            "train.jsonl and test.jsonl.")
    try:
        ds = datasets.load_dataset(str(source), split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ValueError(f"data set {source!s} has no split {split!r}: {e}") from None
        raise
    except Exception as e:  # the hub unreachable or the id unknown: say which, in one line
        if isinstance(source, Path):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"data set {source!r} is not a local file or folder, and the hub could not provide "
                                f"it ({type(e).__name__}: {first[:200]}). Offline? Give a local .jsonl file or "
                                "folder, or 'stories'/'qa'.") from None
    return [_normalize(row, f"{source} (split {split}), row {i}") for i, row in enumerate(ds)]


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


def _data_files(folder: Path) -> list[Path]:
    """Files in `folder` (two levels deep, hidden ones skipped) that `datasets` can read as examples."""
    found = []
    for pattern in ("*", "*/*"):
        found += [p for p in folder.glob(pattern) if p.is_file() and p.suffix in DATA_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return found


def load_examples(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Examples as dicts with 'instruction', 'input', 'output' (plus any extra fields the source has).

    `source`: 'stories' or 'qa' (the embedded sets), a .jsonl/.json file, a local folder laid out like a hub
    data set, or a hub id. Alpaca and Guanaco layouts are detected per row.
    """
    resolved = resolve_dataset(source)
    if isinstance(resolved, Path):
        if resolved.is_file():
            if resolved.suffix not in (".jsonl", ".json"):
                raise ValueError(f"{resolved}: unknown file type; use JSON Lines (.jsonl) or .json")
            rows = _read_jsonl(resolved) if resolved.suffix == ".jsonl" else _read_json(resolved)
        elif (resolved / f"{split}.jsonl").is_file():
            rows = _read_jsonl(resolved / f"{split}.jsonl")
        elif resolved.is_dir():
            rows = _read_with_datasets(resolved, split)
        else:
            raise FileNotFoundError(f"data set {source!r} not found at {resolved}")
    else:
        rows = _read_with_datasets(resolved, split)
    if not rows:
        raise ValueError(f"data set {source!s} (split {split!r}) is empty: there is nothing to train or evaluate on.")
    return rows


# ---------------------------------------------------------------------------------------------- tokenizing
def ensure_pad_token(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token if it lacks one (pad = eos) and warn that this was done.

    Padding positions are masked by the attention mask and the -100 labels, so reusing EOS is safe.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token yourself")
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn(
            f"the tokenizer had no pad token; set pad_token = eos_token ({tokenizer.eos_token!r}). "
            "Padding is masked out of attention and labels, so this does not change training.",
            stacklevel=2,
        )
    return tokenizer


PROMPT_FORMATS = ("auto", "chat", "alpaca")  # auto: the tokenizer's chat template when it has one, else Alpaca's


def resolve_prompt_format(tokenizer: Any, requested: str = "auto") -> str:
    """Which template a tokenizer gets: 'chat' (its own chat template; instruct models expect it) or 'alpaca'.

    'auto' takes the chat template when the tokenizer has one; 'chat' for a tokenizer without one is an error.
    """
    if requested not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {requested!r} unknown: use one of {', '.join(map(repr, PROMPT_FORMATS))}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise ValueError("chat formatting asked for, but this tokenizer has no chat template "
                         "(tokenizer.chat_template is empty): use prompt_format='alpaca' (or 'auto'), or set "
                         "tokenizer.chat_template to the model's Jinja template")
    return "chat" if requested == "chat" or (requested == "auto" and has_template) else "alpaca"


def user_message(instruction: str, input: str = "") -> str:
    """The user's turn of a chat: the instruction, then the input (if any) after a blank line."""
    return instruction.strip() + (f"\n\n{input.strip()}" if input.strip() else "")


def _chat_text(tokenizer: Any, instruction: str, input: str = "", answer: str | None = None) -> str:
    messages = [{"role": "user", "content": user_message(instruction, input)}]
    if answer is None:  # the prompt: the conversation so far, then the assistant's turn opened
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


def prompt_ids(tokenizer: Any, instruction: str, input: str = "", prompt_format: str = "auto") -> list[int]:
    """Token ids of the prompt exactly as training, evaluation and generation see it.

    Chat template: the user turn and the opened assistant turn, with the template's own special tokens (nothing
    added). Alpaca: the template, with BOS in front when the tokenizer has one (added by its settings or by us).
    """
    if resolve_prompt_format(tokenizer, prompt_format) == "chat":
        return list(tokenizer(_chat_text(tokenizer, instruction, input), add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(format_prompt(instruction, input), add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def response_ids(tokenizer: Any, example: dict[str, Any], prompt_format: str = "auto") -> list[int]:
    """Token ids of the answer and what ends it, so that generation learns to stop.

    Alpaca: the answer + EOS. Chat: what the template writes for the assistant's turn, up to and including its
    end-of-turn token (the tokenizer's EOS, e.g. <|im_end|>); what a template puts after it (a newline before the
    next turn) is never generated, so it is not learned. A template whose turn holds no EOS gets one appended.
    """
    eos = tokenizer.eos_token_id
    if resolve_prompt_format(tokenizer, prompt_format) == "alpaca":
        return list(tokenizer(example["output"], add_special_tokens=False)["input_ids"]) + [eos]
    instruction, input = example["instruction"], example.get("input", "")
    prompt, full = _chat_text(tokenizer, instruction, input), _chat_text(tokenizer, instruction, input, example["output"])
    if not full.startswith(prompt):
        raise ValueError(f"{example.get('_where', 'example')}: this chat template writes the prompt differently "
                         "when an answer follows, so the answer cannot be cut off the prompt: use "
                         "prompt_format='alpaca'")
    ids = list(tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def tokenize_example(example: dict[str, Any], tokenizer: Any, max_length: int = 256,
                     mask_prompt: bool = True, prompt_format: str = "auto") -> dict[str, list[int]]:
    """Token ids of prompt + response + end (EOS, or the chat template's end-of-turn), with labels -100 on the
    prompt (unless mask_prompt=False). The prompt is the chat template's when the tokenizer has one (see
    `resolve_prompt_format`), else Alpaca's.

    Too long → the response is cut to fit `max_length` (and then gets no EOS, since it does not end there);
    a prompt that leaves no room for any response token is an error.
    """
    where = example.get("_where", "example")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the model could never learn to stop")
    for field in FIELDS:
        if not isinstance(example.get(field, ""), str):
            raise TypeError(f"{where}: field '{field}' must be a string")
    prompt = prompt_ids(tokenizer, example["instruction"], example.get("input", ""), prompt_format)
    response = response_ids(tokenizer, example, prompt_format)
    if len(prompt) >= max_length:
        raise ValueError(
            f"{where}: the prompt alone is {len(prompt)} tokens, so with max_length={max_length} the response "
            "would be truncated away entirely. Raise max_length or shorten/drop this example."
        )
    response = response[: max_length - len(prompt)]
    input_ids = prompt + response
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)) + list(response)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def build_dataset(examples: Iterable[dict[str, Any]], tokenizer: Any, max_length: int = 256,
                  mask_prompt: bool = True):
    """A `datasets.Dataset` of tokenized features (input_ids, attention_mask, labels) for transformers.Trainer."""
    import datasets

    examples = list(examples)
    ensure_pad_token(tokenizer)
    if not examples:
        raise ValueError("build_dataset got no examples: the data set is empty")
    feats = [tokenize_example(ex, tokenizer, max_length, mask_prompt) for ex in examples]
    return datasets.Dataset.from_dict({k: [f[k] for f in feats] for k in ("input_ids", "attention_mask", "labels")})


class DataCollator:
    """Pads a batch on the right: input_ids with the pad id, attention_mask with 0, labels with -100."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = ensure_pad_token(tokenizer).pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = len(f["input_ids"])
            pad = length - n
            labels = list(f["labels"]) if "labels" in f else list(f["input_ids"])
            mask = list(f["attention_mask"]) if "attention_mask" in f else [1] * n
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def show_example(tokenizer: Any, features: dict[str, Any]) -> str:
    """The decoded example with the masked (prompt, label -100) part shown between [masked]...[/masked].

    What is outside the brackets is what the model is trained to produce. Padding is left out.
    """
    ids = list(features["input_ids"])
    labels = list(features.get("labels", ids))
    mask = list(features.get("attention_mask", [1] * len(ids)))
    runs: list[tuple[bool, list[int]]] = []
    for tok, lab, m in zip(ids, labels, mask):
        if not m:
            continue
        masked = int(lab) == IGNORE_INDEX
        if runs and runs[-1][0] == masked:
            runs[-1][1].append(int(tok))
        else:
            runs.append((masked, [int(tok)]))
    out = []
    for masked, toks in runs:
        text = tokenizer.decode(toks, skip_special_tokens=False)
        out.append(f"[masked]{text}[/masked]" if masked else text)
    return "".join(out)
