"""lm-evaluation-harness for memory LMs: the `hf-memlm` model type.

lm-eval's `hf` model cuts every context to the base model's window (it reads `max_position_embeddings`
from `text_config`), so a memory LM would never see the long context its memory is for. The `hf-memlm`
model type keeps whole contexts (or up to a `max_length` you give), and builds generation batches from
contexts of one token length, so no row is padded and results do not depend on `batch_size`.

Command line (registers the model type, then runs lm-eval's own command line with these arguments):

    python -m hf_memlm.integrations.lm_eval --model hf-memlm \
        --model_args pretrained=outputs/passkey_cpu --tasks TASK --batch_size 8

Python:

    import lm_eval
    import hf_memlm.integrations.lm_eval  # registers "hf-memlm"
    lm_eval.simple_evaluate(model="hf-memlm", model_args={"pretrained": "outputs/passkey_cpu"}, tasks=[...])

The long-context suite (RULER and BABILong tasks generated offline, `hf_memlm/integrations/lm_eval_tasks.py`)
ships as local tasks; the command line adds their folder to `--include_path` by itself:

    python -m hf_memlm.integrations.lm_eval --model_args pretrained=outputs/passkey_cpu \
        --tasks memlm_ruler memlm_babilong --metadata '{"lengths": ["4k"], "num_examples": 20}'

A context holding `DOCUMENT_END` is answered as `hf-memlm eval --suite` answers it: the text before the mark
is read into memory, the text after it is asked in a fresh call (greedy), so both give the same scores.

Needs `pip install "hf-memlm[lm-eval]"`.
"""

from __future__ import annotations

import sys

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'hf_memlm.integrations.lm_eval needs lm-evaluation-harness: pip install "hf-memlm[lm-eval]"'
    ) from error

from hf_memlm.evaluation.suite import answer_from_memory

from .lm_eval_tasks import DOCUMENT_END, tasks_dir

# importing this module ran hf_memlm/__init__.py, which registers model_type "memlm" with AutoModelForCausalLM

MODEL_TYPE = "hf-memlm"
# "No truncation": lm-eval keeps the last `max_length` tokens of a context, and a memory LM reads any length.
WHOLE_CONTEXT = 2**31 - 1


@register_model(MODEL_TYPE, "memlm")
class MemLMEvalModel(HFLM):
    """lm-eval's `HFLM` for `MemLMForCausalLM` models.

    Arguments are those of `HFLM` (`pretrained`: a folder, Hub id or loaded model; `batch_size`, `device`,
    `dtype`, `trust_remote_code`, ...), except:

    * `max_length`: the longest context kept, in tokens (lm-eval keeps the last `max_length`); default: no
      limit, the whole context is read segment by segment into memory. (`hf` would use the base model's
      `max_position_embeddings`.)
    * `batch_size="auto"` is refused: it probes batch sizes with inputs of `max_length` tokens.
    """

    def __init__(self, pretrained="", max_length: int | None = None, batch_size: int | str = 1, **kwargs):
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ValueError(
                f"{MODEL_TYPE}: batch_size={batch_size!r} is not supported (it probes with inputs of max_length tokens, "
                "and a memory LM reads contexts of any length); pass a number, e.g. --batch_size 8."
            )
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"{MODEL_TYPE}: max_length={max_length!r} must be a positive number of tokens.")
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, max_length=max_length or WHOLE_CONTEXT, batch_size=batch_size, **kwargs)
        if getattr(self.model.config, "model_type", None) != "memlm":
            raise ValueError(
                f"{MODEL_TYPE}: {pretrained!r} is a {type(self.model).__name__}, not an hf_memlm model; "
                "use lm-eval's `hf` model type for it."
            )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation in batches of contexts with the same number of tokens: no row is padded, so each
        continuation is the one the context gets alone, whatever `batch_size` is. A context holding
        `DOCUMENT_END` is a document read into memory and a question asked in a fresh call (one at a time)."""
        groups: dict[int, list[int]] = {}
        results: list[str | None] = [None] * len(requests)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            if DOCUMENT_END in context:
                results[index] = self._answer_from_memory(context, dict(gen_kwargs))
                continue
            context_ids, _ = self.tok_batch_encode([request.args[0]])
            groups.setdefault(context_ids.shape[1], []).append(index)
        for indices in groups.values():
            outputs = super().generate_until([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for index, output in zip(indices, outputs):
                results[index] = output
        return results

    def _answer_from_memory(self, context: str, gen_kwargs: dict) -> str:
        document, _, prompt = context.partition(DOCUMENT_END)
        if gen_kwargs.pop("do_sample", False):
            raise ValueError(f"{MODEL_TYPE}: the memlm long-context tasks generate greedily (do_sample: false).")
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else until
        max_new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        reply = answer_from_memory(self.model, self.tokenizer, document, prompt, max_new_tokens)
        for stop in until:  # lm-eval cuts a reply at its stop sequences
            reply = reply.split(stop)[0] if stop else reply
        return reply


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `hf-memlm` model type registered (`--model hf-memlm` by default)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    command = args[:1] if args[:1] in (["run"], ["ls"], ["validate"]) else []
    options = args[len(command) :]
    runs = command in ([], ["run"]) and options and not {"-h", "--help"} & set(options)
    if runs and not any(arg == "--model" or arg.startswith("--model=") for arg in options):
        options = ["--model", MODEL_TYPE, *options]
    if runs and not any(arg == "--include_path" or arg.startswith("--include_path=") for arg in options):
        options = [*options, "--include_path", str(tasks_dir())]  # the memlm long-context tasks
    sys.argv = [sys.argv[0], *command, *options]
    cli_evaluate()


__all__ = ["MODEL_TYPE", "WHOLE_CONTEXT", "MemLMEvalModel", "main"]


if __name__ == "__main__":
    main()
