"""Evaluation: sliding-window perplexity, comparison tables (ppl, KD metrics, size), chat generation."""

from lutq.core.lazy import lazy_exports

_EXPORTS = {
    "ChatConfig": "lutq.evaluate.chat",
    "build_prompt": "lutq.evaluate.chat",
    "generate_reply": "lutq.evaluate.chat",
    "supports_thinking": "lutq.evaluate.chat",
    "CompareConfig": "lutq.evaluate.compare",
    "CompareResult": "lutq.evaluate.compare",
    "compare": "lutq.evaluate.compare",
    "evaluate_model": "lutq.evaluate.compare",
    "DOCUMENT_SEPARATOR": "lutq.evaluate.perplexity",
    "PplConfig": "lutq.evaluate.perplexity",
    "PplResult": "lutq.evaluate.perplexity",
    "perplexity": "lutq.evaluate.perplexity",
    "windows": "lutq.evaluate.perplexity",
    "model_size": "lutq.evaluate.size",
    "size_table": "lutq.evaluate.size",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
