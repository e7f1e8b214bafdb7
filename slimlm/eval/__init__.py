"""Evaluation: perplexity on a built-in offline corpus, task accuracy, and speed and footprint of a model.

corpus.py      deterministic English text from the standard library's docstrings, split calibration / heldout
perplexity.py  sliding-window perplexity (HF's protocol), fp32 log-softmax in chunks
task_accuracy.py  greedy answers to JSONL chat records, exact match or a bundled task's metric
speed.py       prefill / decode tokens/s, size on disk, peak RSS
cli.py         `slimlm eval`
"""

from slimlm.eval.corpus import builtin_corpus, builtin_documents, corpus_info
from slimlm.eval.perplexity import perplexity, perplexity_of_ids, sliding_windows
from slimlm.eval.speed import SpeedConfig, disk_size, measure_speed, memory_report, peak_rss_bytes
from slimlm.eval.task_accuracy import task_accuracy

__all__ = [
    "SpeedConfig",
    "builtin_corpus",
    "builtin_documents",
    "corpus_info",
    "disk_size",
    "measure_speed",
    "memory_report",
    "peak_rss_bytes",
    "perplexity",
    "perplexity_of_ids",
    "sliding_windows",
    "task_accuracy",
]
