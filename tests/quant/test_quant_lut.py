"""LUT math: FP16 rounding, LUT builders, exact nearest search, index packing."""

from __future__ import annotations

import math

import pytest
import torch

from lutq.core import LutqError
from lutq.quant.lut import (
    check_lut,
    is_fp16_exact,
    kmeans_lut,
    nearest_index,
    pack_indices,
    repair_lut,
    round_fp16,
    ste_fp16,
    storage_bits,
    uniform_lut,
    unpack_indices,
)


def _valid(lut: torch.Tensor) -> bool:
    return is_fp16_exact(lut) and bool((lut[1:] > lut[:-1]).all())


def test_round_and_ste_fp16() -> None:
    x = torch.tensor([1e-8, 0.1, 1 / 3, 70000.0, -1e6], requires_grad=True)
    y = ste_fp16(x)
    assert is_fp16_exact(y.detach())
    assert y[3].item() == 65504.0 and y[4].item() == -65504.0  # clamped to the FP16 range
    assert y[2].item() == torch.tensor(1 / 3).half().float().item()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))  # straight-through
    assert torch.equal(round_fp16(y.detach()), y.detach())


@pytest.mark.parametrize("n", [2, 3, 4, 16, 100, 256])
def test_uniform_lut(n: int) -> None:
    lut = uniform_lut(n)
    assert lut.numel() == n and _valid(lut) and lut[0] == -1 and lut[-1] == 1
    check_lut(lut)
    if n == 4:
        assert torch.allclose(lut, torch.tensor([-1, -1 / 3, 1 / 3, 1]), atol=1e-3) and 0 not in lut


def test_kmeans_lut_weighted_and_valid() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-2.0, -0.5, 0.25, 3.0])
    values = centers[torch.randint(0, 4, (50_000,), generator=g)] + 0.01 * torch.randn(50_000, generator=g)
    lut = kmeans_lut(values, None, 4)
    assert _valid(lut) and torch.allclose(lut, centers, atol=0.01)
    # a heavy weight on one point pulls a centroid onto it
    w = torch.ones(5)
    pts = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1])
    w[4] = 1e6
    lut2 = kmeans_lut(pts, w, 2)
    assert abs(lut2[1].item() - 5.1) < 0.01


def test_kmeans_lut_degenerate_inputs_stay_unique() -> None:
    lut = kmeans_lut(torch.tensor([0.5, 0.5, 0.5, -0.5]), None, 4)  # 2 distinct values, 4 entries
    assert lut.numel() == 4 and _valid(lut)
    lut = kmeans_lut(torch.tensor([1.0, float("nan"), float("inf"), 2.0]), torch.ones(4), 2)
    assert _valid(lut) and lut.tolist() == [1.0, 2.0]
    with pytest.raises(LutqError, match="no finite points"):
        kmeans_lut(torch.tensor([float("nan")]), None, 2)


def test_repair_lut_nudges_duplicates_by_ulps() -> None:
    lut = repair_lut(torch.tensor([0.3, 0.1, 0.1, 0.1 + 1e-7]))
    assert _valid(lut) and lut.numel() == 4 and lut[0] == round_fp16(torch.tensor(0.1))
    with pytest.raises(LutqError, match="strictly increasing"):
        check_lut(torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_index_exact_vs_brute_force(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    for n in (2, 4, 16, 37, 256):
        raw = torch.randn(n, generator=g) * torch.rand(1, generator=g) * 3
        lut = repair_lut(raw) if n < 256 else uniform_lut(256)  # non-uniform for n < 256
        x = (torch.randn(513, 7, generator=g) * 2).to(dtype)
        x[0, :3] = torch.tensor([1e3, -1e3, 100.0], dtype=dtype)  # far outside the LUT
        brute = (x.unsqueeze(-1) - lut.to(dtype)).abs().argmin(-1)
        got = nearest_index(x, lut, chunk=1000)  # several chunks
        assert got.dtype == torch.uint8 and got.shape == x.shape
        assert torch.equal(got.long(), brute), n
        assert torch.equal(nearest_index(x, lut, check=False), got)  # the hot path's unchecked call: same answer
    special = nearest_index(torch.tensor([float("nan"), float("inf"), float("-inf")]), uniform_lut(4))
    assert special.tolist() == [1, 3, 0]  # NaN like 0 (tie -> lower entry), ±inf -> the end entries
    with pytest.raises(LutqError, match="increasing"):
        nearest_index(torch.zeros(3), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (5, 11), (2, 3, 5)])
def test_pack_unpack_round_trip(bits: int, shape: tuple[int, ...]) -> None:
    idx = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack_indices(idx, bits)
    b = storage_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(math.prod(shape) * b / 8)
    assert torch.equal(unpack_indices(packed, bits, shape), idx)


def test_pack_layout_and_errors() -> None:
    assert pack_indices(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_indices(torch.tensor([15, 1, 7], dtype=torch.uint8), 4).tolist() == [15 | 1 << 4, 7]
    with pytest.raises(LutqError, match="does not fit"):
        pack_indices(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(LutqError, match="expected 2 packed"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 2, (2, 4))
