"""Sharing on the Hub: the model card save_pretrained writes, and what push_to_hub / the training pushes
upload (against a fake HfApi: nothing leaves the machine)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.utils.hub as transformers_hub
import yaml
from conftest import SEGMENT, base_config, build
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForCausalLM

import hf_memlm
from hf_memlm.integrations.hub import HubCodeCallback, push_trained_model, write_model_card
from hf_memlm.integrations.model_card import CARD_MARKER, render_model_card

CODE_FILES = {
    "modeling_memlm.py",
    "configuration_memlm.py",
    "memory_base.py",
    "memory_kv.py",
    "memory_kv_read.py",
    "memory_state.py",
}


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


class FakeHubApi:
    """Records what would be uploaded; `remote` holds files already in the repo."""

    def __init__(self, user="me", remote=None):
        self.user = user
        self.remote = dict(remote or {})
        self.uploads = []  # (repo_id, path_in_repo or "", {file: bytes}, commit_message)
        self.created = []

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        full = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        self.created.append(full)
        return SimpleNamespace(repo_id=full)

    def file_exists(self, repo_id, filename, revision=None, token=None, **kwargs):
        return filename in self.remote

    def hf_hub_download(self, repo_id, filename, revision=None, token=None, **kwargs):
        path = Path(self.download_dir) / filename
        path.write_text(self.remote[filename])
        return str(path)

    def upload_folder(
        self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False, **kw
    ):
        root = Path(folder_path)
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        kept = list(filter_repo_objects(names, ignore_patterns=ignore_patterns))
        files = {name: (root / name).read_bytes() for name in kept}
        self.uploads.append((repo_id, path_in_repo or "", files, kw.get("commit_message")))
        for name, content in files.items():
            self.remote[f"{path_in_repo}/{name}" if path_in_repo else name] = content.decode(errors="replace")
        result = SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")
        if run_as_future:
            future = Future()
            future.set_result(result)
            return future
        return result

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        """What transformers' own `push_to_hub` (tokenizers, configs) calls."""
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.uploads.append((repo_id, "", files, commit_message))
        self.remote.update({name: content.decode(errors="replace") for name, content in files.items()})
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    api = FakeHubApi()
    api.download_dir = tmp_path / "downloads"
    api.download_dir.mkdir()
    monkeypatch.setattr(transformers_hub, "_hf_api", api)

    class RemoteModelCard(ModelCard):
        """transformers' push_to_hub loads the repo's card (or starts its generic one) through `ModelCard.load`."""

        @classmethod
        def load(cls, repo_id_or_path, *args, **kwargs):
            if "README.md" not in api.remote:
                raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")
            return cls(api.remote["README.md"])

    monkeypatch.setattr(transformers_hub, "ModelCard", RemoteModelCard)
    return api


# -- the card ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_save_pretrained_writes_a_model_card(tmp_path, kind):
    model = build("llama", kind)
    model.save_pretrained(tmp_path / "my-model")
    card = (tmp_path / "my-model" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"hf_memlm", f"{kind}-memory"} <= set(meta["tags"])
    assert "base_model" not in meta  # built from a config: no Hub base to name
    assert CARD_MARKER in card
    assert '"my-model", trust_remote_code=True' in card and "AutoTokenizer.from_pretrained" in card
    assert f"| memory kind | `{kind}` |" in card and f"| segment length (tokens) | {SEGMENT} |" in card
    assert "{{" not in card
    assert "Not recorded with this model." in card and "Not evaluated with this model." in card


def test_card_names_a_hub_base_model_and_not_a_local_one(tmp_path):
    base = AutoModelForCausalLM.from_config(base_config("qwen2"))
    base.save_pretrained(tmp_path / "local-base")
    model = hf_memlm.MemLMForCausalLM.from_base(str(tmp_path / "local-base"), memory_layers=[0], segment_length=SEGMENT)
    local_card = render_model_card(model.config)
    assert "base_model" not in _front_matter(local_card) and str(tmp_path) not in local_card
    # what from_base("Qwen/Qwen2-0.5B") records (from_pretrained keeps the id it was given), kept by config.json
    model.config.text_config._name_or_path = "Qwen/Qwen2-0.5B"
    model.save_pretrained(tmp_path / "wrapped")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "wrapped")
    card = (tmp_path / "wrapped" / "README.md").read_text()
    assert _front_matter(card)["base_model"] == "Qwen/Qwen2-0.5B"
    assert "https://huggingface.co/Qwen/Qwen2-0.5B" in card
    assert _front_matter(render_model_card(reloaded.config))["base_model"] == "Qwen/Qwen2-0.5B"


