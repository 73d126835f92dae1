"""The long-context suite: RULER and BABILong tasks generated offline (formats, lengths in tokens, seeds, the
answer present once, noise and book filler), their scoring, and `hf-memlm eval --suite`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_chat_kv_model

from hf_memlm.cli import main
from hf_memlm.data import build_tokenizer, default_text
from hf_memlm.data.layout import SYNTHETIC_FILLER
from hf_memlm.data.long_context import (
    BABILONG_TASKS,
    DROP_VERBS,
    MAX_NEW_TOKENS,
    MOVE_VERBS,
    RULER_TASKS,
    TAKE_VERBS,
    make_long_context_dataset,
    parse_length,
    question_prompt,
    score_reply,
    suite_tasks,
)
from hf_memlm.evaluation.suite import (
    BASE_MODEL,
    MEMORY,
    MEMORY_DISABLED,
    SuiteSettings,
    answer_from_memory,
    base_model_answer,
    encode_text,
    evaluate_suite,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ALL_TASKS = [*RULER_TASKS, *BABILONG_TASKS]
LENGTH = 1024  # byte tokens: room for qa3's 16 story sentences


@pytest.fixture(scope="module")
def byte_tokenizer():
    return build_tokenizer("byte")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_tokenizer("byte")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _count(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _resolve_babi(document: str, question: str) -> str:
    """Replay the story sentences of a document and answer the question: a second reading of the world."""
    verbs = "|".join(re.escape(v) for v in (*MOVE_VERBS, *TAKE_VERBS, *DROP_VERBS))
    where, holder, trail = {}, {}, {}
    for actor, verb, thing in re.findall(rf"\b([A-Z][a-z]+) ({verbs}) the ([a-z]+)\.", document):
        if verb in MOVE_VERBS:
            where[actor] = thing
            trail.setdefault(actor, []).append(thing)
            for item, person in holder.items():
                if person == actor:
                    trail[item].append(thing)
        elif verb in TAKE_VERBS:
            holder[thing] = actor
            trail.setdefault(thing, []) or trail[thing].append(where[actor])
        else:
            holder[thing] = None
    if match := re.match(r"Where is the (\w+)\?", question):
        return trail[match.group(1)][-1]
    if match := re.match(r"Where is (\w+)\?", question):
        return where[match.group(1)]
    thing, place = re.match(r"Where was the (\w+) before the (\w+)\?", question).groups()
    return trail[thing][trail[thing].index(place) - 1]


def _resolve_variables(document: str, value: str) -> set[str]:
    assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", document))

    def final(name):
        while assigned.get(name) in assigned:
            name = assigned[name]
        return assigned.get(name)

    return {name for name in assigned if final(name) == value}


@pytest.mark.parametrize("task", ALL_TASKS)
def test_each_task_holds_its_answer_once_and_answers_its_question(task, byte_tokenizer):
    data = make_long_context_dataset(task, byte_tokenizer, LENGTH, num_examples=3, seed=4)
    assert len(data) == 3 and set(data["task"]) == {task} and set(data["length"]) == {LENGTH}
    for example in data:
        document, question, answers = example["document"], example["question"], example["answers"]
        assert example["prompt"].startswith(f"Question: {question}\nAnswer:")  # a plain tokenizer: a plain prompt
        assert example["max_new_tokens"] == MAX_NEW_TOKENS[task]
        assert len(example["depths"]) >= 1 and all(0 <= d <= 1 for d in example["depths"])
        assert example["depths"] == sorted(example["depths"])
        if task.startswith("niah"):
            assert example["scoring"] == "all" and example["choices"] == []
            key = re.search(r"numbers? for (.+?) mentioned", question).group(1).split(" and ")
            for value in answers:  # each value once, in its own needle naming an asked key
                assert len(value) == 7 and document.count(value) == 1
                assert re.search(rf"The special magic number for ({'|'.join(key)}) is {value}\.", document)
            expected = {"niah_multivalue": 4, "niah_multiquery": 2}.get(task, 1)
            assert len(answers) == expected
            needles = len(re.findall(r"The special magic number for", document))
            assert needles == (1 if task.startswith("niah_single") else 4)
        elif task == "variable_tracking":
            value = re.search(r"the value (\d+)", question).group(1)
            assert document.count(f"= {value}.") == 1 and len(answers) == 5
            assert _resolve_variables(document, value) == set(answers)
            assert all(document.count(f"VAR {name} =") == 1 for name in answers)
        else:
            assert example["scoring"] == "word" and len(answers) == 1 and answers[0] in example["choices"]
            assert _resolve_babi(document, question) == answers[0]
            # the filler never names a place, a person or an object of the story: only the facts do
            verbs = "|".join(map(re.escape, (*MOVE_VERBS, *TAKE_VERBS, *DROP_VERBS)))
            facts = re.compile(rf"\b[A-Z][a-z]+ (?:{verbs}) the [a-z]+\.")
            rest = facts.sub(" ", document).lower()
            assert not any(re.search(rf"\b{word}\b", rest) for word in example["choices"])
            subject = re.match(r"Where (?:is|was) (?:the )?(\w+)", question).group(1).lower()
            assert not re.search(rf"\b{subject}\b", rest)


@pytest.mark.parametrize("length", [300, 700, LENGTH, 3000])
def test_lengths_are_in_tokens_and_filled(length, byte_tokenizer):
    for task in ("niah_single_book", "niah_single_noise", "qa1"):
        if task == "qa1" and length < 700:
            continue
        for example in make_long_context_dataset(task, byte_tokenizer, length, num_examples=4, seed=1):
            document, prompt = _count(byte_tokenizer, example["document"]), _count(byte_tokenizer, example["prompt"])
            assert (document, prompt) == (example["document_tokens"], example["prompt_tokens"])
            assert length - 40 <= document + prompt <= length  # up to the last filler word that fits


def test_lengths_in_tokens_of_a_subword_tokenizer():
    pytest.importorskip("gguf", reason="the shipped SmolLM2 tokenizer is read from its GGUF file")
    from hf_memlm.integrations.gguf import load_base_tokenizer

    tokenizer = load_base_tokenizer("smollm2-135m-instruct")
    assert tokenizer.chat_template
    for task in ("niah_multivalue", "variable_tracking", "qa3"):
        for length in (1024, 4096):
            for example in make_long_context_dataset(task, tokenizer, length, num_examples=2, seed=0):
                total = _count(tokenizer, example["document"] + example["prompt"])
                assert total == example["document_tokens"] + example["prompt_tokens"]
                assert length - 8 <= total <= length
                assert example["prompt"] == question_prompt(tokenizer, example["question"])
                assert example["prompt"].endswith("<|im_start|>assistant\n")


def test_seeds_repeat_and_lengths_and_counts_do_not_disturb_each_other(byte_tokenizer):
    def run(**kwargs):
        arguments = dict(task="niah_multikey", tokenizer=byte_tokenizer, lengths=[512, 768], num_examples=3, seed=0)
        return make_long_context_dataset(**{**arguments, **kwargs}).to_list()

    first = run()
    assert run() == first
    assert run(seed=1) != first and run(seed=1)[0]["answers"] != first[0]["answers"]
    assert run(num_examples=2) == [first[i] for i in (0, 1, 3, 4)]  # fewer examples: the first ones
    assert run(lengths=[768]) == first[3:]  # another length's examples stay as they were


def test_noise_filler_book_filler_and_any_text(byte_tokenizer):
    noise = make_long_context_dataset("niah_single_noise", byte_tokenizer, 600, 2)[0]["document"]
    needle = re.search(r"The special magic number for [a-z ]+ is \d+\.", noise).group()
    sentences = set(re.split(r"(?<=\.) ", SYNTHETIC_FILLER.strip()))
    rest = [s.strip() for s in re.split(r"(?<=\.) ", noise.replace(needle, "")) if s.strip()]
    assert set(rest[:-1]) <= sentences  # noise only (the last sentence may be cut)
    book = make_long_context_dataset("niah_single_book", byte_tokenizer, 600, 2)[0]["document"]
    assert not sentences & set(re.split(r"(?<=\.) ", book))
    assert sum(word in default_text() for word in book.split()[:40]) >= 30
    text = "Ships sail over the grey sea at dawn. The harbour sleeps. Gulls cry above the masts. " * 5
    own = make_long_context_dataset("qa1", byte_tokenizer, 900, 1, filler="natural", text=text)[0]["document"]
    assert "Gulls cry above the masts." in own and "Bennet" not in own
    vt_book = make_long_context_dataset("variable_tracking", byte_tokenizer, 600, 1, filler="natural")[0]["document"]
    assert "The grass is green." not in vt_book


def test_chat_template_prompts(chat_tokenizer):
    example = make_long_context_dataset("qa2", chat_tokenizer, LENGTH, 1)[0]
    expected = f"<user>{example['question']}</user></s><assistant>"
    assert example["prompt"] == expected.replace("</s>", chat_tokenizer.eos_token)
    assert "Answer:" not in example["prompt"].replace(example["question"], "")


def test_bad_input_is_refused_with_what_to_do(byte_tokenizer):
    with pytest.raises(ValueError, match=r"unknown long-context task 'niah'"):
        make_long_context_dataset("niah", byte_tokenizer, 512)
    with pytest.raises(ValueError, match=r"length '4x' is not a positive number of tokens; write e.g. 4096, 4k"):
        make_long_context_dataset("qa1", byte_tokenizer, "4x")
    with pytest.raises(ValueError, match=r"qa3: length 300 leaves no room for filler.*Use a longer length"):
        make_long_context_dataset("qa3", byte_tokenizer, 300)
    with pytest.raises(ValueError, match=r"filler='books' is unknown"):
        make_long_context_dataset("qa1", byte_tokenizer, 512, filler="books")
    crowded = "The bathroom, the hallway, the kitchen and the garden were swept. " * 3  # no sentence left for bAbI
    with pytest.raises(ValueError, match=r"every sentence of the filler names one of .*use another text"):
        make_long_context_dataset("qa1", byte_tokenizer, 900, text=crowded)
    with pytest.raises(ValueError, match=r"unknown suite or task 'rular'"):
        suite_tasks(["rular"])


def test_parse_length_and_suite_names():
    assert [parse_length(v) for v in ("4k", "16K", "1m", "3000", 512)] == [4096, 16384, 1048576, 3000, 512]
    for bad in ("0", "k", "-4k", 0, True):
        with pytest.raises(ValueError, match="not a positive number of tokens"):
            parse_length(bad)
    assert suite_tasks(["ruler", "babilong"]) == [*RULER_TASKS, *BABILONG_TASKS]
    assert suite_tasks(["qa1", "babilong"]) == ["qa1", "qa2", "qa3"]


def test_scoring_as_the_papers_do():
    assert score_reply("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert score_reply("It is 1234567.", ["1234567", "7654321"]) == 0.5
    assert score_reply("VAR abcde", ["ABCDE", "FGHIJ"]) == 0.5  # case-insensitive
    places = ["kitchen", "garden", "hallway"]
    assert score_reply(" garden", ["garden"], "word", places) == 1.0
    assert score_reply("It was in the Garden before the kitchen.", ["garden"], "word", places) == 1.0
    assert score_reply("the kitchen, not the garden", ["garden"], "word", places) == 0.0
    assert score_reply("gardening", ["garden"], "word", places) == 0.0  # a whole word
    with pytest.raises(ValueError, match="scoring='exact' is unknown"):
        score_reply("x", ["x"], "exact")


# -- the suite ----------------------------------------------------------------------------------------------
SEGMENT, WINDOW = 64, 160


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = tiny_chat_kv_model(tokenizer, SEGMENT, memory_size=4096, max_positions=WINDOW)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # memory that changes the outputs
        for param in model.memory_blocks.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def test_the_suite_reads_each_document_then_asks_in_a_fresh_call(chat_tokenizer, tmp_path, monkeypatch):
    from hf_memlm.evaluation.report import write_report

    model = tiny_model(chat_tokenizer)
    settings = SuiteSettings(suites=["niah_single_noise", "qa1"], lengths=["512", 900], num_examples=2)
    base_inputs = []
    generate = model.language_model.generate
    monkeypatch.setattr(
        model.language_model, "generate", lambda ids, **kw: base_inputs.append(ids[0].tolist()) or generate(ids, **kw)
    )
    results = evaluate_suite(model, chat_tokenizer, settings, progress=False)
    assert [(r["task"], r["length"], r["examples"]) for r in results["rows"]] == [
        ("niah_single_noise", 512, 2), ("niah_single_noise", 900, 2), ("qa1", 512, 2), ("qa1", 900, 2),
    ]  # fmt: skip
    data = make_long_context_dataset("qa1", chat_tokenizer, [512, 900], 2)
    for record, example in zip(results["answers"][4:], data):
        state = model.memorize(torch.tensor([encode_text(chat_tokenizer, example["document"])]))
        prompt = torch.tensor([encode_text(chat_tokenizer, example["prompt"])])
        out = model.generate(prompt, memory_state=state, max_new_tokens=16, do_sample=False)
        assert record[MEMORY] == chat_tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        for condition in (MEMORY, MEMORY_DISABLED, BASE_MODEL):
            expected = 100 * score_reply(record[condition], example["answers"], "word", example["choices"])
            assert record[f"{condition}_score"] * 100 == pytest.approx(expected * 100)
    # the base model reads at most its window, the question at the end of its user turn
    assert len(base_inputs) == 8 and all(len(ids) <= WINDOW - 16 for ids in base_inputs)
    turn_end = f"{data[3]['question']}</user>{chat_tokenizer.eos_token}<assistant>"
    assert chat_tokenizer.decode(base_inputs[-1]).endswith(turn_end)
    for row in results["averages"]:
        assert row["suite"] in ("ruler", "babilong") and 0 <= row[MEMORY] <= 100 and row["tasks"] == 1
    paths = write_report(results, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["suite.json", "suite.md", "suite.png"]
    markdown = paths["markdown"].read_text()
    assert "| qa1 | 900 | 2 |" in markdown and "| babilong | 512 | 1 |" in markdown and "Environment" in markdown
    assert json.loads(paths["json"].read_text())["kind"] == "suite" and paths["plot"].stat().st_size > 1000


def test_base_model_answer_keeps_the_end_of_a_plain_document(byte_tokenizer, monkeypatch):
    model = tiny_model(byte_tokenizer)
    example = make_long_context_dataset("niah_single_book", byte_tokenizer, 700, 1)[0]
    seen = []
    monkeypatch.setattr(model.language_model, "generate", lambda ids, **kw: seen.append(ids[0].tolist()) or ids)
    base_model_answer(model, byte_tokenizer, example, window=200)
    text = byte_tokenizer.decode(seen[0])
    assert len(seen[0]) == 200 - example["max_new_tokens"] and text.endswith(example["prompt"])
    assert example["document"].endswith(text.split("\n\n")[0])
    assert answer_from_memory(model, byte_tokenizer, example["document"], example["prompt"], 3) is not None


def test_suite_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="unknown suite or task 'x'"):
        SuiteSettings(suites=["x"])
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        SuiteSettings(num_examples=0)
    with pytest.raises(ValueError, match="lengths is empty"):
        SuiteSettings(lengths=[])


def test_the_suite_command(chat_tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model(chat_tokenizer).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["eval", str(folder), "--suite", "niah_multiquery", "qa2", "--lengths", "600", "--num-examples", "1"]
    assert main([*argv, "--output-dir", str(out), "--no-progress", "--base-window", "128"]) == 0
    results = json.loads((out / "suite.json").read_text())
    assert [row["task"] for row in results["rows"]] == ["niah_multiquery", "qa2"] and results["base_window"] == 128
    assert (out / "suite.png").is_file() and "| niah_multiquery | 600 | 1 |" in (out / "suite.md").read_text()
    assert "| niah_multiquery | 600 | 1 |" in capsys.readouterr().out
    # the memory model alone: the baselines' cells and averages are left empty, the report still written
    alone = tmp_path / "alone"
    assert main([*argv, "--output-dir", str(alone), "--no-progress", "--no-baselines"]) == 0
    averages = json.loads((alone / "suite.json").read_text())["averages"]
    assert [(row["suite"], row[MEMORY_DISABLED], row[BASE_MODEL]) for row in averages] == [
        ("ruler", None, None), ("babilong", None, None),
    ]  # fmt: skip
    assert all(row[MEMORY] is not None for row in averages) and (alone / "suite.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(folder), "--suite", "ruler", "--lengths", "4x", "--output-dir", str(tmp_path / "o")]) == 2
    assert "length '4x' is not a positive number of tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(folder), "--suite", "ruler", "--task", "passkey", "--output-dir", str(tmp_path / "o")])


def test_runs_at_separate_lengths_merge_into_the_report_of_one_run(chat_tokenizer, tmp_path, capsys):
    # each length run on its own (its own count, baselines or not) and merged gives the rows, replies and averages
    # of one run at every length: a task's examples at one length do not depend on the other lengths
    import importlib.util
    from pathlib import Path

    from hf_memlm.evaluation.suite import merge_suite_results

    model = tiny_model(chat_tokenizer)
    tasks = ["niah_multikey", "qa2"]
    both = evaluate_suite(
        model, chat_tokenizer, SuiteSettings(suites=tasks, lengths=[512, 900], num_examples=2), progress=False
    )
    apart = [
        evaluate_suite(
            model, chat_tokenizer, SuiteSettings(suites=tasks, lengths=[length], num_examples=2), progress=False
        )
        for length in (900, 512)
    ]
    merged = merge_suite_results(apart)
    assert merged["rows"] == both["rows"] and merged["averages"] == both["averages"]
    key = lambda answer: (answer["task"], answer["length"], answer["answers"])  # noqa: E731
    assert sorted(merged["answers"], key=key) == sorted(both["answers"], key=key)
    # the script writes the merged report; a task at a length twice, or another model's report, is refused
    for number, report in enumerate(apart):
        (tmp_path / f"r{number}.json").write_text(json.dumps(report))
    path = Path(__file__).resolve().parents[1] / "scripts" / "merge_suite_reports.py"
    spec = importlib.util.spec_from_file_location("merge_suite_reports", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path / "r0.json"), str(tmp_path / "r1.json"), "--output-dir", str(tmp_path / "merged")])
    markdown = (tmp_path / "merged" / "suite.md").read_text()
    assert "| niah_multikey | 512 | 2 |" in markdown and "| qa2 | 900 | 2 |" in markdown
    assert (tmp_path / "merged" / "suite.png").is_file()
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "r0.json"), str(tmp_path / "r0.json"), "--output-dir", str(tmp_path / "x")])
    assert "niah_multikey at 900 tokens is in two reports" in capsys.readouterr().err
    other = {**apart[1], "model": {**apart[1]["model"], "segment_length": 7}}
    with pytest.raises(ValueError, match="the reports differ in model"):
        merge_suite_results([apart[0], other])
    with pytest.raises(ValueError, match=r"suite\.json reports"):
        merge_suite_results([])


def test_a_train_configs_evaluation_section_runs_the_suite_as_the_command_does(chat_tokenizer, tmp_path):
    # evaluation.task: suite reloads the saved model and scores what `hf-memlm eval --suite` scores, filler from
    # evaluation.source; bad options fail before training with the section named
    from hf_memlm.recipes.final_eval import check_evaluation, run_final_evaluation

    folder = tmp_path / "model"
    model = tiny_model(chat_tokenizer)
    model.save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    book = tmp_path / "book.txt"
    book.write_text(default_text()[:30000])
    options = {"suites": ["niah_multiquery", "qa1"], "lengths": ["600"], "num_examples": 2, "baselines": False}
    section = {"task": "suite", "source": str(book), "seed": 3, "options": {**options, "dtype": "float32"}}
    section.update(num_segments=[2], num_examples=100, batch_size=16)
    config = {"evaluation": section, "output_dir": str(folder)}
    check_evaluation(config)
    outcome = run_final_evaluation(config, folder, chat_tokenizer)
    command = evaluate_suite(model.eval(), chat_tokenizer, SuiteSettings(seed=3, **options), text=book.read_text())
    assert outcome["results"]["answers"] == command["answers"] and outcome["results"]["rows"] == command["rows"]
    assert outcome["results"]["filler_source"] == str(book)
    assert sorted(Path(p).name for p in outcome["paths"].values()) == ["suite.json", "suite.md", "suite.png"]
    for bad, message in (
        ({"lenghts": ["600"]}, "evaluation.options for suite: .*lenghts"),
        ({"dtype": "int8"}, "dtype for suite"),
    ):
        with pytest.raises(ValueError, match=message):
            check_evaluation({"evaluation": {**section, "options": bad}})
