"""The standard long-context tests, generated offline from their published task descriptions: RULER's
needle-in-a-haystack variants and variable tracking (Hsieh et al. 2024), BABILong's bAbI questions in book
text (Kuratov et al. 2024). Our own generators, not the papers' code or data.

Every example is a document (filler text with the task's pieces between its sentences) and a question asked
after it. `length` is in tokens of the given tokenizer: the document and the prompt together take at most
`length` tokens and fill them up to the last filler word that fits. The filler is a book (`filler="natural"`:
`text`, default the bundled excerpt) or RULER's noise, the same few sentences over and over
(`filler="synthetic"`); pieces go between whole sentences at random depths, as the papers insert them.

Columns:
    task, length            the task name and the length asked for (tokens)
    document                the text read before the question (plain text, no template)
    question                the question in words
    prompt                  what the model is asked in a fresh call: the question as a user turn of the
                            tokenizer's chat template when it has one, else "Question: ...\\nAnswer:" with the
                            start of the answer (as RULER prompts base models)
    answers                 the expected strings (RULER: all of them must appear; bAbI: one word)
    scoring                 "all" (the share of `answers` found in the reply) or "word" (the first candidate
                            word the reply names must be the answer)
    choices                 bAbI: the candidate words (every place of the story's world); RULER: []
    depths                  where each inserted piece starts, as the share of the document's characters before it
    document_tokens, prompt_tokens   their lengths in tokens (add_special_tokens=False)
    max_new_tokens          how many tokens the answer may take (greedy generation)
"""

from __future__ import annotations

import itertools
import re
import zlib

import numpy as np

from .bundled import default_text
from .chat_passkey import draw_key, draw_names
from .layout import SYNTHETIC_FILLER, check_positive_int, to_dataset

RULER_TASKS = (
    "niah_single_noise",
    "niah_single_book",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
)
BABILONG_TASKS = ("qa1", "qa2", "qa3")
SUITES = {"ruler": RULER_TASKS, "babilong": BABILONG_TASKS}
# room for the answer, in generated tokens (the lm-eval task YAMLs use the same: `max_gen_toks`)
MAX_NEW_TOKENS = {
    "niah_single_noise": 32,
    "niah_single_book": 32,
    "niah_multikey": 32,
    "niah_multivalue": 96,
    "niah_multiquery": 64,
    "variable_tracking": 48,
    "qa1": 16,
    "qa2": 16,
    "qa3": 16,
}
DEFAULT_EXAMPLES = 20  # per task and length (the suite's and the lm-eval tasks' default)
DEFAULT_LENGTHS = (4096, 16384)
MAGIC_DIGITS = 7  # RULER's needle values are 7-digit numbers