def test_a_readme_the_user_wrote_is_kept(tmp_path, caplog):
    model = build("llama", "kv")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text("# My model\n\nMy own words.\n")
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# My model\n\nMy own words.\n"
    assert "was not written by hf_memlm; keeping it" in caplog.text
    assert write_model_card(folder, evaluation="| a | b |") is None
    assert (folder / "README.md").read_text() == "# My model\n\nMy own words.\n"
    assert write_model_card(folder, overwrite=True) == folder / "README.md"
    assert CARD_MARKER in (folder / "README.md").read_text()


def test_card_with_training_and_the_evaluation_report(tmp_path):
    from hf_memlm.data import build_tokenizer
    from hf_memlm.evaluation import evaluate_retrieval, format_markdown, retrieval_dataset
    from hf_memlm.recipes.defaults import tiny_llama_config

    config = hf_memlm.MemLMConfig(text_config=tiny_llama_config(), memory_layers=[0], segment_length=64)
    model = hf_memlm.MemLMForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    data = retrieval_dataset("passkey", build_tokenizer("byte"), 2, 64, [2], seed=0)
    report = evaluate_retrieval(model, data, batch_size=2, task="passkey", progress=False)
    expected = format_markdown(report)
    path = write_model_card(
        tmp_path,
        training={"data": "passkey (bundled text)", "steps": 300},
        evaluation=report,
        evaluation_command="hf-memlm train configs/passkey_cpu.yaml",
        license="apache-2.0",
        model_id="me/passkey",
    )
    card = path.read_text()
    assert _front_matter(card)["license"] == "apache-2.0"
    assert "| data | passkey (bundled text) |" in card and "| steps | 300 |" in card
    table = [line for line in expected.splitlines() if line.startswith("| ")]
    assert table and all(line in card for line in table)  # the report's table
    assert "### passkey" in card  # its heading sits under the card's "## Evaluation"
    assert "Produced by: `hf-memlm train configs/passkey_cpu.yaml`" in card
    assert '"me/passkey", trust_remote_code=True' in card


def test_card_template_is_package_data_and_checked(monkeypatch, tmp_path):
    from hf_memlm.integrations import model_card

    assert model_card.TEMPLATE_FILE.is_file() and "{{ card_data }}" in model_card.TEMPLATE_FILE.read_text()
    (tmp_path / "card.md").write_text("---\n{{ card_data }}\n---\n{{ nonsense }}\n")
    monkeypatch.setattr(model_card, "TEMPLATE_FILE", tmp_path / "card.md")
    with pytest.raises(ValueError, match=r"unknown fields \['nonsense'\]"):
        render_model_card(build("llama", "kv").config)


# -- pushing -------------------------------------------------------------------------------------------
def test_model_push_to_hub_uploads_weights_config_code_and_card(fake_hub):
    model = build("llama", "kv")
    model.push_to_hub("memory-llama", license="mit")
    assert fake_hub.created == ["me/memory-llama"]
    ((repo, path_in_repo, files, _),) = fake_hub.uploads
    assert repo == "me/memory-llama" and path_in_repo == ""
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} | CODE_FILES <= set(files)
    card = files["README.md"].decode()
    assert '"me/memory-llama", trust_remote_code=True' in card
    assert _front_matter(card)["license"] == "mit"
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_memlm.MemLMForCausalLM"


def test_save_pretrained_push_to_hub_uploads_our_card(fake_hub, tmp_path):
    build("llama", "kv").save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="org/pushed")
    ((repo, _, files, _),) = fake_hub.uploads
    assert repo == "org/pushed"
    assert CARD_MARKER in files["README.md"].decode() and CODE_FILES <= set(files)


def test_push_keeps_a_readme_the_user_wrote_on_the_hub(fake_hub):
    fake_hub.remote["README.md"] = "---\nlicense: mit\n---\n# Written by hand\n"
    build("llama", "kv").push_to_hub("me/handmade")
    ((_, _, files, _),) = fake_hub.uploads
    assert "README.md" not in files and "model.safetensors" in files
    # a card hf_memlm wrote earlier is regenerated
    fake_hub.remote["README.md"] = CARD_MARKER
    build("llama", "kv").push_to_hub("me/handmade")
    assert "README.md" in fake_hub.uploads[-1][2]


