"""Automatic scores that say how well an answer followed an instruction (0 = not at all, 1 = fully).

Both read the prompt itself (the instruction, and for questions the story in the input), never hidden labels:
the requested elements are parsed with the Story World vocabulary and looked for in the answer.

* stories: fraction of the requested elements present (the embedded requests name five: name, species, object,
  place, event; an object's colour counts too when a request names one), halved if the answer does not end
  properly (exactly one 'The end.' as its last words, at most 160 words).
* qa: fraction of the expected answer words present, halved if a wrong alternative of the same kind appears
  (another colour, animal, ...), halved again if the answer rambles (more than 16 words).
"""

from __future__ import annotations

import re
from typing import Sequence

from . import storyworld as sw

MAX_STORY_WORDS = 160
MAX_ANSWER_WORDS = 16
_STORY_ELEMENTS = ("name", "species", "object", "colour", "place", "event")
_CATEGORY = {"name": sw.NAMES, "species": sw.SPECIES, "colour": sw.COLOURS, "object": sw.OBJECTS,
             "place": tuple(sw.PLACES)}


def _has(word: str, text: str, case: bool = False) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, 0 if case else re.IGNORECASE) is not None


def _check(name: str, value: str, answer: str) -> bool:
    if name == "name":
        return _has(value, answer, case=True)
    if name == "event":
        return _has(sw.EVENTS[value][1], answer)
    return _has(value, answer)


def score_details(instruction: str, answer: str) -> dict:
    """Which requested story elements the answer has or misses, whether it ends properly, and the score."""
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise TypeError("score_details(instruction: str, answer: str) needs two strings")
    requested = {k: v for k, v in sw.parse_instruction(instruction).items() if v is not None}
    if not requested:
        raise ValueError(f"no Story World elements found in the instruction {instruction!r}; "
                         "this score only judges requests for Story World stories")
    present, missing = [], []
    for k in _STORY_ELEMENTS:
        if k not in requested:
            continue
        ok = (_check(k, requested[k], answer) and (k != "colour" or "object" not in requested or
              _has(f"{requested[k]} {requested['object']}", answer)))  # the colour must be the object's
        (present if ok else missing).append(k)
    text = answer.strip()
    n_words = len(text.split())
    ended = text.endswith(sw.END) and text.count(sw.END) == 1 and n_words <= MAX_STORY_WORDS
    fraction = len(present) / len(requested)
    return {"requested": requested, "present": present, "missing": missing, "ended_properly": ended,
            "words": n_words, "score": fraction * (1.0 if ended else 0.5)}


def instruction_score(instruction: str, answer: str) -> float:
    """How well a story answers a Story World story request, in [0, 1] (see the module docstring)."""
    return score_details(instruction, answer)["score"]


def qa_details(instruction: str, input: str, answer: str) -> dict:
    """The expected answer words for a question about the story in `input`, what the answer has, the score."""
    for name, value in (("instruction", instruction), ("input", input), ("answer", answer)):
        if not isinstance(value, str):
            raise TypeError(f"qa_details: {name} must be a string, not {type(value).__name__}")
    kind = sw.question_kind(instruction)
    facts = sw.parse_story(input)
    if kind is None or facts["name"] is None:
        raise ValueError(f"not a Story World question about a story: {instruction!r}")
    keys = {"species": {"species": facts["species"]}, "place": {"place": facts["place"]},
            "colour": {"colour": facts["colour"]},
            "object": {"colour": facts["colour"], "object": facts["object"]},
            "friend": {"species": facts["friend_species"], "name": facts["friend"]}}[kind]
    keys = {k: v for k, v in keys.items() if v is not None}
    if not keys:
        raise ValueError(f"the story in the input does not contain what {instruction!r} asks about")
    present = [k for k, v in keys.items() if _has(v, answer, case=(k == "name"))]
    allowed = {facts["name"]} if kind == "friend" else set()  # the friend answer may mention the main character
    wrong = [w for k, v in keys.items() for w in _CATEGORY[k]
             if w != v and w not in allowed and _has(w, answer, case=(k == "name"))]
    n_words = len(answer.split())
    score = len(present) / len(keys) * (0.5 if wrong else 1.0) * (0.5 if n_words > MAX_ANSWER_WORDS else 1.0)
    return {"kind": kind, "expected": keys, "present": present, "wrong": wrong, "words": n_words, "score": score}


def qa_score(instruction: str, input: str, answer: str) -> float:
    """How well a short answer answers a question about the story given as input, in [0, 1]."""
    return qa_details(instruction, input, answer)["score"]


def score_answer(instruction: str, answer: str, input: str = "") -> float:
    """The right score for a Story World prompt: qa when there is an input story, stories otherwise."""
    return qa_score(instruction, input, answer) if input.strip() else instruction_score(instruction, answer)


def mean_score(instructions: Sequence[str], answers: Sequence[str], inputs: Sequence[str] | None = None) -> float:
    """Average score over a set of prompts and answers (inputs given → qa where an input is non-empty)."""
    if len(instructions) != len(answers) or (inputs is not None and len(inputs) != len(answers)):
        raise ValueError(f"mean_score needs as many answers as instructions (and inputs): got "
                         f"{len(instructions)}, {len(answers)}" + ("" if inputs is None else f", {len(inputs)}"))
    if not answers:
        raise ValueError("mean_score got no answers")
    inputs = inputs if inputs is not None else [""] * len(answers)
    return sum(score_answer(q, a, i) for q, a, i in zip(instructions, answers, inputs)) / len(answers)


# The automatic score of each embedded data set (data.EMBEDDED_DATASETS): scorer(example, answer) -> [0, 1].
SCORERS = {
    "stories": lambda ex, answer: instruction_score(ex["instruction"], answer),
    "qa": lambda ex, answer: qa_score(ex["instruction"], ex.get("input", ""), answer),
}
