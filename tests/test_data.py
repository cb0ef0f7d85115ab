"""The data pipeline: template, masking, EOS, truncation and padding against a plain reference; loading
Alpaca/Guanaco layouts from local files and folders; errors that name the file, the line and the field."""

from __future__ import annotations

import json
import random
import re
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qlora_tutor import data
from qlora_tutor.models import embedded_model_dir

WORDS = ("fox owl cat kite ball red blue green forest river hill Pip Bo Max found lost the a and "
         "went home happy sad was there once upon time named who").split()


def _make_tokenizer(pad: bool = True, add_bos_template: bool = True) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer trained here, so these tests do not depend on the embedded model."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(30)) + ". ### Instruction:\n### Response:\n" for _ in range(200)]
    tok.train_from_iterator(text, trainer)
    if add_bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if pad:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def _random_example(rng: random.Random, n_out: int = 20, with_input: bool = False) -> dict:
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return {"instruction": say(rng.randint(3, 12)), "input": say(rng.randint(2, 8)) if with_input else "",
            "output": say(n_out) + "."}


def _reference(example: dict, tok: PreTrainedTokenizerFast, max_length: int, mask_prompt: bool) -> dict:
    """Straightforward reference with the raw Rust tokenizer: [bos] prompt | output [eos], cut at max_length."""
    raw = tok.backend_tokenizer
    prompt_text = f"### Instruction:\n{example['instruction']}\n\n"
    if example["input"]:
        prompt_text += f"### Input:\n{example['input']}\n\n"
    prompt_text += "### Response:\n"
    prompt = [tok.bos_token_id] + raw.encode(prompt_text, add_special_tokens=False).ids
    full = prompt + raw.encode(example["output"], add_special_tokens=False).ids + [tok.eos_token_id]
    ids = full[:max_length]
    labels = [(-100 if (i < len(prompt) and mask_prompt) else t) for i, t in enumerate(ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, len(prompt)


def test_format_prompt_is_one_template():
    assert data.format_prompt("Do X.") == "### Instruction:\nDo X.\n\n### Response:\n"
    assert data.format_prompt("Q?", "some text") == "### Instruction:\nQ?\n\n### Input:\nsome text\n\n### Response:\n"
    with pytest.raises(TypeError):
        data.format_prompt(3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("template", [True, False])
def test_tokenize_matches_reference(seed, mask_prompt, template):
    tok = _make_tokenizer(add_bos_template=template)
    rng = random.Random(seed)
    for i in range(20):
        ex = _random_example(rng, n_out=rng.randint(1, 40), with_input=i % 2 == 0)
        max_length = rng.choice([64, 128, 512])
        ref, n_prompt = _reference(ex, tok, max_length, mask_prompt)
        if n_prompt >= max_length:
            with pytest.raises(ValueError, match="truncated away"):
                data.tokenize_example(ex, tok, max_length=max_length, mask_prompt=mask_prompt)
            continue
        got = data.tokenize_example(ex, tok, max_length=max_length, mask_prompt=mask_prompt)
        assert got == ref
        assert len(got["input_ids"]) <= max_length
        full_fits = len(ref["input_ids"]) < max_length or ref["input_ids"][-1] == tok.eos_token_id
        assert (got["input_ids"][-1] == tok.eos_token_id) == full_fits


def test_truncation_and_prompt_too_long():
    tok = _make_tokenizer()
    ex = {"instruction": "fox kite", "input": "", "output": " ".join(["red fox"] * 200), "_where": "x.jsonl, line 7"}
    got = data.tokenize_example(ex, tok, max_length=50)
    assert len(got["input_ids"]) == 50 and got["input_ids"][-1] != tok.eos_token_id
    assert got["labels"][-1] == got["input_ids"][-1]
    long_prompt = dict(ex, instruction=" ".join(["forest"] * 100))
    with pytest.raises(ValueError, match=r"x\.jsonl, line 7.*truncated away"):
        data.tokenize_example(long_prompt, tok, max_length=50)


def test_collator_pads_right_and_loss_is_unchanged_by_padding():
    tok = _make_tokenizer()
    rng = random.Random(3)
    feats = [data.tokenize_example(_random_example(rng, n_out=n), tok) for n in (3, 17, 9)]
    batch = data.DataCollator(tok, pad_to_multiple_of=8)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (3, -(-longest // 8) * 8)
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][row, :n].tolist() == f["labels"] and (batch["labels"][row, n:] == -100).all()
    # A padded batch gives the same summed token loss as each example alone (right padding + causal mask).
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()

    def summed_loss(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
    with torch.no_grad():
        padded = summed_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        alone = sum(summed_loss(torch.tensor([f["input_ids"]]), torch.tensor([f["attention_mask"]]),
                                torch.tensor([f["labels"]])) for f in feats)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_ensure_pad_token_fixes_and_warns():
    tok = _make_tokenizer(pad=False)
    assert tok.pad_token is None
    with pytest.warns(UserWarning, match="pad token"):
        data.ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token
    tok2 = _make_tokenizer(pad=False)
    with pytest.warns(UserWarning, match="pad token"):
        collate = data.DataCollator(tok2)
    assert collate.pad_id == tok2.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.ensure_pad_token(_make_tokenizer(pad=True))  # nothing to fix, no warning


def test_build_dataset_and_show_example():
    tok = _make_tokenizer()
    rng = random.Random(5)
    examples = [_random_example(rng) for _ in range(6)]
    ds = data.build_dataset(examples, tok, max_length=128)
    assert len(ds) == 6 and set(ds.column_names) == {"input_ids", "attention_mask", "labels"}
    assert ds[2] == data.tokenize_example(examples[2], tok, max_length=128)
    shown = data.show_example(tok, ds[0])
    assert shown.startswith("[masked]<s>### Instruction:") and "### Response:\n[/masked]" in shown
    assert shown.endswith("</s>") and examples[0]["output"].split()[0] in shown.split("[/masked]")[1]
    batch = data.DataCollator(tok)([ds[0], ds[1]])
    row = {k: v[0].tolist() for k, v in batch.items()}
    assert data.show_example(tok, row) == shown  # padding is not shown
    with pytest.raises(ValueError, match="empty"):
        data.build_dataset([], tok)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_alpaca_and_guanaco_jsonl(tmp_path):
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Add.", "input": "2 and 3", "output": "5", "id": 7},
        {"instruction": "No input key.", "output": "Fine."}])
    rows = data.load_examples(str(alpaca))
    assert [r["output"] for r in rows] == ["Red.", "5", "Fine."]
    assert rows[1]["input"] == "2 and 3" and rows[1]["id"] == 7 and rows[2]["input"] == ""
    guanaco = _write_jsonl(tmp_path / "g.jsonl", [
        {"text": "### Human: What is NF4?### Assistant: A 4-bit data type.### Human: Thanks!### Assistant: Welcome."},
        {"text": "### Human: Hi there ### Assistant: Hello!"}])
    rows = data.load_examples(guanaco)
    assert rows[0]["instruction"] == "What is NF4?" and rows[0]["output"] == "A 4-bit data type."
    assert rows[1] == {**rows[1], "instruction": "Hi there", "input": "", "output": "Hello!"}


def test_load_local_hub_layout_folder(tmp_path):
    import datasets
    folder = tmp_path / "my-guanaco"
    (folder / "data").mkdir(parents=True)
    for split, n in (("train", 5), ("test", 2)):
        texts = [f"### Human: question {i}?### Assistant: answer {i}." for i in range(n)]
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    rows = data.load_examples(str(folder), split="test")
    assert [(r["instruction"], r["output"]) for r in rows] == [("question 0?", "answer 0."), ("question 1?", "answer 1.")]
    assert len(data.load_examples(folder, "train")) == 5
    with pytest.raises(ValueError, match="validation"):
        data.load_examples(folder, "validation")
    alp = tmp_path / "my-alpaca"
    alp.mkdir()
    _write_jsonl(alp / "train.jsonl", [{"instruction": "i", "input": "", "output": "o"}])
    assert data.load_examples(alp)[0]["output"] == "o"


@pytest.mark.parametrize("row, error, pattern", [
    ({"instruction": "x", "input": ""}, ValueError, r"line 2: field 'output' is missing"),
    ({"instruction": "x", "input": "", "output": 5}, TypeError, r"line 2: field 'output' must be a string"),
    ({"instruction": ["x"], "input": "", "output": "y"}, TypeError, r"line 2: field 'instruction' must be a string"),
    ({"instruction": "x", "input": 3, "output": "y"}, TypeError, r"line 2: field 'input' must be a string"),
    ({"text": "no roles here"}, ValueError, r"line 2: field 'text' is not in the Guanaco format"),
    ('{"instruction": "x", "output": ', ValueError, r"line 2: not valid JSON"),
    ({"instruction": "", "input": "", "output": "y"}, ValueError, r"line 2: field 'instruction' is empty"),
    ({"instruction": " \n\t", "input": "ctx", "output": "y"}, ValueError, r"line 2: field 'instruction' is empty"),
    ({"text": "### Human:   ### Assistant: an answer"}, ValueError, r"line 2: field 'instruction' is empty"),
    ({"instruction": "x", "input": "", "output": "  "}, ValueError, r"line 2: field 'output' is empty"),
])
def test_errors_name_file_line_field(tmp_path, row, error, pattern):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "input": "", "output": "ok"}, row])
    with pytest.raises(error, match=pattern) as info:
        data.load_examples(path)
    assert "bad.jsonl" in str(info.value)


