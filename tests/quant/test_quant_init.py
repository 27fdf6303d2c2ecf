"""Init: group max-abs map, SVD scales, nearest indices, k-means LUTs, tighten rounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from lutq.core import LutqError
from lutq.quant import LUTLinear
from lutq.quant.init import group_max_abs, init_from_weight_, relative_error, svd_scales, tighten_
from lutq.quant.lut import is_fp16_exact, nearest_index


def _weight(out: int = 64, n_in: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows and columns of different magnitude, heavy-ish tails: like real layers
    return (
        torch.randn(out, n_in, generator=g)
        * (0.2 + torch.rand(out, 1, generator=g))
        * (0.5 + torch.rand(1, n_in, generator=g))
        * torch.randn(out, n_in, generator=g).abs().sqrt()
    )


def test_group_max_abs_pads_the_last_group() -> None:
    w = torch.arange(2 * 70, dtype=torch.float32).view(2, 70) - 50
    m = group_max_abs(w, 32)
    assert m.shape == (2, 3)
    assert m[0].tolist() == [50.0, 18.0, 19.0] and m[1, 2].item() == 89.0
    with pytest.raises(LutqError, match="group_size"):
        group_max_abs(w, 0)


def test_svd_scales_reproduce_a_rank_one_map() -> None:
    rows, cols = torch.rand(16) + 0.5, torch.rand(4) + 0.5
    w = rows[:, None] * cols.repeat_interleave(32)[None, :]  # group map is exactly rank 1
    a, b, g = svd_scales(w, 3, 32)
    assert torch.allclose(a.norm(dim=0), torch.ones(3), atol=1e-5)
    assert torch.allclose(b.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(a[:, :1] * g[0] @ b[:1], w, rtol=1e-4)
    assert g[1] == pytest.approx(0.01 * g[0].item(), rel=1e-5)  # missing directions: floored g
    assert abs(float(a[:, 0] @ a[:, 1])) < 1e-5 and abs(float(b[0] @ b[1])) < 1e-5  # orthogonal extra direction


def test_init_indices_are_the_true_nearest_entries() -> None:
    w = _weight()
    layer = LUTLinear(96, 64, 16, 4)
    err = init_from_weight_(layer, w)
    s = layer.scale_map().detach()
    assert torch.equal(layer.idx, nearest_index(w / s, layer.lut))
    assert err == pytest.approx(relative_error(layer, w))
    assert float((layer.effective_weight().detach() - w).norm() / w.norm()) == pytest.approx(err, rel=1e-5)


def test_init_error_table_is_sane_and_tighten_never_increases() -> None:
    w = _weight()
    errs = {}
    for n, kind in [(16, "uniform"), (16, "kmeans"), (4, "uniform"), (4, "kmeans")]:
        layer = LUTLinear(96, 64, n, 4)
        errs[n, kind] = init_from_weight_(layer, w, lut_kind=kind)
        assert is_fp16_exact(layer.lut) and bool((layer.lut[1:] > layer.lut[:-1]).all())
        history = tighten_(layer, w, 4)
        assert history[0] == pytest.approx(errs[n, kind])
        assert all(b < a for a, b in itertools.pairwise(history)), history
        assert relative_error(layer, w) == pytest.approx(history[-1])
        assert history[-1] < errs[n, kind] - 0.005  # tightening actually helps on this weight
    assert errs[16, "uniform"] < 0.2 and errs[4, "uniform"] < 1.0
    assert errs[16, "uniform"] < errs[4, "uniform"]
    assert errs[16, "kmeans"] < errs[16, "uniform"] and errs[4, "kmeans"] < errs[4, "uniform"]


def test_tighten_restores_when_it_cannot_improve() -> None:
    layer = LUTLinear(32, 16, 16, 2)
    init_from_weight_(layer, _weight(16, 32))
    target = layer.effective_weight().detach().clone()  # exactly representable: error 0, nothing to gain
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert tighten_(layer, target, 3) == [0.0]
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_init_rejects_bad_input() -> None:
    layer = LUTLinear(8, 4, 4, 1)
    with pytest.raises(LutqError, match="shape"):
        init_from_weight_(layer, torch.randn(8, 4))
    with pytest.raises(LutqError, match="lut_kind"):
        init_from_weight_(layer, torch.randn(4, 8), lut_kind="magic")
