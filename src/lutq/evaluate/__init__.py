"""Evaluation: sliding-window perplexity, comparison tables (ppl, KD metrics, size), chat generation."""

from lutq.evaluate.chat import ChatConfig, build_prompt, generate_reply, supports_thinking
from lutq.evaluate.compare import CompareConfig, CompareResult, compare, evaluate_model
from lutq.evaluate.perplexity import DOCUMENT_SEPARATOR, PplConfig, PplResult, perplexity, windows
from lutq.evaluate.size import model_size, size_table

__all__ = [
    "DOCUMENT_SEPARATOR",
    "ChatConfig",
    "CompareConfig",
    "CompareResult",
    "PplConfig",
    "PplResult",
    "build_prompt",
    "compare",
    "evaluate_model",
    "generate_reply",
    "model_size",
    "perplexity",
    "size_table",
    "supports_thinking",
    "windows",
]
