"""Shared fixtures: tiny random models of the three architectures, and the real teacher (slow tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lutq.testing import TINY_ARCHITECTURES, require_asset, tiny_model, tiny_tokenizer

TEACHER = "smollm2-135m-instruct"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Seed torch, and run tiny-model tests on one intra-op thread: on a busy 2-core machine two OpenMP
    threads spin against other processes and make tiny ops 10-60x slower. Tests marked `slow` (the real
    teacher) keep all threads."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    if "slow" not in request.keywords:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over 'qwen3', 'llama', 'gemma3'."""
    return request.param


@pytest.fixture
def tiny(tiny_arch: str) -> torch.nn.Module:
    """A tiny random model of each supported architecture."""
    return tiny_model(tiny_arch)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level tokenizer with a Qwen3-style chat template."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def teacher():
    """The real SmolLM2-135M-Instruct teacher (model, tokenizer), loaded once per session."""
    require_asset(TEACHER)
    from lutq.models import load_model

    return load_model(TEACHER)