@pytest.mark.parametrize("bad, at", [(b"\xff", 0), (b"\xc3(", 0), (b"caf\xe9", 3), (b"\xed\xa0\x80", 0)])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])  # a stray byte, a cut sequence, Latin-1, a surrogate
def test_bytes_that_are_not_utf8_are_named_by_file_line_and_column(tmp_path, bad, at, suffix):
    good = json.dumps({"instruction": "ok", "input": "", "output": "ok"}).encode()
    broken = b'{"instruction": "x' + bad + b'", "input": "", "output": "y"}'
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(good + b"\n" + broken + b"\n" if suffix == ".jsonl" else b"[" + good + b",\n " + broken + b"]")
    column = len(b'{"instruction": "x') + at + 1 + (1 if suffix == ".json" else 0)
    with pytest.raises(ValueError, match=rf"bad{suffix}, line 2: not UTF-8 text \(byte 0x{bad[at]:02x} at column "
                                         rf"{column}\)\. Save the file as UTF-8"):
        data.load_examples(path)


@pytest.mark.parametrize("files", [["notes.txt"], [], ["README.md", "sub/readme.txt"], [".hidden.jsonl"]])
def test_a_folder_without_a_data_file_says_so(tmp_path, files):
    folder = tmp_path / "mydata"
    folder.mkdir()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("### Human: hi ### Assistant: there\n")
    with pytest.raises(FileNotFoundError, match=r"mydata holds no data file \(looked for train\.jsonl"):
        data.load_examples(folder)


