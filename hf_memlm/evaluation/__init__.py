"""Evaluation of memory LMs: retrieval accuracy by distance, perplexity by segment position, reports.

```python
from hf_memlm.evaluation import evaluate_retrieval, evaluate_perplexity, write_report
results = evaluate_retrieval(model, make_passkey_dataset(...), batch_size=8, baselines=True, task="passkey")
write_report(results, "outputs/eval")   # passkey.json, passkey.md, passkey.png
```
Every result holds the memory model and, with `baselines=True`, the same weights with memory disabled
and (retrieval) the base model alone reading its own window; see `conditions.py` for what each sees.
"""

from .conditions import BASE_MODEL, CONDITIONS, MEMORY, MEMORY_DISABLED, describe_conditions
from .perplexity import evaluate_perplexity
from .report import environment, environment_line, format_markdown, plot_results, write_report
from .retrieval import answer_spans, bucket_by_segments, bucket_by_tokens, evaluate_retrieval, greedy_answer
from .task_data import answer_alphabet, retrieval_dataset

__all__ = [
    "BASE_MODEL",
    "CONDITIONS",
    "MEMORY",
    "MEMORY_DISABLED",
    "answer_alphabet",
    "answer_spans",
    "bucket_by_segments",
    "bucket_by_tokens",
    "describe_conditions",
    "environment",
    "environment_line",
    "evaluate_perplexity",
    "evaluate_retrieval",
    "format_markdown",
    "greedy_answer",
    "plot_results",
    "retrieval_dataset",
    "write_report",
]
