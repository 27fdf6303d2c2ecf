"""LUT math: FP16 rounding (plain and straight-through), LUT builders (uniform, weighted k-means), true
nearest-entry search for any sorted LUT, and index bit-packing for storage."""

from __future__ import annotations

import math

import torch

from lutq.core.errors import LutqError

FP16_MAX = 65504.0
_CHUNK = 1 << 22  # elements per nearest-search chunk (bounds the int64 temporaries)


# --------------------------------------------------------------------------------------------- FP16 helpers
def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP16 value (clamped to ±65504), returned in x's dtype."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)


def ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """FP16 rounding in the forward, identity gradient in the backward (straight-through)."""
    return x + (round_fp16(x) - x).detach()


def is_fp16_exact(x: torch.Tensor) -> bool:
    """True when every value of x is exactly representable in FP16."""
    return bool(torch.equal(round_fp16(x), x))


# --------------------------------------------------------------------------------------------- LUT builders
def uniform_lut(n: int) -> torch.Tensor:
    """Symmetric uniform LUT linspace(-1, 1, n) snapped to FP16 (no zero for even n), float32."""
    _check_size(n)
    return repair_lut(round_fp16(torch.linspace(-1.0, 1.0, n, dtype=torch.float64)).float())


def kmeans_lut(
    values: torch.Tensor, weights: torch.Tensor | None, n: int, *, iters: int = 50, max_points: int = 1 << 16
) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd, quantile init) of `values` into n centroids; FP16-exact, strictly increasing.

    The values are sorted once, after which each Lloyd step is a searchsorted of the n-1 cluster
    boundaries plus prefix sums. Beyond `max_points` values a fixed-seed uniform subsample is clustered.
    """
    _check_size(n)
    v = values.detach().reshape(-1).float().cpu()
    w = torch.ones_like(v) if weights is None else weights.detach().reshape(-1).float().cpu().clamp_min(0)
    if v.numel() > max_points:
        pick = torch.randint(v.numel(), (max_points,), generator=torch.Generator().manual_seed(0))
        v, w = v[pick], w[pick]
    keep = torch.isfinite(v) & torch.isfinite(w)
    v, w = v[keep].double(), w[keep].double()
    if v.numel() == 0 or float(w.sum()) <= 0:
        raise LutqError(f"kmeans_lut: no finite points with positive weight among {values.numel()} values")
    v, order = torch.sort(v)
    w = w[order]
    cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])
    cwv = torch.cat([w.new_zeros(1), torch.cumsum(w * v, 0)])
    total = float(cw[-1])
    # init: weighted quantiles at the cluster mid-masses
    targets = (torch.arange(n, dtype=torch.float64) + 0.5) / n * total
    centers = _distinct_init(v, v[torch.searchsorted(cw[1:], targets).clamp(max=v.numel() - 1)], n)
    for _ in range(iters):
        centers = torch.sort(centers).values
        cut = torch.searchsorted(v, (centers[1:] + centers[:-1]) / 2)
        lo = torch.cat([cut.new_zeros(1), cut])
        hi = torch.cat([cut, cut.new_full((1,), v.numel())])
        mass = cw[hi] - cw[lo]
        new = torch.where(mass > 0, (cwv[hi] - cwv[lo]) / mass.clamp_min(1e-300), centers)
        if torch.equal(new, centers):
            break
        centers = new
    if centers.numel() < n:  # fewer distinct values than entries: pad, repair_lut spreads them by ulps
        centers = torch.cat([centers, centers.max().repeat(n - centers.numel())])
    return repair_lut(round_fp16(torch.sort(centers).values).float())


def _distinct_init(v_sorted: torch.Tensor, picks: torch.Tensor, n: int) -> torch.Tensor:
    """Make the initial centroids distinct (duplicates would leave clusters empty for ever)."""
    picks = torch.unique(picks)
    if picks.numel() == n:
        return picks
    uniq = torch.unique_consecutive(v_sorted)
    if uniq.numel() <= n:
        return uniq
    return uniq[torch.linspace(0, uniq.numel() - 1, n).round().long()]  # n distinct, evenly by rank


def repair_lut(lut: torch.Tensor) -> torch.Tensor:
    """Sort, snap to FP16 and make strictly increasing by nudging duplicates up by FP16 ulps (float32 out)."""
    h = torch.sort(round_fp16(lut.detach().float())).values.to(torch.float16)
    inf = torch.tensor(float("inf"), dtype=torch.float16)
    for i in range(1, h.numel()):
        if h[i] <= h[i - 1]:
            h[i] = torch.nextafter(h[i - 1], inf)
    if not torch.isfinite(h).all():
        raise LutqError(f"repair_lut: cannot make {lut.tolist()} strictly increasing within FP16 range")
    return h.float()


def check_lut(lut: torch.Tensor, where: str = "lut") -> None:
    """Raise LutqError unless the LUT is FP16-exact, finite and strictly increasing."""
    v = lut.detach()
    if v.dim() != 1 or not 2 <= v.numel() <= 256:
        raise LutqError(f"{where}: a LUT is a 1-D tensor of 2..256 entries, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all() or not is_fp16_exact(v.float()):
        raise LutqError(f"{where}: LUT entries must be finite FP16 values, got {v.tolist()}")
    if not bool((v[1:] > v[:-1]).all()):
        raise LutqError(f"{where}: LUT must be strictly increasing, got {v.tolist()}")


def _check_size(n: int) -> None:
    if not isinstance(n, int) or not 2 <= n <= 256:
        raise LutqError(f"LUT size must be an integer in 2..256, got {n!r}")


# ----------------------------------------------------------------------------------------- nearest search
@torch.no_grad()
def nearest_index(x: torch.Tensor, lut: torch.Tensor, *, chunk: int = _CHUNK, check: bool = True) -> torch.Tensor:
    """Index of the nearest entry of a sorted LUT for every element of x (ties go to the lower entry); uint8.

    A true nearest search for any sorted LUT (uniform or not): the index is the number of midpoints between
    neighbouring entries (computed in x's precision) that x exceeds. NaN maps like 0; ±inf map to the end entries.
    `check=False` skips verifying that the LUT increases (a device sync on a GPU): for a layer's own LUT, whose
    invariants `check_lut` and `project_()` keep, on the training step's hot path.
    """
    if lut.numel() > 256:
        raise LutqError(f"nearest_index: LUT has {lut.numel()} entries, at most 256 fit uint8 indices")
    lut = lut.detach().to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if check and not bool((lut[1:] > lut[:-1]).all()):
        raise LutqError(f"nearest_index: LUT must be strictly increasing, got {lut.tolist()}")
    mids = (lut[1:] + lut[:-1]) / 2
    flat = x.detach().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    for s in range(0, flat.numel(), chunk):
        part = torch.nan_to_num(flat[s : s + chunk].to(lut.dtype), nan=0.0)
        if mids.numel() < 32:  # counting passed midpoints beats a binary search for small LUTs (~3×)
            acc = torch.zeros(part.shape, dtype=torch.uint8, device=part.device)
            for m in mids:
                acc += part > m
            out[s : s + chunk] = acc
        else:
            out[s : s + chunk] = torch.bucketize(part, mids).to(torch.uint8)
    return out.view(x.shape)


# ------------------------------------------------------------------------------------------------ packing
def index_bits(lut_size: int) -> int:
    """Bits needed for indices into a LUT of lut_size entries (ceil(log2 n))."""
    return max(1, math.ceil(math.log2(lut_size)))


def storage_bits(bits: int) -> int:
    """Bits per index on disk: `bits` rounded up to 1, 2, 4 or 8 (whole indices per byte)."""
    if not 1 <= bits <= 8:
        raise LutqError(f"index bits must be in 1..8, got {bits}")
    return next(b for b in (1, 2, 4, 8) if b >= bits)


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 indices into a flat uint8 tensor, 8/b per byte (b = storage_bits(bits)).

    Layout: element j sits in byte j // (8/b) at bit offset (j % (8/b))·b (little-endian within the byte);
    the last byte is zero-padded. 8-bit indices are stored as is.
    """
    b = storage_bits(bits)
    flat = idx.detach().reshape(-1).to(torch.uint8).cpu()
    if flat.numel() and int(flat.max()) >= 1 << b:
        raise LutqError(f"pack_indices: index {int(flat.max())} does not fit in {b} bits")
    if b == 8:
        return flat.clone()
    per = 8 // b
    pad = (-flat.numel()) % per
    grid = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * b
    return (grid << shifts).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of pack_indices: uint8 indices of `shape`."""
    b = storage_bits(bits)
    n = math.prod(shape)
    per = 8 // b
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(n / per):
        raise LutqError(
            f"unpack_indices: expected {math.ceil(n / per)} packed uint8 bytes for shape "
            f"{tuple(shape)} at {b} bits, got {packed.dtype} {tuple(packed.shape)}"
        )
    if b == 8:
        return packed.clone().view(tuple(shape))
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * b
    vals = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << b) - 1)
    return vals.reshape(-1)[:n].to(torch.uint8).view(tuple(shape))