def test_push_trained_model_uploads_the_final_folder_without_checkpoints(fake_hub, tmp_path):
    from hf_memlm.data import build_tokenizer

    folder = tmp_path / "run"
    build("llama", "kv").save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    (folder / "eval").mkdir()
    (folder / "eval" / "passkey.md").write_text("| table |")
    write_model_card(folder, training={"steps": 10}, model_id="me/run")
    push_trained_model(folder, "me/run")
    ((repo, _, files, message),) = fake_hub.uploads
    assert repo == "me/run" and message == "Upload hf_memlm model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert CODE_FILES <= set(files) and "eval/passkey.md" in files
    assert not any(name.startswith("checkpoint-") for name in files)
    assert "| steps | 10 |" in files["README.md"].decode()


def test_push_trained_model_rejects_a_folder_without_a_model(fake_hub, tmp_path):
    with pytest.raises(ValueError, match=r"is not a saved hf_memlm model: it lacks config\.json"):
        push_trained_model(tmp_path, "me/empty")
    assert fake_hub.uploads == []


def test_push_trained_model_card_loads_the_repo_not_the_folder(fake_hub, tmp_path):
    folder = tmp_path / "passkey_cpu"
    build("llama", "kv").save_pretrained(folder)
    write_model_card(folder, training={"steps": 10}, license="mit")
    assert '"passkey_cpu", trust_remote_code=True' in (folder / "README.md").read_text()
    push_trained_model(folder, "run")  # the owner comes from the Hub
    card = fake_hub.uploads[-1][2]["README.md"].decode()
    assert '"me/run", trust_remote_code=True' in card and '"passkey_cpu"' not in card
    assert "| steps | 10 |" in card and _front_matter(card)["license"] == "mit"