@pytest.mark.parametrize("name", ["runs/x", "nodir/x.jsonl", "./nothing", "a/b/c.json"])
def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"data set {re.escape(name)}: no such file or folder \(looked up "
                                                rf"from {re.escape(str(tmp_path))}\)"):
        data.load_examples(name)


def test_a_hub_id_that_cannot_be_fetched_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/some-data' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/some-data' is not a local file or folder, and the hub "
                                                r"could not provide it \(ConnectionError: Couldn't reach"):
        data.load_examples("someone/some-data")


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        data.load_examples(empty)
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        data.load_examples(tmp_path / "x.csv")


def test_resolve_dataset():
    assert data.resolve_dataset("stories") == data.paths.data_dir() / "stories"
    assert data.resolve_dataset("qa").name == "qa"
    assert data.resolve_dataset("timdettmers/openassistant-guanaco") == "timdettmers/openassistant-guanaco"
    assert embedded_model_dir() == data.paths.data_dir() / "embedded-model"
    assert data.resolve_dataset("stories", data_root=data.paths.REPO_ROOT / "data") == data.paths.data_dir() / "stories"


def test_an_explicit_data_root_wins_over_the_environment(tmp_path, monkeypatch):
    (tmp_path / "stories").mkdir()
    monkeypatch.setenv("QLORA_TUTOR_DATA", str(tmp_path / "nowhere"))
    assert data.resolve_dataset("stories", data_root=tmp_path) == tmp_path / "stories"
    with pytest.raises(FileNotFoundError, match="data folder was not found"):
        data.resolve_dataset("stories")


# ------------------------------------------------------------------------------ the embedded data sets
from qlora_tutor import score, storyworld  # noqa: E402


@pytest.mark.parametrize("skill", ["stories", "qa"])
def test_embedded_splits_sizes_disjoint_and_reproducible(skill):
    splits = {s: data.load_examples(skill, s) for s in data.SPLITS}
    assert {s: len(r) for s, r in splits.items()} == storyworld.SPLIT_SIZES[skill]

    def combos(rows):  # read from the text itself, not from the stored fields
        parse = storyworld.parse_instruction if skill == "stories" else storyworld.parse_story
        out = set()
        for r in rows:
            p = parse(r["instruction"] if skill == "stories" else r["input"])
            out.add((p["name"], p["species"], p["object"], p["place"], p["event"]))
        return out
    test, val, train = combos(splits["test"]), combos(splits["validation"]), combos(splits["train"])
    assert len(test) == len(splits["test"]) and None not in {x for c in test for x in c}
    assert not test & train and not test & val and not val & train
    regenerated = storyworld.make_examples(skill, storyworld.SPLIT_SIZES[skill]["test"], storyworld.SPLIT_SEEDS[skill])
    assert [{k: v for k, v in r.items() if k != "_where"} for r in splits["test"]] == regenerated


def test_embedded_outputs_score_one_and_corpus_has_no_instructions():
    rows = data.load_examples("stories", "validation")
    assert score.mean_score([r["instruction"] for r in rows], [r["output"] for r in rows]) == 1.0
    rows = data.load_examples("qa", "validation")
    assert score.mean_score([r["instruction"] for r in rows], [r["output"] for r in rows],
                            [r["input"] for r in rows]) == 1.0
    corpus = " ".join(storyworld.generate_corpus(3000, seed=1234))
    for marker in ("###", "Instruction", "Response", "Write", "Tell me", "What kind", "Where does"):
        assert marker not in corpus


def test_embedded_examples_fit_the_context():
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    for skill in ("stories", "qa"):
        for ex in data.load_examples(skill, "train")[:400]:
            f = data.tokenize_example(ex, tok, max_length=256)
            assert f["input_ids"][-1] == tok.eos_token_id  # never truncated
