"""Quant tests work on tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a shared CPU
(tiny ops were ~40× slower with 2 threads under load). Restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
