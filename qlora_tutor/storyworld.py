"""Story World: a small grammar of short animal stories, the project's own text for the embedded model.

Characters (species + name), a coloured object, a place and one of six events are filled into sentence
templates with several variants each. The same vocabulary parses instructions and stories back into their
elements, which is what the automatic scores in `qlora_tutor.score` check. Everything is seeded.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace

SPECIES = ("fox", "rabbit", "owl", "bear", "mouse", "frog", "cat", "dog", "duck", "goat", "hedgehog",
           "squirrel", "badger", "otter", "deer", "wolf", "pig", "hen", "turtle", "lamb")
NAMES = ("Pip", "Bo", "Max", "Lily", "Tom", "Nell", "Sam", "Ruby", "Finn", "Mia", "Leo", "Rosa", "Ben", "Ivy",
         "Jack", "Lucy", "Milo", "Daisy", "Otto", "Poppy", "Ned", "Tess", "Olly", "Wren", "Kit", "Dot", "Alfie",
         "Bella", "Hugo", "Zoe", "Rex", "Lola", "Ted", "Molly", "Gus", "Fern", "Jasper", "Hazel", "Toby", "Maple")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "brown")
OBJECTS = ("kite", "ball", "hat", "scarf", "book", "drum", "cup", "boat", "key", "lamp", "shell", "bell",
           "basket", "box", "map", "flute", "sock", "ribbon", "button", "marble", "kettle", "umbrella",
           "blanket", "spoon", "feather")
PLACES = {  # place noun -> the phrase used in stories and instructions
    "forest": "in the forest", "river": "by the river", "hill": "on the hill", "garden": "in the garden",
    "beach": "at the beach", "meadow": "in the meadow", "pond": "near the pond", "village": "in the village",
    "farm": "on the farm", "cave": "in the cave", "market": "at the market", "park": "in the park",
    "lake": "by the lake", "barn": "in the barn", "island": "on the island",
}
# event -> (verb in instructions, word that marks the event in a story; no other event's story uses it).
# Instructions use the past tense because those are words the model has read; present forms ('loses') never
# occur in the corpus, so to the model they are just unknown tokens.
EVENTS = {
    "lose": ("lost", "lost"), "find": ("found", "found"), "break": ("broke", "broke"),
    "give": ("gave away", "gave"), "make": ("made", "made"), "want": ("wanted", "wanted"),
}
CHAR_ADJ = ("little", "brave", "shy", "clever", "curious", "kind", "happy", "sleepy", "clumsy", "cheerful")
END = "The end."


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Elements:
    """What a story is about; `combo` is the key that must not be shared between train and test."""
    name: str
    species: str
    colour: str
    object: str
    place: str
    event: str
    friend: str | None = None
    friend_species: str | None = None

    @property
    def combo(self) -> tuple[str, str, str, str, str]:
        return (self.name, self.species, self.object, self.place, self.event)


@dataclass(frozen=True)
class Story:
    elements: Elements
    text: str = field(repr=False)


def sample_elements(rng: random.Random, friend_prob: float = 0.5) -> Elements:
    """Draw a main character, object, place and event; a friend (another name) with probability friend_prob."""
    name, species = rng.choice(NAMES), rng.choice(SPECIES)
    event = rng.choice(tuple(EVENTS))
    friend = friend_species = None
    if event == "give" or rng.random() < friend_prob:  # giving needs someone to give to
        friend = rng.choice([n for n in NAMES if n != name])
        friend_species = rng.choice(SPECIES)
    return Elements(name, species, rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(tuple(PLACES)),
                    event, friend, friend_species)


def _opening(e: Elements, rng: random.Random) -> str:
    n, s, where, adj = e.name, e.species, PLACES[e.place], rng.choice(CHAR_ADJ)
    return rng.choice([
        f"Once upon a time, there was {article(adj)} {adj} {s} named {n}. {n} lived {where}.",
        f"There once was {article(adj)} {adj} {s} called {n}, who lived {where}.",
        f"{n} was {article(adj)} {adj} {s}. {n} lived {where} with a big family.",
        f"{where[0].upper() + where[1:]}, there lived {article(adj)} {adj} {s} named {n}.",
    ])


def _friend(e: Elements) -> str:
    return f"{article(e.friend_species)} {e.friend_species} named {e.friend}"


def _body(e: Elements, rng: random.Random) -> list[str]:
    n, c, o, f = e.name, e.colour, e.object, e.friend
    pick = rng.choice
    if e.event == "lose":
        out = [pick([f"{n} had {article(c)} {c} {o} and loved it very much.", f"{n}'s favourite thing was {article(c)} {c} {o}."]),
               pick([f"One day, {n} took the {o} out to play.", f"One windy morning, {n} was playing with the {o}."]),
               pick([f"But when {n} looked again, the {o} was gone!", f"Then the wind blew hard, and the {o} flew away."]),
               f"{n} had lost the {c} {o}.",
               pick([f"{n} looked under the leaves.", f"{n} looked behind every rock.", f"{n} searched high and low."])]
        if f:
            out.append(f"{n} asked {_friend(e)} for help, and {f} looked too.")
        out += [pick([f"At last, {n} saw the {o} under a bush.", f"At last, {n} saw the {o} next to a big stone."]),
                pick([f"{n} was so happy.", f"{n} smiled and hugged the {o}."]),
                pick([f"From then on, {n} took good care of the {o}.", f"{n} never let go of it again."])]
    elif e.event == "find":
        out = [pick([f"One morning, {n} went for a walk.", f"{n} was out exploring one sunny day."]),
               pick([f"Under a pile of leaves, {n} found {article(c)} {c} {o}.", f"Suddenly, {n} found {article(c)} {c} {o} lying on the ground."]),
               pick([f"{n} had never seen such a nice {o}.", f"It was the prettiest {o} {n} had ever seen."]),
               f"Who could it belong to? {n} asked everyone, but nobody knew."]
        if f:
            out.append(f"{n} showed the {o} to {_friend(e)}. \"You should keep it,\" said {f}.")
        out += [pick([f"So {n} kept the {o} and played with it every day.", f"So the {c} {o} became {n}'s treasure."])]
    elif e.event == "break":
        out = [pick([f"{n} had {article(c)} {c} {o} that {n} loved.", f"{n}'s grandma had given {n} {article(c)} {c} {o}."]),
               pick([f"One day, {n} dropped the {o}, and it broke!", f"But one day, {n} played too roughly, and the {o} broke in two."]),
               pick([f"{n} felt very sad and began to cry.", f"{n} sat down and sighed."])]
        if f:
            out.append(f"Then {_friend(e)} came by. \"Let us fix it together,\" said {f}.")
        else:
            out.append(f"{n} got some glue and string.")
        out += [f"They worked hard, and soon the {o} was fixed." if f else f"{n} worked hard, and soon the {o} was fixed.",
                pick([f"The {c} {o} looked as good as new.", f"The {o} was as good as new, and {n} was happy again."])]
    elif e.event == "give":
        out = [pick([f"{n} had {article(c)} {c} {o}.", f"{n} owned {article(c)} {c} {o} and liked it a lot."]),
               f"{n}'s friend, {_friend(e)}, was sad because {f} had nothing to play with.",
               pick([f"{n} thought for a moment.", f"{n} looked at the {o} for a long time."]),
               f"Then {n} gave the {c} {o} to {f}.",
               pick([f"{f} smiled a big smile. \"Thank you!\" said {f}.", f"{f} jumped for joy."]),
               pick([f"{n} felt warm inside.", f"Sharing felt good to {n}."]),
               "The two friends played together until the sun went down."]
    elif e.event == "make":
        out = [pick([f"One day, {n} had an idea.", f"{n} was bored one rainy afternoon."]),
               f"{n} decided to make {article(o)} {o}.",
               pick([f"{n} collected sticks, string and paint.", f"{n} gathered paper, glue and a little paint."]),
               f"It took all day, but at last {n} made {article(c)} {c} {o}."]
        if f:
            out.append(f"{n} showed it to {_friend(e)}. \"How lovely!\" said {f}.")
        out += [pick([f"{n} was very proud of the {c} {o}.", f"{n} put the {o} where everyone could see it."])]
    elif e.event == "want":
        out = [f"{n} wanted {article(c)} {c} {o} more than anything.",
               pick([f"Every day, {n} looked at the {o} in the shop window.", f"{n} dreamed about the {o} every night."]),
               pick([f"So {n} saved every coin.", f"So {n} helped with chores to earn coins."]),
               f"After many weeks, {n} had enough coins.",
               f"{n} bought the {c} {o} and carried it home with a big smile."]
        if f:
            out.append(f"{n} showed it to {_friend(e)}, and they played with it together.")
    else:
        raise ValueError(f"unknown event {e.event!r}; use one of {sorted(EVENTS)}")
    return out


def write_story(e: Elements, rng: random.Random) -> str:
    """The story text for the given elements, with sentence variants drawn from `rng`; always ends in 'The end.'"""
    return " ".join([_opening(e, rng), *_body(e, rng), END])


def generate_story(rng: random.Random, friend_prob: float = 0.5) -> Story:
    e = sample_elements(rng, friend_prob)
    return Story(e, write_story(e, rng))


def generate_stories(n: int, seed: int) -> list[str]:
    """`n` plain story texts from the seeded generator (held-out text for perplexity)."""
    rng = random.Random(seed)
    return [generate_story(rng).text for _ in range(n)]


def write_title(e: Elements, rng: random.Random) -> str:
    """A short title naming some of the story's elements (titles are how the model learns that a story
    reuses what came before it; they are not instructions)."""
    past = EVENTS[e.event][1] + (" away" if e.event == "give" else "")
    return rng.choice([
        f"{e.name} the {e.species}", f"{e.name} and the {e.colour} {e.object}", f"The {e.colour} {e.object}",
        f"How {e.name} {past} the {e.colour} {e.object}", f"{e.name} {PLACES[e.place]}",
        f"{e.name} the {e.species} and the {e.colour} {e.object}",
    ])


def generate_document(rng: random.Random) -> str:
    """One pretraining document: a story (45%), a titled story (30%), or two stories about the same
    character in the same place (25%, 'sequels'), so the model learns to carry names and things forward."""
    r = rng.random()
    first = sample_elements(rng)
    if r < 0.45:
        return write_story(first, rng)
    if r < 0.75:
        return write_title(first, rng) + "\n\n" + write_story(first, rng)
    nxt = sample_elements(rng)
    nxt = Elements(first.name, first.species, nxt.colour, nxt.object, first.place, nxt.event,
                   nxt.friend if nxt.friend != first.name else None,
                   nxt.friend_species if nxt.friend != first.name else None)
    if nxt.event == "give" and nxt.friend is None:
        nxt = replace(nxt, friend=next(n for n in NAMES if n != first.name), friend_species=first.species)
    return write_story(first, rng) + "\n\n" + write_story(nxt, rng)


def generate_corpus(n: int, seed: int) -> list[str]:
    """`n` documents from the seeded generator: the pretraining corpus (stories and titles; no instructions)."""
    rng = random.Random(seed)
    return [generate_document(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------- instructions
# The colour is left to the writer: measured, a LoRA on this model does not learn to copy a requested colour in
# a CPU budget (it always wrote "red"), while name, species, object, place and event are learned (data/README.md).
_INSTRUCTION_TEMPLATES = (
    "Write a short story about {a} {species} named {name} who {verb} {oa} {object} {where}.",
    "Tell me a story about {name} the {species}, who {verb} {oa} {object} {where}.",
    "Write a story in which {a} {species} called {name} {verb} {oa} {object} {where}.",
    "Can you write a short story about {name}, {a} {species} who {verb} {oa} {object} {where}?",
)


def story_instruction(e: Elements, rng: random.Random) -> str:
    """A request for a story with these main elements (the colour and the friend are left to the writer)."""
    return rng.choice(_INSTRUCTION_TEMPLATES).format(
        a=article(e.species), species=e.species, name=e.name, verb=EVENTS[e.event][0], oa=article(e.object),
        object=e.object, where=PLACES[e.place])


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def parse_instruction(text: str) -> dict[str, str | None]:
    """The requested elements, read from an instruction's words with the Story World vocabulary."""
    words = _words(text)
    lower = [w.lower() for w in words]
    found: dict[str, str | None] = {k: None for k in ("name", "species", "colour", "object", "place", "event")}
    found["name"] = next((w for w in words if w in NAMES), None)
    found["species"] = next((w for w in lower if w in SPECIES), None)
    found["object"] = next((w for w in lower if w in OBJECTS), None)
    found["colour"] = next((w for w in lower if w in COLOURS), None)
    found["place"] = next((w for w in lower if w in PLACES), None)
    verbs = {v.split()[0]: ev for ev, (v, _) in EVENTS.items()}
    found["event"] = next((verbs[w] for w in lower if w in verbs), None)
    return found