ACTORS = ("Mary", "John", "Sandra", "Daniel", "Fred", "Bill", "Julie", "Jeff")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKE_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
BABI_FACTS = {"qa1": 8, "qa2": 12, "qa3": 16}  # story sentences per example (bAbI's stories are as short)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LENGTH = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_length(value) -> int:
    """`4k` -> 4096, `1m` -> 1048576, `3000` -> 3000 (tokens)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = _LENGTH.match(str(value))
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"length {value!r} is not a positive number of tokens; write e.g. 4096, 4k or 1m.")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]


def suite_tasks(suites) -> list[str]:
    """The task names of the named suites ("ruler", "babilong") or single tasks, in order, each once."""
    tasks = []
    for name in [suites] if isinstance(suites, str) else suites:
        if name in SUITES:
            tasks.extend(SUITES[name])
        elif name in MAX_NEW_TOKENS:
            tasks.append(name)
        else:
            raise ValueError(f"unknown suite or task {name!r}; choose from {[*SUITES, *MAX_NEW_TOKENS]}.")
    return list(dict.fromkeys(tasks))


def make_long_context_dataset(
    task: str,
    tokenizer,
    lengths,
    num_examples: int = DEFAULT_EXAMPLES,
    seed: int = 0,
    filler: str | None = None,
    text: str | None = None,
):
    """`num_examples` examples of `task` at each of `lengths` (tokens of `tokenizer`), as a `datasets.Dataset`.

    The examples of one (task, length) come from their own seeded stream, so asking for fewer examples gives
    the first ones of a longer run, and adding a length changes no other length's examples.

    Args:
        filler: "natural" (book text) or "synthetic" (RULER's repeated noise sentences); default: noise for
            niah_single_noise and variable_tracking (as in RULER), the book for the others.
        text: the book for natural filler (default: the bundled excerpt).
    """
    if task not in MAX_NEW_TOKENS:
        raise ValueError(f"unknown long-context task {task!r}; choose from {list(MAX_NEW_TOKENS)}.")
    check_positive_int("num_examples", num_examples)
    lengths = [parse_length(length) for length in ([lengths] if isinstance(lengths, (int, str)) else lengths)]
    haystack = task_haystack(Haystack(tokenizer, default_filler(task) if filler is None else filler, text), task)
    build = _BUILDERS[task]
    rows = []
    for length in lengths:
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), length])
        for _ in range(num_examples):
            question, answer_prefix, pieces, answers, choices = build(rng, haystack)
            prompt = question_prompt(tokenizer, question, answer_prefix)
            document, depths = haystack.document(rng, pieces, length - haystack.count(prompt), task, length)
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "document": document,
                    "question": question,
                    "prompt": prompt,
                    "answers": answers,
                    "scoring": "word" if task in BABILONG_TASKS else "all",
                    "choices": choices,
                    "depths": depths,
                    "document_tokens": haystack.count(document),
                    "prompt_tokens": haystack.count(prompt),
                    "max_new_tokens": MAX_NEW_TOKENS[task],
                }
            )
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


def default_filler(task: str) -> str:
    """RULER's noise for the single needle in noise and for variable tracking, the book for the other tasks."""
    return "synthetic" if task in ("niah_single_noise", "variable_tracking") else "natural"


def task_haystack(haystack: Haystack, task: str) -> Haystack:
    """The filler `task` draws from: for bAbI, the sentences that name none of the story's people, places and
    objects."""
    return haystack.without([*ACTORS, *PLACES, *OBJECTS]) if task in BABILONG_TASKS else haystack


def draw_task(task: str, rng, haystack: Haystack) -> tuple[str, str, list[str], list[str], list[str]]:
    """One draw of `task`: (question, answer prefix, the sentences to insert in the document, expected answers,
    candidate words (bAbI's places; RULER: []))."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown long-context task {task!r}; choose from {list(_BUILDERS)}.")
    return _BUILDERS[task](rng, haystack)


def question_prompt(tokenizer, question: str, answer_prefix: str = "") -> str:
    """The question as asked in a fresh call: a user turn of the chat template, or a plain-text question with
    the start of the answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:" + (f" {answer_prefix}" if answer_prefix else "")


def _words(text: str) -> set[str]:
    """The words (lower case) and numbers of `text`."""
    return set(re.findall(r"[A-Za-z]+", text.lower())) | set(re.findall(r"\d+", text))


class Haystack:
    """Filler sentences of a text and their token counts, to build documents of a given length."""

    def __init__(self, tokenizer, filler: str = "natural", text: str | None = None):
        if filler == "natural":
            text = default_text() if text is None else text
        elif filler == "synthetic":
            text = SYNTHETIC_FILLER
        else:
            raise ValueError(f"filler={filler!r} is unknown; choose 'natural' (book text) or 'synthetic' (noise).")
        sentences = [s for s in _SENTENCE_END.split(" ".join(str(text).split())) if s]
        if not sentences:
            raise ValueError("the filler text is empty: pass a non-empty text= (or filler='synthetic').")
        self.tokenizer = tokenizer
        self.filler = filler
        self.units = [" " + sentence for sentence in sentences]
        known = {}
        self.counts = [known.setdefault(unit, self.count(unit)) for unit in self.units]
        self.words = _words(text)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def without(self, words) -> Haystack:
        """The same filler less its sentences that name any of `words` (whole words, any case): books name
        gardens and Marys, and a bAbI answer must come from the story alone."""
        named = re.compile(r"\b(?:" + "|".join(re.escape(word) for word in words) + r")\b", re.IGNORECASE)
        kept = [i for i, unit in enumerate(self.units) if not named.search(unit)]
        if not kept:
            raise ValueError(f"every sentence of the filler names one of {list(words)}: use another text.")
        copy = object.__new__(Haystack)
        copy.tokenizer, copy.filler = self.tokenizer, self.filler
        copy.units, copy.counts = [self.units[i] for i in kept], [self.counts[i] for i in kept]
        copy.words = _words(" ".join(copy.units))
        return copy

    def absent(self, word: str) -> bool:
        """Whether `word` (a name, a place, a number) never occurs in the filler as a word."""
        return word.lower() not in self.words

    def document(self, rng, pieces: list[str], budget: int, task: str, length: int) -> tuple[str, list[float]]:
        """Filler of at most `budget` tokens with `pieces` (sentences, in this order) between its sentences at
        random depths; returns the text and each piece's depth."""
        pieces = [" " + piece.strip() for piece in pieces]
        room = budget - sum(self.count(piece) for piece in pieces)
        if room < 1:
            raise ValueError(
                f"{task}: length {length} leaves no room for filler: the question and the task's sentences take "
                f"{length - room} tokens. Use a longer length (at least {length - room + 64} is sensible)."
            )
        start = int(rng.integers(len(self.units)))
        depths = np.sort(rng.random(len(pieces)))
        while True:  # the counts of separate pieces may differ from the whole text's by a token: check it
            filler, counts = self._fill(start, room)
            # each piece goes to the sentence boundary nearest its depth in tokens
            slots = np.searchsorted(np.cumsum([0, *counts]), depths * sum(counts), side="right") - 1
            parts, offsets, length_so_far = [], [], 0
            for index, unit in enumerate([*filler, ""]):
                for piece_index in np.flatnonzero(slots == index):
                    offsets.append(length_so_far)
                    parts.append(pieces[piece_index])
                    length_so_far += len(pieces[piece_index])
                parts.append(unit)
                length_so_far += len(unit)
            text = "".join(parts)
            lead = len(text) - len(text.lstrip())
            text = text.strip()
            over = self.count(text) - budget
            if over <= 0:
                return text, [round(max(offset - lead, 0) / len(text), 4) for offset in offsets]
            room -= over

    def _fill(self, start: int, room: int) -> tuple[list[str], list[int]]:
        """Filler sentences from sentence `start` on (wrapping around) up to `room` tokens, with their counts;
        of the first sentence that does not fit whole, the words that do."""
        units, counts, used, index = [], [], 0, start
        while True:
            unit, count = self.units[index % len(self.units)], self.counts[index % len(self.units)]
            if used + count > room:
                break
            units.append(unit)
            counts.append(count)
            used += count
            index += 1
        taken, last = [], 0
        for word in unit.split(" ")[1:]:
            count = self.count(" " + word)
            if used + last + count > room:
                break
            taken.append(word)
            last += count
        if taken:  # one unit, so that a piece never lands between its words
            units.append(" " + " ".join(taken))
            counts.append(last)
        return units, counts


# -- RULER --------------------------------------------------------------------------------------------------
def magic_sentence(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _values(rng, haystack: Haystack, count: int, digits: int = MAGIC_DIGITS) -> list[str]:
    """`count` distinct numbers that the filler never holds."""
    values = []
    while len(values) < count:
        value = draw_key(rng, digits)
        if value not in values and haystack.absent(value):
            values.append(value)
    return values


def _niah(rng, haystack, needles: int, asked: int, same_key: bool = False):
    keys = draw_names(rng, 1) * needles if same_key else draw_names(rng, needles)
    values = _values(rng, haystack, needles)
    pieces = [magic_sentence(key, value) for key, value in zip(keys, values)]
    order = rng.permutation(needles)  # the asked needle(s) anywhere among the others
    pieces = [pieces[i] for i in order]
    if same_key:
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the text?"
        return question, f"The special magic numbers for {keys[0]} are", pieces, values, []
    chosen = sorted(int(i) for i in rng.choice(needles, size=asked, replace=False))
    if asked == 1:
        key = keys[chosen[0]]
        question = f"What is the special magic number for {key} mentioned in the text?"
        return question, f"The special magic number for {key} is", pieces, [values[chosen[0]]], []
    named = " and ".join(keys[i] for i in chosen)
    question = f"What are the special magic numbers for {named} mentioned in the text?"
    return question, f"The special magic numbers for {named} are", pieces, [values[i] for i in chosen], []


def _variable_tracking(rng, haystack, hops: int = 4, chains: int = 1):
    """A chain `VAR A = 12345.`, `VAR B = A.`, ... (and `chains - 1` other chains of other values), the
    assignments of all chains interleaved in order; every variable of the first chain is asked for."""
    names = []
    while len(names) < chains * (hops + 1):
        name = "".join(chr(ord("A") + int(i)) for i in rng.integers(26, size=5))
        if name not in names and haystack.absent(name):
            names.append(name)
    values = _values(rng, haystack, chains, digits=5)
    sentences = []
    for chain in range(chains):
        own = names[chain * (hops + 1) : (chain + 1) * (hops + 1)]
        steps = [f"VAR {own[0]} = {values[chain]}."] + [f"VAR {b} = {a}." for a, b in itertools.pairwise(own)]
        sentences.append(steps)
    # interleave the chains at random, each in its own order
    pieces, made = [], [0] * chains
    for chain in rng.permutation(np.repeat(np.arange(chains), hops + 1)):
        pieces.append(sentences[chain][made[chain]])
        made[chain] += 1
    question = f"Which variables are assigned the value {values[0]}, directly or through other variables?"
    return question, f"The variables assigned the value {values[0]} are:", pieces, names[: hops + 1], []


# -- BABILong -----------------------------------------------------------------------------------------------
def _vocabulary(haystack: Haystack, words, least: int, kind: str) -> list[str]:
    """The words absent from the filler (so that the filler never names an answer or a person asked about)."""
    kept = [word for word in words if haystack.absent(word)]
    if len(kept) < least:
        raise ValueError(
            f"the filler text names too many of the story's {kind} ({', '.join(w for w in words if w not in kept)}); "
            f"at least {least} of {list(words)} must be absent from it. Use another text."
        )
    return kept


def _story(rng, haystack, facts: int, carry: bool):
    """A bAbI world run for `facts` sentences: people move between places (and, with `carry`, pick up and drop
    objects, which go where their holder goes). Returns the sentences and the world's history."""
    actors = _vocabulary(haystack, ACTORS, 4, "people")
    actors = [actors[i] for i in rng.choice(len(actors), size=4, replace=False)]
    places = _vocabulary(haystack, PLACES, 4, "places")
    objects = _vocabulary(haystack, OBJECTS, 1, "objects")
    where = dict.fromkeys(actors)
    holder = dict.fromkeys(objects)
    trail = {thing: [] for thing in [*actors, *objects]}  # places in order, each change once
    sentences = []
    for _ in range(facts):
        takeable = [(a, o) for a in actors for o in objects if where[a] and holder[o] is None]
        takeable = [(a, o) for a, o in takeable if not trail[o] or trail[o][-1] == where[a]]
        droppable = [(holder[o], o) for o in objects if holder[o] is not None]
        roll = rng.random()
        if carry and takeable and roll < 0.3:
            actor, thing = takeable[int(rng.integers(len(takeable)))]
            holder[thing] = actor
            if not trail[thing]:
                trail[thing].append(where[actor])
            sentences.append(f"{actor} {TAKE_VERBS[int(rng.integers(len(TAKE_VERBS)))]} the {thing}.")
        elif carry and droppable and roll < 0.45:
            actor, thing = droppable[int(rng.integers(len(droppable)))]
            holder[thing] = None
            sentences.append(f"{actor} {DROP_VERBS[int(rng.integers(len(DROP_VERBS)))]} the {thing}.")
        else:
            actor = actors[int(rng.integers(len(actors)))]
            choices = [p for p in places if p != where[actor]]  # a move changes the place
            place = choices[int(rng.integers(len(choices)))]
            where[actor] = place
            trail[actor].append(place)
            for thing in objects:
                if holder[thing] == actor:
                    trail[thing].append(place)
            sentences.append(f"{actor} {MOVE_VERBS[int(rng.integers(len(MOVE_VERBS)))]} the {place}.")
    return sentences, trail, places, actors, objects


def _babi(task: str):
    def build(rng, haystack):
        while True:  # a story whose question is well posed (rare redraws)
            sentences, trail, places, actors, objects = _story(rng, haystack, BABI_FACTS[task], task != "qa1")
            if task == "qa1":
                asked = [a for a in actors if trail[a]]
                if asked:
                    person = asked[int(rng.integers(len(asked)))]
                    question, answer = f"Where is {person}?", trail[person][-1]
                    break
            elif task == "qa2":  # the object was carried: where it was taken and where its holder went
                asked = [o for o in objects if len(trail[o]) >= 2]
                if asked:
                    thing = asked[int(rng.integers(len(asked)))]
                    question, answer = f"Where is the {thing}?", trail[thing][-1]
                    break
            else:  # qa3: where the object was before the place it is in now (a place it has not been before)
                asked = [o for o in objects if len(trail[o]) >= 2 and trail[o][-1] not in trail[o][:-1]]
                if asked:
                    thing = asked[int(rng.integers(len(asked)))]
                    question = f"Where was the {thing} before the {trail[thing][-1]}?"
                    answer = trail[thing][-2]
                    break
        question += " Answer with one word, the place."
        return question, "", sentences, [answer], list(places)

    return build


_BUILDERS = {
    "niah_single_noise": lambda rng, haystack: _niah(rng, haystack, 1, 1),
    "niah_single_book": lambda rng, haystack: _niah(rng, haystack, 1, 1),
    "niah_multikey": lambda rng, haystack: _niah(rng, haystack, 4, 1),
    "niah_multivalue": lambda rng, haystack: _niah(rng, haystack, 4, 4, same_key=True),
    "niah_multiquery": lambda rng, haystack: _niah(rng, haystack, 4, 2),
    "variable_tracking": _variable_tracking,
    **{task: _babi(task) for task in BABILONG_TASKS},
}


def score_reply(reply: str, answers, scoring: str = "all", choices=()) -> float:
    """RULER ("all"): the share of the expected strings found in the reply (case-insensitive). bAbI ("word"):
    1 when the first of the candidate words that the reply names is the answer, else 0."""
    text = reply.lower()
    if scoring == "all":
        return sum(str(answer).lower() in text for answer in answers) / len(answers)
    if scoring == "word":
        named = [
            (m.start(), m.group()) for word in choices for m in re.finditer(rf"\b{re.escape(word.lower())}\b", text)
        ]
        return float(bool(named) and min(named)[1] == str(answers[0]).lower())
    raise ValueError(f"scoring={scoring!r} is unknown; use 'all' (RULER) or 'word' (bAbI).")


__all__ = [
    "BABILONG_TASKS",
    "DEFAULT_EXAMPLES",
    "DEFAULT_LENGTHS",
    "MAX_NEW_TOKENS",
    "RULER_TASKS",
    "SUITES",
    "Haystack",
    "default_filler",
    "draw_task",
    "make_long_context_dataset",
    "parse_length",
    "question_prompt",
    "score_reply",
    "suite_tasks",
    "task_haystack",
]
