"""Chat templates in the data pipeline: an instruct model's own template for the prompt, the prompt masked, the
answer learned up to the template's end-of-turn token, also when the pad token is that token (SmolLM2's case)."""

from __future__ import annotations

import copy

import pytest

from qlora_tutor import data, models
from real_model_helpers import smollm_dir  # noqa: F401  (fixture)

ANSWERS = ["Once upon a time, a fox named Milo found a red ball. The end.",
           " leading space, then  two spaces and a newline\nat the end\n",
           "Ünïcode – dashes, 'quotes' and emoji 🦊. The end."]


@pytest.fixture(scope="module")
def chat_tok(smollm_dir):
    from transformers import AutoTokenizer
    return data.ensure_pad_token(AutoTokenizer.from_pretrained(smollm_dir))


@pytest.fixture(scope="module")
def alpaca_tok():
    return models.load_tokenizer(str(models.embedded_model_dir()))


def learned(features):
    return [t for t, lab in zip(features["input_ids"], features["labels"]) if lab != data.IGNORE_INDEX]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("kind", ["chat", "alpaca"])
def test_learned_tokens_are_exactly_the_answer_and_its_end(kind, answer, request):
    tok = request.getfixturevalue(f"{kind}_tok")
    assert data.resolve_prompt_format(tok) == kind
    example = {"instruction": "Write a story about Milo.", "input": "Milo is a fox.", "output": answer}
    features = data.tokenize_example(example, tok, max_length=256)
    ids = learned(features)
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids[:-1], skip_special_tokens=False) == answer
    prompt = features["input_ids"][: len(features["input_ids"]) - len(ids)]
    assert prompt == data.prompt_ids(tok, example["instruction"], example["input"])  # what generation feeds
    assert features["labels"][: len(prompt)] == [data.IGNORE_INDEX] * len(prompt)


def test_chat_prompt_is_the_template_with_the_assistant_turn_opened(chat_tok):
    ids = data.prompt_ids(chat_tok, "Name a fox.", "")
    want = chat_tok.apply_chat_template([{"role": "user", "content": "Name a fox."}], tokenize=False,
                                        add_generation_prompt=True)
    assert chat_tok.decode(ids, skip_special_tokens=False) == want
    assert ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3  # system, user, assistant
    with_input = chat_tok.decode(data.prompt_ids(chat_tok, "Answer.", "Milo is a fox."), skip_special_tokens=False)
    assert "<|im_start|>user\nAnswer.\n\nMilo is a fox.<|im_end|>" in with_input


def test_pad_equal_to_end_of_turn_still_teaches_the_model_to_stop(chat_tok):
    assert chat_tok.pad_token_id == chat_tok.eos_token_id  # SmolLM2: pad = <|im_end|>, the known trap
    feats = [data.tokenize_example({"instruction": "Tell a story.", "input": "", "output": a}, chat_tok, 256)
             for a in ("Short. The end.", ANSWERS[0] + " " + ANSWERS[2])]
    batch = data.DataCollator(chat_tok)(feats)
    for row, (ids, labels, mask) in enumerate(zip(batch["input_ids"], batch["labels"], batch["attention_mask"])):
        n = int(mask.sum())
        assert labels[n - 1] == chat_tok.eos_token_id, f"row {row}: the end-of-turn token is masked"
        assert (labels[n:] == data.IGNORE_INDEX).all() and (ids[n:] == chat_tok.pad_token_id).all()
    # the wrong way (mask every pad id) would have lost it: what the test guards against
    by_id = batch["labels"].masked_fill(batch["input_ids"] == chat_tok.pad_token_id, data.IGNORE_INDEX)
    assert not (by_id == chat_tok.eos_token_id).any()


def test_truncated_answer_has_no_end_of_turn(chat_tok):
    features = data.tokenize_example({"instruction": "x", "input": "", "output": ANSWERS[0] * 20}, chat_tok, 64)
    assert len(features["input_ids"]) == 64 and chat_tok.eos_token_id not in learned(features)


def test_chat_asked_for_without_a_template_is_a_clear_error(alpaca_tok, chat_tok):
    with pytest.raises(ValueError, match="no chat template.*prompt_format='alpaca'"):
        data.prompt_ids(alpaca_tok, "x", prompt_format="chat")
    with pytest.raises(ValueError, match="prompt format 'chatml' unknown"):
        data.resolve_prompt_format(chat_tok, "chatml")
    assert data.resolve_prompt_format(chat_tok, "alpaca") == "alpaca"  # an instruct model may still get Alpaca
    alpaca_ids = data.prompt_ids(chat_tok, "x", prompt_format="alpaca")
    assert "### Instruction:" in chat_tok.decode(alpaca_ids)


def test_templates_that_cannot_be_cut_or_end_without_eos(chat_tok):
    odd = copy.deepcopy(chat_tok)  # the prompt alone is written differently from the prompt in a conversation
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant (thinking): {% endif %}")
    with pytest.raises(ValueError, match="cannot be cut off the prompt"):
        data.tokenize_example({"instruction": "x", "input": "", "output": "y"}, odd, 64)
    plain = copy.deepcopy(chat_tok)  # a template whose assistant turn holds no EOS: one is appended
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    ids = learned(data.tokenize_example({"instruction": "x", "input": "", "output": "fine"}, plain, 64))
    assert ids[-1] == plain.eos_token_id and plain.decode(ids[:-1]) == "fine\n"