def parse_story(text: str) -> dict[str, str | None]:
    """The elements of a Story World story: the first name and species are the main character's, the
    friend is the other named character, the object is the first '<colour> <object>' pair."""
    words = _words(text)
    lower = [w.lower() for w in words]
    name = next((w for w in words if w in NAMES), None)
    friend = next((w for w in words if w in NAMES and w != name), None)
    m = re.search(r"\b(\w+) (?:named|called) " + re.escape(friend) + r"\b", text) if friend else None
    pair = next(((a, b) for a, b in zip(lower, lower[1:]) if a in COLOURS and b in OBJECTS), (None, None))
    markers = {marker: ev for ev, (_, marker) in EVENTS.items()}
    return {
        "name": name, "species": next((w for w in lower if w in SPECIES), None),
        "colour": pair[0], "object": pair[1], "place": next((w for w in lower if w in PLACES), None),
        "event": next((markers[w] for w in lower if w in markers), None),
        "friend": friend, "friend_species": m.group(1) if m and m.group(1) in SPECIES else None,
    }


# ------------------------------------------------------------------------------------------ questions (qa)
def qa_pair(story: Story, rng: random.Random) -> tuple[str, str, str]:
    """(question type, question, short answer) about one story: the second skill, reading comprehension."""
    e = story.elements
    kinds = ["species", "place", "colour", "object"] + (["friend"] if e.friend else [])
    kind = rng.choice(kinds)
    n = e.name
    if kind == "species":
        return kind, f"What kind of animal is {n}?", f"{n} is {article(e.species)} {e.species}."
    if kind == "place":
        return kind, f"Where does {n} live?", f"{n} lives {PLACES[e.place]}."
    if kind == "colour":
        return kind, f"What colour is the {e.object}?", f"The {e.object} is {e.colour}."
    if kind == "object":
        verb = {"lose": "lose", "find": "find", "break": "break", "give": "give away", "make": "make",
                "want": "want"}[e.event]
        return kind, f"What did {n} {verb}?", f"{n} {EVENTS[e.event][1]}{' away' if e.event == 'give' else ''} {article(e.colour)} {e.colour} {e.object}."
    return kind, f"Who is {n}'s friend in the story?", f"{n}'s friend is {article(e.friend_species)} {e.friend_species} named {e.friend}."


