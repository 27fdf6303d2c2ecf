"""Init error on the real SmolLM2-135M-Instruct teacher for q4a4 and q2a4 (the table in docs/quant.md)."""

from __future__ import annotations

import copy

import pytest

from lutq.core import console
from lutq.quant import quantize, storage

# measured once (docs/quant.md): mean relative error ‖W_eff − W‖/‖W‖ per group, uniform LUT, no tighten
EXPECTED = {"q4a4": {"mlp": 0.113, "attn": 0.113}, "q2a4": {"mlp": 0.474, "attn": 0.106}}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["q4a4", "q2a4"])
def test_teacher_init_error(teacher, preset: str) -> None:
    model = copy.deepcopy(teacher[0])  # the session fixture is shared: never quantize it in place
    report = quantize(model, preset, progress=False)
    console.print(report.table(per_layer=False))
    assert len(report.rows) == 30 * 7  # every q/k/v/o/gate/up/down of the 30 layers
    for group, expect in EXPECTED[preset].items():
        assert report.mean_error(group) == pytest.approx(expect, abs=0.01), group
        assert report.max_error(group) < 2 * expect
    # 1536×576 MLP matrices: 2 + 16·32·(1536 + 576 + 1)/(1536·576) bpw at q2a4, 4 + 16·4·(…) at q4a4
    bpw = storage.size_report(model)["groups"]["mlp"]["bits_per_weight"]
    assert bpw == pytest.approx(3.223 if preset == "q2a4" else 4.153, abs=1e-3)
