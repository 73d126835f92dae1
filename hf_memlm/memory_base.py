"""The small interface every memory kind implements (`init_state`, `read`, `write`).

A memory block sits beside one decoder layer. It reads the layer's output hidden states `h` and returns
the residual update `W_o · read(h)` (with `W_o` zero-initialised, so a freshly wrapped model is the base
model, LoRA-style); after a segment it writes that segment's `h` into the state.

The model calls a block only through `block(...)` (`forward`), never through `block.read(...)`: wrappers
such as PEFT's `ModulesToSaveWrapper` route `forward` to the trainable copy, not other methods.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerState(dict):
    """One memory layer's state: its tensors by name, batch first, plus `index`, what the kind built from them
    to read them faster (the `kv` search index), or None. The index lives and dies with the state holding it:
    it is not saved, and a copy (`copy.deepcopy`, pickling) of the tensors goes without it.

    `same_tensors_as`: a state holding the very same tensors (`detach`, a `to` that changes nothing), which then
    shares this one's index both ways: an index built while a call reads its detached copy of a state stays
    with the caller's state (a state loaded from a file and asked twice builds its index once)."""

    __slots__ = ("_holder",)

    def __init__(self, tensors=(), index=None, same_tensors_as: LayerState | None = None):
        super().__init__(tensors)
        self._holder = same_tensors_as._holder if same_tensors_as is not None else [index]

    @property
    def index(self):
        return self._holder[0]

    @index.setter
    def index(self, value) -> None:
        self._holder[0] = value

    def __reduce__(self):
        return (type(self), (dict(self),))


