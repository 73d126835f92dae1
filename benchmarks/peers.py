"""The two peers of `bench_peers.py`, as their authors' packages run them: where they are installed, how they
are sized to our parameter count, and how each reads an example segment by segment (`logits`).

The packages live in a git-ignored folder that only the benchmark puts on `sys.path` (see PEERS.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_PEERS_ENV = Path(__file__).resolve().parent / ".peers-env"
INSTALL_HINT = "pip install --no-deps --target benchmarks/.peers-env -r benchmarks/peers_requirements.txt"
PEER_PACKAGES = {
    "memorizing": ("memorizing-transformers-pytorch", "memorizing_transformers_pytorch"),
    "rmt": ("recurrent-memory-transformer-pytorch", "recurrent_memory_transformer_pytorch"),
}
# Both peers are sized to our parameter count by the width of their feed-forward blocks (the rest matches:
# 2 layers, width 64, 4 heads of 16); `parameter_counts` in the results says how close each lands.
MEMORIZING_SETTINGS = {
    "dim": 64,
    "depth": 2,
    "heads": 4,
    "dim_head": 16,
    "ff_mult": 7,
    "memorizing_layers": 1,  # kNN attention in the first layer (1-based), where our memory sits
    "max_knn_memories": 2048,  # as our memory_size: 32 segments of 64 tokens
    "num_retrieved_memories": 32,  # the package's default top-k
    "xl_max_memories": 64,  # one segment of Transformer-XL cache in every layer; older keys go to the kNN memory
}
RMT_SETTINGS = {
    "dim": 64,
    "depth": 2,
    "heads": 4,
    "dim_head": 16,
    "ff_mult": 5.5,
    "num_memory_tokens": 16,  # read / write memory tokens carried from segment to segment
    "seq_len": 64,
    "use_xl_memories": True,  # plus one segment of XL cache, handed on as its generate() does
}


class MemorizingPeer:
    """`MemorizingTransformer` over segments: XL cache from segment to segment, older keys in its kNN memory."""

    name = "memorizing"

    def __init__(self, module, vocab_size: int):
        self.package = module
        self.model = module.MemorizingTransformer(num_tokens=vocab_size, **MEMORIZING_SETTINGS)
        self.folder = tempfile.TemporaryDirectory(prefix="peers-knn-")
        self.memories = {}  # batch size -> kNN memories (one memmap folder each: the file names are fixed)

    def memory_parameters(self) -> list[torch.nn.Parameter]:
        knn_layers = [m for m in self.model.modules() if isinstance(m, self.package.KNNAttention)]
        return [p for layer in knn_layers for p in layer.parameters()]

    def _knn_memories(self, batch: int):
        if batch not in self.memories:
            self.model.knn_memories_directory = str(Path(self.folder.name) / f"batch{batch}")
            self.memories[batch] = self.model.create_knn_memories(batch_size=batch)
        memories = self.memories[batch]
        memories.clear_memory()  # every example starts with an empty memory
        return memories

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        memories = self._knn_memories(input_ids.shape[0])
        segment_length = MEMORIZING_SETTINGS["xl_max_memories"]
        pieces, xl_memories = [], None
        for segment in input_ids.split(segment_length, dim=1):
            logits, xl_memories = self.model(segment, knn_memories=memories, xl_memories=xl_memories)
            pieces.append(logits)
        return torch.cat(pieces, dim=1)


class RecurrentMemoryPeer:
    """`RecurrentMemoryTransformer` over segments: memory tokens written by one segment are read by the next
    (backpropagation through all segments of an example), plus one segment of XL cache."""

    name = "rmt"

    def __init__(self, module, vocab_size: int):
        self.model = module.RecurrentMemoryTransformer(
            num_tokens=vocab_size, causal=True, ignore_index=-100, **RMT_SETTINGS
        )

    def memory_parameters(self) -> list[torch.nn.Parameter]:
        return [self.model.memory_tokens, self.model.read_memory_emb]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        pieces, memories, xl_memories = [], None, None
        for segment in input_ids.split(RMT_SETTINGS["seq_len"], dim=1):
            logits, memories, xl_memories = self.model(segment, memories, xl_memories=xl_memories)
            pieces.append(logits)
        return torch.cat(pieces, dim=1)


def load_peers(peers_env: Path, wanted: list[str]) -> tuple[dict, dict]:
    """(importable peer modules by name, skip message by name). The env folder goes at the end of sys.path:
    it adds packages, it never replaces one of ours."""
    if peers_env.is_dir() and str(peers_env) not in sys.path:
        sys.path.append(str(peers_env))
    found, skipped = {}, {}
    for name in wanted:
        if name == "ours":
            continue
        package, module_name = PEER_PACKAGES[name]
        try:
            found[name] = __import__(module_name)
        except ImportError as error:
            skipped[name] = f"{package} is not installed ({error}); install the peers with: {INSTALL_HINT}"
    return found, skipped