QUESTION_PATTERNS = {  # question type -> pattern that recognises it
    "species": re.compile(r"what kind of animal", re.I), "place": re.compile(r"where does", re.I),
    "colour": re.compile(r"what colou?r", re.I), "object": re.compile(r"what did \w+ (\w+)", re.I),
    "friend": re.compile(r"friend", re.I),
}


def question_kind(question: str) -> str | None:
    return next((k for k, p in QUESTION_PATTERNS.items() if p.search(question)), None)


def count_combinations() -> dict[str, int]:
    """How many distinct element combinations and (lower bound) distinct stories the grammar can write."""
    combos = len(NAMES) * len(SPECIES) * len(COLOURS) * len(OBJECTS) * len(PLACES) * len(EVENTS)
    with_friend = combos * (len(NAMES) - 1) * len(SPECIES)
    # 4 openings x 10 adjectives, and at least 2^3 sentence variants in every event's body
    variants = 4 * len(CHAR_ADJ) * 2 ** 3
    return {"element_combinations": combos, "with_optional_friend": combos + with_friend,
            "stories_lower_bound": (combos + with_friend) * variants,
            "log10_stories": round(math.log10((combos + with_friend) * variants), 1)}


# ----------------------------------------------------------------------------------- instruction data sets
def _row(e: Elements) -> dict:
    return {"name": e.name, "species": e.species, "colour": e.colour, "object": e.object, "place": e.place,
            "event": e.event, "friend": e.friend, "friend_species": e.friend_species}


