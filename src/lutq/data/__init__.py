"""KD data: documents from corpora, files and HF datasets; chat-template rendering with thinking modes;
packing into L-token blocks. (`lutq.data.tokens` holds the pretraining token memmaps.)"""

from lutq.assets.corpora import Document
from lutq.data.render import (
    THINKING_MODES,
    iter_render,
    mix_shares,
    pack,
    render,
    render_text,
    spread,
    spread_or_pack,
    strip_thinking,
    tokenizer_fingerprint,
)
from lutq.data.sources import DEFAULT_VAL_FRACTION, document_splits, load_documents, one_or_mix, source_name

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "THINKING_MODES",
    "Document",
    "document_splits",
    "iter_render",
    "load_documents",
    "mix_shares",
    "one_or_mix",
    "pack",
    "render",
    "render_text",
    "source_name",
    "spread",
    "spread_or_pack",
    "strip_thinking",
    "tokenizer_fingerprint",
]
