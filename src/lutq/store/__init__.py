"""Artefact store: push/pull named, checksummed `.tar.zst` / `.tar.lz4` archives to any fsspec URL, with
shortcuts (`cache:L64`, `ckpt:q2_best`) so a fresh machine is set up with one `lutq pull`."""

from lutq.store.archive import CODECS, pack, unpack
from lutq.store.store import Manifest, Shortcut, Store, default_store_url, matches

__all__ = ["CODECS", "Manifest", "Shortcut", "Store", "default_store_url", "matches", "pack", "unpack"]
