"""Shared fixtures: a table of tiny base architectures x memory kinds, built from local configs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoConfig

import hf_memlm
from hf_memlm import MemLMConfig
from hf_memlm.memory_kinds import MEMORY_KINDS
from hf_memlm.memory_kv import KVMemory

VOCAB = 97
HIDDEN = 32
SEGMENT = 8

# Tiny configs of each supported base family: one behaviour, checked over all of them.
BASES = {
    "gpt2": dict(n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "mistral": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=None,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "qwen2": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "phi3": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "opt": dict(
        hidden_size=HIDDEN,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=HIDDEN,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gemma": dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
KINDS = tuple(MEMORY_KINDS)  # every registered memory kind (hf_memlm/memory_kinds.py)


def base_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **BASES[model_type], **overrides})


def memory_settings(kind: str, **overrides) -> dict:
    """MemLMConfig keyword arguments for a tiny model of `kind`; of the kinds' own settings (small capacity and
    top-k by default, so eviction and the top-k path run in the multi-segment tests), each kind takes the ones
    it has (another kind's would be ignored with a warning)."""
    settings = dict(memory_type=kind, memory_layers=[0], segment_length=SEGMENT, memory_heads=2)
    settings.update(dict(memory_size=12, memory_topk=4, num_slots=6), **overrides)
    return kind_settings_only(settings)


def kind_settings_only(settings: dict) -> dict:
    """`settings` less the settings that only other kinds than `settings["memory_type"]` have."""
    own = MEMORY_KINDS[settings.get("memory_type", "kv")].settings.names()
    others = {name for kind in MEMORY_KINDS.values() for name in kind.settings.names()} - set(own)
    return {name: value for name, value in settings.items() if name not in others}


def randomize_memory(model, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero memory weights (the output projection starts at zero), so memory changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.memory_blocks.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def build(model_type: str, kind: str, seed: int = 0, randomized: bool = True):
    torch.manual_seed(seed)
    config = hf_memlm.MemLMConfig(text_config=base_config(model_type), **memory_settings(kind))
    model = hf_memlm.MemLMForCausalLM(config).eval()
    if randomized:
        randomize_memory(model, seed)
    return model


# the hidden size of `base_config("llama")`, which `kv_block` wraps
KV_HIDDEN = 32


def kv_block(seed=0, **settings):
    """A `kv` memory block (2 heads) beside layer 0 of the tiny Llama, its output projection randomised."""
    options = dict(memory_type="kv", memory_layers=[0], memory_heads=2, segment_length=64, memory_size=8192)
    options.update(settings)
    torch.manual_seed(seed)
    block = KVMemory(MemLMConfig(text_config=base_config("llama"), **options), 0)
    block.reset_parameters(0.5)
    with torch.no_grad():
        block.mem_out.weight.normal_(0.0, 0.5)
    return block


def clustered_hidden(generator, rows, tokens, clusters=64, noise=0.3):
    """Hidden states (rows, tokens, KV_HIDDEN) around `clusters` centres, as keys of real text cluster."""
    centres = F.normalize(torch.randn(clusters, KV_HIDDEN, generator=generator), dim=-1) * 3
    pick = torch.randint(0, clusters, (rows, tokens), generator=generator)
    return centres[pick] + noise * torch.randn(rows, tokens, KV_HIDDEN, generator=generator)


def write_segments(block, hidden, segment=256, state=None):
    """`block`'s state after writing `hidden` segment by segment, every token real."""
    rows = hidden.shape[0]
    state = state or block.init_state(rows, "cpu", torch.float32)
    for piece in hidden.split(segment, dim=1):
        state = block(piece, state, mode="write", mask=torch.ones(piece.shape[:2], dtype=torch.bool))
    return state


def selection_recall(selected, selected_valid, exact):
    """Share of the exact top-k entries that the selection contains, over all queries and heads."""
    hits = ((selected.unsqueeze(-1) == exact.unsqueeze(-2)) & selected_valid.unsqueeze(-1)).any(-2)
    return hits.float().mean().item()


def run_in_threads(task, count: int) -> dict[int, object]:
    """`task(thread)` in `count` threads started together; their results by thread (errors re-raised here)."""
    import threading

    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(thread: int) -> None:
        try:
            start.wait()
            results[thread] = task(thread)
        except BaseException as error:  # surfaced below with the thread's number
            errors.append(error)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def train_job(config: str, output_dir, overrides: dict[str, str] | None = None) -> None:
    """`hf-memlm train CONFIG --output_dir DIR --section.key value ...`, which must succeed."""
    from hf_memlm.cli import main

    flags = [arg for key, value in (overrides or {}).items() for arg in (f"--{key}", value)]
    assert main(["train", config, "--output_dir", str(output_dir), *flags]) == 0


def exact_match_by_distance(results: dict, condition: str) -> dict[int, float]:
    """Exact match of one condition by distance in segments, from a retrieval report's JSON."""
    return {b["distance_segments"]: b["metrics"][condition]["exact_match"] for b in results["by_distance_segments"]}


@pytest.fixture(params=[(b, k) for b in BASES for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def arch_kind(request):
    return request.param


@pytest.fixture(autouse=True)
def _single_thread():
    # the CI machine has two cores; tiny models are fastest on one thread
    torch.set_num_threads(1)
    yield


def run_python_json(code: str, args: list[str], tmp_path):
    """Run `code` in a fresh Python process (offline, its own remote-code cache, 1 thread, no PYTHONPATH, so the
    modules it can import are only those installed) and return the JSON of its last printed line."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[y/N]" not in done.stdout, "the process asked whether to run remote code"
    return json.loads(done.stdout.strip().splitlines()[-1])  # the last line: a library may print before it


@pytest.fixture(scope="module")
def tiny_pretrained_base(tmp_path_factory):
    """A pretrained-looking base: a small random Llama and a byte tokenizer, saved as a Hub-style folder."""
    from transformers import LlamaForCausalLM

    from hf_memlm.data import build_tokenizer
    from hf_memlm.recipes.defaults import tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=260, hidden_size=32, max_positions=128)).save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)
    return folder


def tiny_chat_kv_model(tokenizer, segment_length: int, memory_size: int, max_positions: int | None = None):
    """A tiny byte-vocabulary Llama with `kv` memory beside layer 0 (2 heads, top-4 exact reads) that stops at
    `tokenizer`'s end token: what the chat evaluations (pass key, long-context suite) run on in tests."""
    from hf_memlm.recipes.defaults import tiny_llama_config

    sizes = {} if max_positions is None else {"max_positions": max_positions}
    text_config = tiny_llama_config(vocab_size=260, hidden_size=32, **sizes)
    text_config.eos_token_id = tokenizer.eos_token_id
    config = hf_memlm.MemLMConfig(
        text_config=text_config,
        memory_type="kv",
        memory_layers=[0],
        segment_length=segment_length,
        memory_heads=2,
        memory_size=memory_size,
        memory_topk=4,
        memory_search="exact",
    )
    return hf_memlm.MemLMForCausalLM(config).eval()


def real_model_job(tmp_path_factory, finished_variable: str, config_name: str):
    """The output folder of `hf-memlm train configs/<config_name>` for a slow test of a real-model job: trained here
    (the base is the shipped GGUF, so gguf is needed), or, where the environment variable `finished_variable` names
    a folder, that finished run, checked as it is."""
    from pathlib import Path

    from hf_memlm.cli import main

    finished = os.environ.get(finished_variable)
    if finished:
        return Path(finished).resolve()
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp(Path(config_name).stem) / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / config_name
    assert main(["train", str(config), "--output_dir", str(out)]) == 0
    return out