def make_examples(skill: str, n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """`n` instruction examples of a skill ('stories' or 'qa'), none whose element combination is in
    `exclude`; the combinations used are added to `exclude`, so splits made in turn never share one."""
    if skill not in ("stories", "qa"):
        raise ValueError(f"unknown skill {skill!r}: use 'stories' or 'qa'")
    rng = random.Random(seed)
    exclude = exclude if exclude is not None else set()
    rows = []
    while len(rows) < n:
        e = sample_elements(rng)
        if e.combo in exclude:
            continue
        exclude.add(e.combo)
        story = Story(e, write_story(e, rng))
        if skill == "stories":
            rows.append({"instruction": story_instruction(e, rng), "input": "", "output": story.text,
                         "elements": _row(e)})
        else:
            kind, question, answer = qa_pair(story, rng)
            rows.append({"instruction": question, "input": story.text, "output": answer, "kind": kind,
                         "elements": _row(e)})
    return rows


SPLIT_SIZES = {"stories": {"test": 300, "validation": 300, "train": 4000},
               "qa": {"test": 200, "validation": 200, "train": 2000}}
SPLIT_SEEDS = {"stories": 4000, "qa": 5000}


def make_splits(skill: str) -> dict[str, list[dict]]:
    """The shipped splits of a skill: test first, then validation, then train, with disjoint combinations."""
    used: set = set()
    return {split: make_examples(skill, n, SPLIT_SEEDS[skill] + i, used)
            for i, (split, n) in enumerate(SPLIT_SIZES[skill].items())}