class MemoryBlock(nn.Module):
    """Base class of memory kinds. Subclasses implement `init_state`, `read`, `write`, `check_state`."""

    #: names and trailing shapes of the state tensors; filled by subclasses for error messages
    state_names: tuple[str, ...] = ()
    #: True when one write of several segments' tokens (concatenated) leaves the state that writing them one
    #: segment after another leaves, so `memorize` may write many segments per call (`kv`: entries are
    #: appended token by token; not `slot`, whose write is one recurrent update per segment)
    writes_tokenwise: bool = False
    #: True when `read` also takes `mask` (real tokens of the attention window, (batch, earlier + tokens)) and
    #: `recent` (the hidden states of the window's earlier tokens, or None): for queries made from several tokens
    reads_in_context: bool = False
    #: True when `write` takes `written=`: the number of tokens every row of the state has been written since it
    #: was empty, all real, as is every token of this write (no padding anywhere), when the caller knows it on
    #: the host (a fresh state in a forward without padding), else None. The kind may then skip reading tensor
    #: values back to the host (a sync per write in eager, and a graph break under torch.compile).
    takes_written: bool = False

    def __init__(self, config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.hidden_size = config.text_config.hidden_size
        self.num_heads = config.memory_heads
        self.head_dim = config.memory_head_dim

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: dict[str, torch.Tensor],
        mode: str,
        mask=None,
        written=None,
        recent=None,
    ):
        if mode == "read":
            if self.reads_in_context:
                return self.read(hidden_states, state, mask=mask, recent=recent)
            return self.read(hidden_states, state)
        if mode == "write":
            if written is not None and self.takes_written:
                return self.write(hidden_states, mask, state, written=written)
            return self.write(hidden_states, mask, state)
        raise ValueError(f"mode must be 'read' or 'write', got {mode!r}")

    @staticmethod
    def count_entries(state: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch,) entries this kind holds per row in one layer's `state` (`MemoryState.num_entries`)."""
        raise NotImplementedError

    @staticmethod
    def settle(state: LayerState, started_from: LayerState) -> None:
        """`state` is what a write-only read (`memorize`) made from `started_from`: a kind that keeps an index may
        now make it the fastest for the reads to come (the `kv` index takes in the entries it left to exact
        scoring). Nothing to do by default."""

    @staticmethod
    def follow_rows(state: LayerState, selected: LayerState, rows: list[int]) -> None:
        """`selected` is one layer's `state` with rows `rows` (in that order; `MemoryState.select` and
        `repeat_interleave`, e.g. beam search): a kind that keeps an index built from a state's contents
        (`LayerState.index`, the `kv` search index) may derive `selected.index` from it instead of building
        one again. Nothing to do by default."""

    @staticmethod
    def describe_settings(config) -> list[tuple[str, str]]:
        """(name, value) rows of this kind's settings in `config`, for the model card."""
        raise NotImplementedError

    @property
    def output_projection(self) -> nn.Linear:
        """`W_o`, which maps a read into the residual stream; zero at init, so a new block changes nothing."""
        raise NotImplementedError

    @property
    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The projections that read the hidden states (queries, keys, values, write strengths): what
        `calibrate_memory` rescales feature by feature."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def read(self, hidden_states: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, tokens, hidden) -> residual update of the same shape."""
        raise NotImplementedError

    def write(self, hidden_states: torch.Tensor, mask: torch.Tensor, state: dict[str, torch.Tensor]):
        """Write the tokens where `mask` is True; return the new state (old one untouched)."""
        raise NotImplementedError

    def check_state(self, state: dict[str, torch.Tensor], batch_size: int) -> None:
        """Raise ValueError naming what is wrong when `state` does not fit this block."""
        missing = [name for name in self.state_names if name not in state]
        if missing:
            raise ValueError(
                f"memory_state for layer {self.layer_index} lacks {missing}; it was not made by a "
                f"{type(self).__name__} (expected tensors {list(self.state_names)})."
            )
        for name in self.state_names:
            if state[name].shape[0] != batch_size:
                raise ValueError(
                    f"memory_state has batch size {state[name].shape[0]} but the input has {batch_size} rows; "
                    "pass the state returned for this batch (one row per input row, or a single row shared by "
                    "all), or MemoryState.select(...) the matching rows."
                )

    def reset_parameters(self, std: float) -> None:
        """Initialise weights (called from `_init_weights`, which skips weights loaded from a checkpoint)."""
        raise NotImplementedError


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) -> (batch, tokens, heads * dim)."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def key_window_states(
    hidden: torch.Tensor, window: int, mask: torch.Tensor | None = None, recent: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each token's last `window` real tokens of its attention window, the token itself first: a list of `window`
    pairs (states (batch, tokens, hidden), found (batch, tokens, 1) bool), pair `j` holding the `j`-th real token
    before each token (zeros and found False where the window's start comes first).

    hidden: (batch, tokens, hidden). recent: the hidden states of the window's earlier tokens (batch, earlier,
    hidden), or None. mask: real tokens of the window, (batch, earlier + tokens) (extra leading columns are
    ignored), or None (all real). Padding is never one of a real token's earlier tokens, wherever it sits.
    """
    earlier_count = 0 if recent is None else recent.shape[1]
    batch, tokens = hidden.shape[:2]
    total = earlier_count + tokens
    if mask is None:
        real = torch.ones(batch, total, dtype=torch.bool, device=hidden.device)
    else:
        real = mask[:, mask.shape[1] - total :].to(device=hidden.device, dtype=torch.bool)
    positions = torch.arange(total, device=hidden.device).expand(batch, total)
    last_real = torch.where(real, positions, torch.full_like(positions, -1)).cummax(-1).values
    previous = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)  # strictly before
    # Only `hidden`'s tokens are followed back, never the whole window: one generated token's earlier tokens cost
    # the same at the window's end as at its start (gathering for every window position took 1.8 ms per token
    # with 512 tokens in the window, 0.24 with 96).
    current = previous[:, earlier_count:]
    found_all = torch.ones(batch, tokens, 1, dtype=torch.bool, device=hidden.device)
    pairs = [(hidden, found_all)]
    for _ in range(window - 1):
        found = (current >= 0)[..., None]
        index = current.clamp(min=0)
        pairs.append((_states_at(hidden, recent, index) * found, found))
        current = torch.where(found[..., 0], previous.gather(1, index), current)
    return pairs


def _states_at(hidden: torch.Tensor, recent: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """The states (batch, tokens, hidden) at window positions `index` (batch, tokens): `recent`'s first, then
    `hidden`'s, without joining them into one tensor (a copy of the whole window per generated token)."""
    width = hidden.shape[2]
    if recent is None or not recent.shape[1]:
        return hidden.gather(1, index[..., None].expand(-1, -1, width))
    earlier_count = recent.shape[1]
    in_recent = (index < earlier_count)[..., None]
    from_recent = recent.gather(1, index.clamp(max=max(earlier_count - 1, 0))[..., None].expand(-1, -1, width))
    from_hidden = hidden.gather(1, (index - earlier_count).clamp(min=0)[..., None].expand(-1, -1, width))
    return torch.where(in_recent, from_recent.to(hidden.dtype), from_hidden)


def key_window_mean(
    hidden: torch.Tensor, window: int, mask: torch.Tensor | None = None, recent: torch.Tensor | None = None
) -> torch.Tensor:
    """Each token's mean hidden state over the last `window` real tokens of its attention window, itself included
    (fewer at the window's start): what a `kv` key or query is made from (`memory_key_window`). Arguments as
    `key_window_states`'."""
    if window == 1:
        return hidden
    pairs = key_window_states(hidden, window, mask, recent)
    sums = sum(states.float() for states, _ in pairs)
    counts = sum(found.float() for _, found in pairs)
    return (sums / counts).to(hidden.dtype)