@pytest.mark.parametrize("order", ["tokenizer first", "model first"])
def test_tokenizer_and_model_pushes_end_with_our_card(fake_hub, order):
    """transformers' own push (the tokenizer's) writes a generic card when the repo has none, and keeps the card
    it finds: either way the repo ends with ours."""
    from hf_memlm.data import build_tokenizer

    tokenizer, model = build_tokenizer("byte"), build("llama", "kv")
    pushes = [lambda: tokenizer.push_to_hub("me/both"), lambda: model.push_to_hub("me/both", license="mit")]
    for push in pushes if order == "tokenizer first" else pushes[::-1]:
        push()
    card = fake_hub.remote["README.md"]
    meta = _front_matter(card)
    assert CARD_MARKER in card and '"me/both", trust_remote_code=True' in card
    assert {"custom_code", "hf_memlm"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "mit" and "tokenizer.json" in fake_hub.remote


def test_a_later_push_keeps_the_metadata_already_on_the_hub(fake_hub):
    build("llama", "kv").push_to_hub("me/kept", license="mit", datasets=["emozilla/pg19"])
    build("llama", "kv").push_to_hub("me/kept")  # from another process: no local card to merge
    meta = _front_matter(fake_hub.remote["README.md"])
    assert meta["license"] == "mit" and meta["datasets"] == ["emozilla/pg19"]


@pytest.mark.parametrize("trainer_class", ["Trainer", "MemLMTrainer"])
def test_trainer_push_to_hub_ends_with_our_card(fake_hub, tmp_path, trainer_class):
    """`trainer.push_to_hub()` writes the trainer's card right before its upload: MemLMTrainer's is ours, and a
    plain Trainer's too when HubCodeCallback is among its callbacks, with the repo id, the training facts and
    what push_to_hub was given for the card."""
    import transformers
    from datasets import Dataset
    from transformers import default_data_collator

    import hf_memlm.training
    from hf_memlm.training import MemLMTrainingArguments

    ids = torch.randint(3, 90, (4, 2 * SEGMENT), generator=torch.Generator().manual_seed(0))
    args = MemLMTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        push_to_hub=True,
        hub_model_id="trained",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = getattr(hf_memlm.training if trainer_class == "MemLMTrainer" else transformers, trainer_class)(
        model=build("llama", "kv"),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
        data_collator=default_data_collator,
        callbacks=[HubCodeCallback()],
    )
    trainer.train()
    trainer.push_to_hub(license="apache-2.0", dataset_tags="emozilla/pg19", dataset="PG-19")
    repo, _, files, message = fake_hub.uploads[-1]
    assert (repo, message) == ("me/trained", "End of training") and CODE_FILES <= set(files)
    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert CARD_MARKER in card and '"me/trained", trust_remote_code=True' in card
    assert {"custom_code", "hf_memlm"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["emozilla/pg19"]
    assert "| steps | 2 |" in card and "| learning rate |" in card


def test_pushes_during_training_carry_the_modeling_code(fake_hub, tmp_path):
    """Trainer's hub strategy copies only weights and config into the pushed folder; with HubCodeCallback
    the pushed repo also has the code that config.json's auto_map names."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = build("llama", "kv")
    ids = torch.randint(3, 90, (4, 2 * SEGMENT), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        push_to_hub=True,
        hub_model_id="me/training",
        hub_strategy="checkpoint",
        hub_always_push=True,
        report_to="none",
        use_cpu=True,
    )

    def pushed_files(callbacks):
        fake_hub.uploads.clear()
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=callbacks
        )
        trainer.train()
        trainer._finish_current_push()
        top = [files for _, path_in_repo, files, _ in fake_hub.uploads if path_in_repo == ""]
        assert top, fake_hub.uploads
        return top[-1]

    without = pushed_files([])
    assert "model.safetensors" in without and not CODE_FILES <= set(without)  # what Trainer alone pushes
    files = pushed_files([HubCodeCallback()])
    assert CODE_FILES <= set(files) and "config.json" in files and "README.md" in files
    assert '"me/training", trust_remote_code=True' in files["README.md"].decode()


def test_the_cards_usage_snippet_runs_without_the_package(tmp_path):
    """In a process that cannot import hf_memlm: the card's snippet runs, and saving again from the copied
    payload works and writes no card (the card is built by the library, not by the payload)."""
    from hf_memlm.data import build_tokenizer
    from hf_memlm.recipes.defaults import tiny_llama_config

    folder = tmp_path / "model"
    config = hf_memlm.MemLMConfig(
        text_config=tiny_llama_config(hidden_size=32), memory_layers=[0], segment_length=8, memory_heads=2
    )
    hf_memlm.MemLMForCausalLM(config).save_pretrained(folder)
    assert (folder / "hub_sharing.py").is_file() and not (folder / "model_card.py").exists()
    build_tokenizer("byte").save_pretrained(folder)
    card = write_model_card(folder, model_id=str(folder)).read_text()
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    script = "\n".join(
        [
            "import sys",
            'sys.modules["hf_memlm"] = None  # only the payload copied next to the weights can be used',
            snippet,
            "print(more.logits.shape)",
            f"model.save_pretrained({str(tmp_path / 'again')!r})",
        ]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("torch.Size([1,")
    assert (tmp_path / "again" / "model.safetensors").is_file() and (tmp_path / "again" / "modeling_memlm.py").is_file()
    assert not (tmp_path / "again" / "README.md").exists()


def test_save_pretrained_on_other_ranks_or_onto_a_file_writes_no_card(tmp_path):
    model = build("llama", "kv")
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1" / "README.md").exists()
    (tmp_path / "file").write_text("x")
    model.save_pretrained(tmp_path / "file")  # transformers logs an error and writes nothing
    assert (tmp_path / "file").read_text() == "x"


def test_hf_memlm_train_writes_the_card_with_its_evaluation_and_pushes_everything(fake_hub, tmp_path, capsys):
    """`hf-memlm train` with an evaluation section and `training.push_to_hub`: the saved folder's card carries
    the training facts and the evaluation table, and the final upload has weights, config, code, tokenizer
    and card (no checkpoints)."""
    from hf_memlm.cli import main

    root = Path(__file__).resolve().parents[1]
    output_dir = tmp_path / "passkey"
    quick = ["--training.max_steps", "2", "--training.per_device_train_batch_size", "4", "--data.num_examples", "8"]
    evaluation = ["--evaluation.num_segments", "[2]", "--evaluation.num_examples", "4", "--evaluation.batch_size", "4"]
    hub = ["--training.push_to_hub", "true", "--training.hub_model_id", "me/passkey", "--training.save_strategy", "no"]
    card_settings = ["--card.license", "apache-2.0", "--card.datasets", "[emozilla/pg19]"]
    config = str(root / "configs" / "passkey_cpu.yaml")
    assert main(["train", config, *quick, *evaluation, *hub, *card_settings, "--output_dir", str(output_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"model card: {output_dir / 'README.md'}" in printed and "pushed to the Hub: me/passkey" in printed
    card = (output_dir / "README.md").read_text()
    assert "| steps | 2 |" in card and "| data | passkey (bundled text) |" in card
    assert "### passkey" in card and "| distance (segments) |" in card
    assert f"Produced by: `hf-memlm train {config}`" in card
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["emozilla/pg19"]
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "passkey"
    repo, path_in_repo, files, _ = fake_hub.uploads[-1]
    assert (repo, path_in_repo) == ("me/passkey", "")
    assert CODE_FILES | {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert not [name for name in files if name.startswith("checkpoint-")]
    assert files["README.md"].decode() == card and '"me/passkey", trust_remote_code=True' in card
