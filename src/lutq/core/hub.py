"""Reaching the Hugging Face hub: is it in offline mode, can it be reached at all, and running a hub client
offline. One home for what `--model HUB_ID` (lutq.models.load) and `hf:NAME` data sources (lutq.data.sources)
both need: on a machine without the hub, fail or fall back to the local cache in seconds, not after the
clients' ~25 s of retries."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def hub_offline() -> bool:
    """True when the user has put the hub clients in offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def hub_unreachable(url: str | None = None, timeout: float = 3.0) -> str | None:
    """Why `url`'s host (default: the hub's endpoint; or the HTTPS proxy in use) cannot be reached within
    `timeout` seconds, or None when it can.

    A TCP connect in a daemon thread, so neither a slow DNS resolver nor dropped packets can hang the caller."""
    import socket
    import urllib.parse
    import urllib.request

    if url is None:
        from huggingface_hub import constants

        url = constants.ENDPOINT
    proxy = urllib.request.getproxies().get("https")
    target = urllib.parse.urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return f"no host in {url!r}"
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f}s"


@contextmanager
def offline_hub(*modules: Any) -> Iterator[None]:
    """Run hub clients in offline mode inside the block: they read the local cache and fail at once instead of
    retrying. The clients read HF_HUB_OFFLINE when imported, so this sets the module flags they keep
    (huggingface_hub's, and `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` of each module given, e.g.
    datasets.config) and restores them after."""
    from huggingface_hub import constants

    targets = [constants, *(m for m in modules if m is not None)]
    saved = [
        (m, name, getattr(m, name))
        for m in targets
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if hasattr(m, name)
    ]
    try:
        for m, name, _ in saved:
            setattr(m, name, True)
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
