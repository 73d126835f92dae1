"""Pass keys asked in chat, from 16k to a million tokens back: the curve of a pretrained model with memory.

Each example is a document read into memory (its own first segments, holding the needle or needles, then a
haystack of held-out text) and a chat question asked in a fresh call with the model's chat template; the answer
is generated greedily and scored by its first number (exact match of the key). Beside the memory model:

  * memory disabled: the same weights with memory off. The question is asked in a fresh call, so the model
    sees the question alone: one answer per example serves every distance.
  * base model: the pretrained model without memory, given the document in the user turn of its chat, cut to
    its window (the last `base_window` tokens of document and question). Beyond the window a few examples
    show what it does; inside it (`base_inside_tokens`), `base_inside_examples` say how well it does unaided.

The haystack is read once (`SharedHaystack`): examples differ in their first segments only, and the state of
each equals reading it whole (`tests/test_shared_haystack.py`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_memlm.data.chat_passkey import chat_prompt_ids, draw_key, draw_names, needle_text, question_text
from hf_memlm.data.layout import encode

from .retrieval import describe_model
from .shared_haystack import SharedHaystack

HEAD_SEGMENTS = 4  # the examples' own segments before the haystack (room for 4 needles, one per segment)
MEMORY, MEMORY_DISABLED, BASE_MODEL = "memory", "memory_disabled", "base_model"
LABELS = {MEMORY: "with memory", MEMORY_DISABLED: "memory disabled", BASE_MODEL: "base model"}
_NUMBER = re.compile(r"\d+")


@dataclass
class ChatPasskeySettings:
    distances: list[int] = field(default_factory=lambda: [16384, 65536, 262144, 1048576])  # haystack tokens
    num_examples: list[int] = field(default_factory=lambda: [100, 100, 50, 20])  # per distance
    multi_needle_distances: list[int] = field(default_factory=lambda: [65536])  # 4 named needles, one asked
    multi_needle_examples: int = 100
    base_window: int = 8192  # the base model's window (its max_position_embeddings)
    base_beyond_examples: int = 3  # base-model examples per distance beyond its window
    base_inside_tokens: int = 4096  # a document inside the base model's window ...
    base_inside_examples: int = 100  # ... this many examples of it
    max_new_tokens: int = 24
    seed: int = 1000

    @classmethod
    def memory_only(cls, distances: list[int], examples: int | list[int], **settings) -> ChatPasskeySettings:
        """`examples` single-needle examples per distance (one count, or one per distance), read with memory only:
        no base model, and no named needles unless `settings` asks for them (`multi_needle_distances`)."""
        only_memory = {"multi_needle_distances": [], "base_beyond_examples": 0, "base_inside_examples": 0}
        return cls(
            distances=list(distances),
            num_examples=[examples] * len(distances) if isinstance(examples, int) else list(examples),
            **{**only_memory, **settings},
        )

    def plan(self) -> list[tuple[int, int, int]]:
        """(distance, examples, needles) in the order the evaluation draws its examples."""
        plan = [(d, n, 1) for d, n in zip(self.distances, self.num_examples)]
        return plan + [(d, self.multi_needle_examples, 4) for d in self.multi_needle_distances]

    def __post_init__(self):
        if len(self.num_examples) != len(self.distances):
            raise ValueError(f"num_examples ({self.num_examples}) must give one count per distance ({self.distances}).")
        for name in ("distances", "num_examples", "multi_needle_distances"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}.")


def first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return match.group() if match else None


def evaluate_chat_passkey(model, tokenizer, text: str, settings: ChatPasskeySettings, progress: bool = True) -> dict:
    """Run the curve on `text` (held-out filler); returns the results (see `format_chat_passkey`)."""
    model.eval()
    segment = model.config.segment_length
    rng = np.random.default_rng(settings.seed)
    distances = sorted({_whole_segments(d, segment) for d in [*settings.distances, *settings.multi_needle_distances]})
    filler, haystack = held_out_haystack(tokenizer, text, rng, segment, max(distances, default=0))
    say = _printer(progress)
    started = time.perf_counter()
    if distances:  # none when only the base model inside its window is asked for
        say(f"reading the haystack: {len(haystack):,} tokens into memory (once, shared by every example)")
        shared = SharedHaystack(model, torch.from_numpy(haystack), HEAD_SEGMENTS, lengths=distances)
    seconds = {"read_haystack": round(time.perf_counter() - started, 1)}

    answers, disabled_cache = [], {}
    started = time.perf_counter()
    for distance, count, needles in settings.plan():
        tokens = _whole_segments(distance, segment)
        for number in range(count):
            example = draw_example(rng, tokenizer, filler, segment, needles)
            state = shared.state(torch.from_numpy(example["head"]), tokens)
            prompt = chat_prompt_ids(tokenizer, example["name"])
            reply = _generate(model, tokenizer, prompt, settings.max_new_tokens, memory_state=state)
            record = {
                "distance": distance,
                "needles": needles,
                "distance_tokens": int(HEAD_SEGMENTS * segment - example["key_position"] + tokens + len(prompt)),
                "key": example["key"],
                "name": example["name"],
                "other_keys": example["other_keys"],  # the other needles' (named needles)
                MEMORY: reply,
            }
            # memory disabled sees the question alone: the same answer at every distance
            cache_key = example["name"]
            if cache_key not in disabled_cache:
                with model.disable_memory():
                    disabled_cache[cache_key] = _generate(model, tokenizer, prompt, settings.max_new_tokens)
            record[MEMORY_DISABLED] = disabled_cache[cache_key]
            if needles == 1 and number < settings.base_beyond_examples:
                document = np.concatenate([example["head"], haystack[:tokens]])
                record[BASE_MODEL] = _base_answer(model, tokenizer, document, example["name"], settings)
            answers.append(record)
            say(f"  {needles} needle(s), {distance:,} tokens back: example {number + 1}/{count}: {reply!r}")
    seconds["memory_examples"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    inside = []
    for number in range(settings.base_inside_examples):
        example = draw_example(rng, tokenizer, filler, segment, 1)
        start = int(rng.integers(len(filler)))
        document = _wrapped(filler, start, settings.base_inside_tokens)
        depth = int(rng.integers(0, len(document) - len(example["needle"])))
        document[depth : depth + len(example["needle"])] = example["needle"]
        answer = _base_answer(model, tokenizer, document, "", settings, key_name=example["name"])
        inside.append({"key": example["key"], "name": example["name"], BASE_MODEL: answer, "depth": depth})
        say(f"  base model inside its window ({settings.base_inside_tokens:,} tokens): {number + 1}: {answer!r}")
    seconds["base_inside_window"] = round(time.perf_counter() - started, 1)

    for record in [*answers, *inside]:
        for condition in (MEMORY, MEMORY_DISABLED, BASE_MODEL):
            if condition in record:
                record[f"{condition}_correct"] = first_number(record[condition]) == record["key"]
    return {
        "kind": "chat_passkey",
        "task": "chat_passkey",
        "segment_length": segment,
        "settings": settings.__dict__,
        "rows": _rows(answers),
        "base_inside_window": _inside_row(inside, settings),
        "chance": 1 / 90000,
        "seconds": seconds,
        "model": describe_model(model),
        "answers": answers,
        "base_inside_answers": inside,
        "method": (
            "document read into memory (its own 4 segments, then a shared haystack of held-out text), the question "
            "asked in a fresh call with the chat template, greedy generation; correct when the first number of the "
            "answer is the key"
        ),
    }


def held_out_haystack(tokenizer, text: str, rng, segment: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`text`'s tokens (the filler examples' heads are drawn from) and the haystack: `tokens` of them from a random
    place, the text repeated where it is shorter. The first draw of `rng`, as the evaluation makes it."""
    filler = encode(tokenizer, text)
    if len(filler) < 2 * HEAD_SEGMENTS * segment:
        raise ValueError(
            f"the held-out text has {len(filler)} tokens; it needs at least {2 * HEAD_SEGMENTS * segment}."
        )
    return filler, _wrapped(filler, int(rng.integers(len(filler))), tokens)


