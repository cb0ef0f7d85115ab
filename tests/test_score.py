"""The instruction scores, on hand-made answers whose right score is known, and on generated ones."""

from __future__ import annotations

import random

import pytest

from qlora_tutor import score, storyworld as sw

INSTRUCTION = "Write a short story about a fox named Pip who lost a red kite in the forest."
GOOD = ("Once upon a time, there was a shy fox named Pip. Pip lived in the forest. Pip had a red kite and loved it "
        "very much. One windy morning, Pip was playing with the kite. Then the wind blew hard, and the kite flew "
        "away. Pip had lost the red kite. Pip looked under the leaves. At last, Pip saw the kite under a bush. "
        "Pip was so happy. The end.")


def test_hand_made_story_answers():
    assert score.instruction_score(INSTRUCTION, GOOD) == 1.0
    d = score.score_details(INSTRUCTION, GOOD)
    assert d["requested"] == {"name": "Pip", "species": "fox", "colour": "red", "object": "kite",
                              "place": "forest", "event": "lose"}
    assert d["missing"] == [] and d["ended_properly"]
    # one element wrong: 5 of 6
    assert score.instruction_score(INSTRUCTION, GOOD.replace("Pip", "Bo")) == pytest.approx(5 / 6)
    assert score.score_details(INSTRUCTION, GOOD.replace("forest", "garden"))["missing"] == ["place"]
    # a different event: 'lost' is what marks losing
    assert score.score_details(INSTRUCTION, GOOD.replace("had lost", "found"))["missing"] == ["event"]
    # the colour must belong to the object
    blue = GOOD.replace("red kite", "blue kite") + ""
    assert score.score_details(INSTRUCTION, blue.replace("The end.", "Pip also had a red hat. The end."))["missing"] == ["colour"]
    # unfinished, or rambling into a second story: halved
    assert score.instruction_score(INSTRUCTION, GOOD[:-len(" The end.")]) == 0.5
    assert score.instruction_score(INSTRUCTION, GOOD + " " + GOOD) == 0.5
    assert score.instruction_score(INSTRUCTION, GOOD + " and then") == 0.5
    # nothing relevant at all
    assert score.instruction_score(INSTRUCTION, "") == 0.0
    assert score.instruction_score(INSTRUCTION, "A story about a cat named Bo who found a blue hat. The end.") == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_instruction_inverts_every_template(seed):
    rng = random.Random(seed)
    for _ in range(300):
        e = sw.sample_elements(rng)
        got = sw.parse_instruction(sw.story_instruction(e, rng))
        assert got == {"name": e.name, "species": e.species, "colour": None, "object": e.object,
                       "place": e.place, "event": e.event}


@pytest.mark.parametrize("seed", [0, 1])
def test_matching_story_scores_one_and_a_random_story_scores_low(seed):
    rng = random.Random(seed)
    right, random_story = [], []
    for _ in range(300):
        e = sw.sample_elements(rng)
        instruction = sw.story_instruction(e, rng)
        right.append(score.instruction_score(instruction, sw.write_story(e, rng)))
        random_story.append(score.instruction_score(instruction, sw.generate_story(rng).text))
    assert min(right) == 1.0
    assert sum(random_story) / len(random_story) < 0.2   # chance level is about 0.1


def test_qa_hand_made():
    story = ("Once upon a time, there was a brave otter named Kit. Kit lived by the river. Kit had a pink lamp. "
             "Kit asked a wolf named Molly for help, and Molly looked too. Kit had lost the pink lamp. The end.")
    cases = [
        ("What kind of animal is Kit?", "Kit is an otter.", 1.0),
        ("What kind of animal is Kit?", "Kit is a wolf.", 0.0),
        ("What kind of animal is Kit?", "Kit is an otter or a wolf.", 0.5),
        ("Where does Kit live?", "Kit lives by the river.", 1.0),
        ("Where does Kit live?", "Kit lives in the forest.", 0.0),
        ("What colour is the lamp?", "The lamp is pink.", 1.0),
        ("What did Kit lose?", "Kit lost a pink lamp.", 1.0),
        ("What did Kit lose?", "Kit lost a lamp.", 0.5),
        ("Who is Kit's friend in the story?", "Kit's friend is a wolf named Molly.", 1.0),
        ("Who is Kit's friend in the story?", "Kit's friend is Molly.", 0.5),
        ("Where does Kit live?", "Kit lives by the river. " + "Kit had a pink lamp and more words. " * 3, 0.5),
    ]
    for question, answer, expected in cases:
        assert score.qa_score(question, story, answer) == pytest.approx(expected), (question, answer)
    assert score.score_answer("Where does Kit live?", "by the river", input=story) == 1.0


def test_qa_generated_pairs_score_one_and_wrong_story_low():
    rng = random.Random(7)
    right, wrong = [], []
    for _ in range(300):
        story = sw.generate_story(rng)
        kind, question, answer = sw.qa_pair(story, rng)
        assert sw.question_kind(question) == kind
        right.append(score.qa_score(question, story.text, answer))
        other = sw.generate_story(rng)  # the answer to the same question about some other story
        o_answer = sw.qa_pair(other, random.Random(0))[2]
        wrong.append(score.qa_score(question, story.text, o_answer))
    assert min(right) == 1.0 and sum(wrong) / len(wrong) < 0.3


def test_mean_score_and_errors():
    assert score.mean_score([INSTRUCTION, INSTRUCTION], [GOOD, ""]) == 0.5
    with pytest.raises(ValueError, match="as many answers"):
        score.mean_score([INSTRUCTION], [GOOD, GOOD])
    with pytest.raises(ValueError, match="no answers"):
        score.mean_score([], [])
    with pytest.raises(ValueError, match="no Story World elements"):
        score.instruction_score("Summarise the French revolution.", GOOD)
    with pytest.raises(TypeError):
        score.instruction_score(INSTRUCTION, None)
    with pytest.raises(ValueError, match="not a Story World question"):
        score.qa_score("How are you?", GOOD, "fine")
