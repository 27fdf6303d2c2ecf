"""Export fixtures: a tiny q2a4 model of each architecture and the byte-level tokenizer."""

from __future__ import annotations

import pytest

from lutq.testing import tiny_model


@pytest.fixture
def lut_tiny(tiny_arch: str):
    """A tiny q2a4 model (not snapped) of each architecture."""
    from lutq.quant import quantize

    model = tiny_model(tiny_arch)
    quantize(model, "q2a4", progress=False)
    return model