def _whole_segments(tokens: int, segment: int) -> int:
    return -(-tokens // segment) * segment


def _wrapped(tokens: np.ndarray, start: int, length: int) -> np.ndarray:
    return tokens[(start + np.arange(length)) % len(tokens)]


def draw_example(rng, tokenizer, filler: np.ndarray, segment: int, needles: int) -> dict:
    """The example's own head: HEAD_SEGMENTS segments of held-out text with its needle(s); one needle per
    segment (a single needle in the last head segment, nearest the haystack)."""
    head = _wrapped(filler, int(rng.integers(len(filler))), HEAD_SEGMENTS * segment).copy()
    names = draw_names(rng, needles) if needles > 1 else [""]
    keys = []
    while len(keys) < needles:
        key = draw_key(rng)
        if key not in keys:
            keys.append(key)
    asked = int(rng.integers(needles))
    segments = range(HEAD_SEGMENTS - needles, HEAD_SEGMENTS)
    result = {}
    for number, (key, name, index) in enumerate(zip(keys, names, segments)):
        ids = encode(tokenizer, needle_text(key, name))
        start = index * segment + int(rng.integers(0, segment - len(ids)))
        head[start : start + len(ids)] = ids
        if number == asked:
            result = {"key": key, "name": name, "key_position": start, "needle": ids}
    return {**result, "head": head, "other_keys": [key for key in keys if key != result["key"]]}


def _generate(model, tokenizer, prompt: list[int], max_new_tokens: int, **kwargs) -> str:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **kwargs,
        )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def _base_answer(model, tokenizer, document: np.ndarray, name: str, settings, key_name: str | None = None) -> str:
    """The base model alone, the document in its user turn, cut to its window (the document's last tokens)."""
    asked = name if key_name is None else key_name
    question = question_text(asked)
    overhead = len(_chat_ids(tokenizer, "\n\n" + question))
    room = settings.base_window - overhead - settings.max_new_tokens
    document = document[-room:]
    ids = _chat_ids(tokenizer, tokenizer.decode(document.tolist()) + "\n\n" + question)
    ids = ids[-(settings.base_window - settings.max_new_tokens) :]
    base = model.language_model  # no memory call is active: the hooks leave it as it was pretrained
    with torch.no_grad():
        out = base.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def _chat_ids(tokenizer, content: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _rows(answers: list[dict]) -> list[dict]:
    rows = []
    for distance, needles in dict.fromkeys((a["distance"], a["needles"]) for a in answers):
        group = [a for a in answers if a["distance"] == distance and a["needles"] == needles]
        row = {
            "distance": distance,
            "needles": needles,
            "examples": len(group),
            "distance_tokens": [min(a["distance_tokens"] for a in group), max(a["distance_tokens"] for a in group)],
        }
        for condition in (MEMORY, MEMORY_DISABLED, BASE_MODEL):
            scored = [a[f"{condition}_correct"] for a in group if f"{condition}_correct" in a]
            row[condition] = sum(scored) / len(scored) if scored else None
            row[f"{condition}_examples"] = len(scored)
        # a miss among named needles that answers another needle's key: the read found a needle, not the one asked
        row["memory_other_needle"] = sum(first_number(a[MEMORY]) in a.get("other_keys", ()) for a in group) / len(group)
        # a miss by one digit: the read found the key, then mixed in a digit from elsewhere
        row["memory_one_digit_off"] = sum(_one_digit_off(first_number(a[MEMORY]), a["key"]) for a in group) / len(group)
        rows.append(row)
    return rows


def _one_digit_off(answer: str | None, key: str) -> bool:
    return answer is not None and len(answer) == len(key) and sum(a != b for a, b in zip(answer, key)) == 1


def _inside_row(inside: list[dict], settings) -> dict:
    scored = [a[f"{BASE_MODEL}_correct"] for a in inside]
    return {
        "tokens": settings.base_inside_tokens,
        "examples": len(scored),
        BASE_MODEL: sum(scored) / len(scored) if scored else None,
    }


def _printer(progress: bool):
    # flushed: a long evaluation writing to a file (nohup, a CI log) shows where it is
    return (lambda *args: print(*args, flush=True)) if progress else (lambda *args: None)


def format_chat_passkey(results: dict) -> str:
    """The curve as Markdown."""
    model = results["model"]
    lines = [
        f"# Pass key asked in chat: {model.get('memory_type', '?')} memory on a {model.get('base_model_type', '?')} "
        f"base, segments of {results['segment_length']}",
        "",
        "| needles | key this far back (tokens) | examples | with memory | memory disabled | base model (own window) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        base = row[BASE_MODEL]
        base_cell = "–" if base is None else f"{base:.3f} ({row[f'{BASE_MODEL}_examples']} ex.)"
        low, high = row["distance_tokens"]
        lines.append(
            f"| {row['needles']} | {low:,}–{high:,} | {row['examples']} | **{row[MEMORY]:.3f}** | "
            f"{row[MEMORY_DISABLED]:.3f} | {base_cell} |"
        )
    for row in results["rows"]:
        if row["needles"] > 1 and "memory_other_needle" in row:
            lines += [
                "",
                f"Among {row['needles']} named needles, {row['distance']:,} tokens back: the answer was another "
                f"needle's key in {row['memory_other_needle']:.3f} of the examples"
                + (
                    f", the key with one digit wrong in {row['memory_one_digit_off']:.3f}"
                    if "memory_one_digit_off" in row
                    else ""
                )
                + ".",
            ]
    inside = results["base_inside_window"]
    if inside["examples"]:
        lines += [
            "",
            f"Base model inside its window ({inside['tokens']:,}-token document, the needle at a random depth, "
            f"{inside['examples']} examples): **{inside[BASE_MODEL]:.3f}**.",
        ]
    seconds = results["seconds"]
    lines += [
        "",
        f"Exact match of the key (the first number of the greedy answer); chance {results['chance']:.1e}. "
        f"Haystack read in {seconds['read_haystack']} s; memory-model examples {seconds['memory_examples']} s; "
        f"base model inside its window {seconds['base_inside_window']} s.",
        "",
        f"Method: {results['method']}.",
    ]
    return "\n".join(lines) + "\n"


def plot_chat_passkey(results: dict, path):
    """The single-needle curve by distance (`write_report` writes it as `chat_passkey.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["rows"] if row["needles"] == 1]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for condition, style in ((MEMORY, "o-"), (MEMORY_DISABLED, "s--"), (BASE_MODEL, "^:")):
        points = [(row["distance"], row[condition]) for row in rows if row[condition] is not None]
        if points:
            axis.plot(*zip(*points), style, label=LABELS[condition])
    inside = results["base_inside_window"]
    if inside["examples"]:
        axis.plot(
            [inside["tokens"]],
            [inside[BASE_MODEL]],
            "^",
            color="C2",
            markersize=9,
            label="base model, inside its window",
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("tokens between the key and the question")
    axis.set_ylabel("exact match")
    axis.set_ylim(-0.03, 1.03)
    axis.grid(alpha=0.3)
    axis.legend(loc="center left")
    axis.set_title("Pass key asked in chat")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = [
    "HEAD_SEGMENTS",
    "ChatPasskeySettings",
    "draw_example",
    "evaluate_chat_passkey",
    "first_number",
    "format_chat_passkey",
    "held_out_haystack",
    "plot_chat_passkey",
]
