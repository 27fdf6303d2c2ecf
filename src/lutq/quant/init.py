"""Initialize a LUT layer from a full-precision weight (DESIGN.md "Initialization").

S from a rank-r SVD of the group-max-|W| map (groups of `group_size` inputs, last group padded):
A = U_r, B = V_rᵀ expanded over each group, g = Σ_r (floored at `floor`·max g); idx = nearest(W / S).
When the map has fewer than r non-trivial directions (e.g. in / group_size < r), the missing ones are
random directions orthogonal to the others with the floor g. Optional `tighten` rounds alternate exact
least-squares refits of the scales (Â·g with B̂ fixed, then B̂·g with Â fixed) and an index re-pick, and
stop as soon as the error stops falling: the error never increases.
"""

from __future__ import annotations

import torch

from lutq.core.errors import LutqError
from lutq.quant.layer import LUTLinear
from lutq.quant.lut import kmeans_lut, nearest_index

LUT_KINDS = ("uniform", "kmeans")


def group_max_abs(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |W| over each group of `group_size` consecutive inputs: [out, ceil(in / group_size)]."""
    if group_size < 1:
        raise LutqError(f"group_size must be >= 1, got {group_size}")
    out, n_in = w.shape
    pad = (-n_in) % group_size
    wa = torch.nn.functional.pad(w.abs(), (0, pad)) if pad else w.abs()
    return wa.view(out, -1, group_size).amax(dim=2)


def _orthonormal_extension(base: torch.Tensor, extra: int, gen: torch.Generator) -> torch.Tensor:
    """`extra` random unit columns orthogonal to the orthonormal columns of `base` (where dimensions allow)."""
    n, k = base.shape
    rand = torch.randn(n, extra, generator=gen, dtype=torch.float64).to(base)
    if n >= k + extra:
        q, _ = torch.linalg.qr(torch.cat([base, rand], dim=1))
        return q[:, k:]
    return rand / rand.norm(dim=0).clamp_min(1e-12)


@torch.no_grad()
def svd_scales(
    w: torch.Tensor, rank: int, group_size: int = 32, *, floor: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [out, r], B [r, in], g [r]) with unit columns / rows: the rank-r SVD of the group-max-|W| map."""
    n_in = w.shape[1]
    gmap = group_max_abs(w.detach().double(), group_size).clamp_min(1e-12)
    u, sig, vh = torch.linalg.svd(gmap, full_matrices=False)
    k = min(rank, int((sig > sig[0] * 1e-9).sum()))
    b = vh[:k].repeat_interleave(group_size, dim=1)[:, :n_in]  # the map's rows expanded over each group
    norms = b.norm(dim=1)
    a, b, g = u[:, :k], b / norms[:, None], sig[:k] * norms
    g = g.clamp_min(floor * float(g[0]))
    if k < rank:
        gen = torch.Generator().manual_seed(rank * 7919 + w.shape[0])
        a = torch.cat([a, _orthonormal_extension(a, rank - k, gen)], dim=1)
        b = torch.cat([b, _orthonormal_extension(b.t(), rank - k, gen).t()], dim=0)
        g = torch.cat([g, g.new_full((rank - k,), floor * float(g[0]))])
    return a.to(w.dtype), b.to(w.dtype), g.to(w.dtype)


def _weff(layer: LUTLinear) -> torch.Tensor:
    return layer.q() * layer.scale_map()


def relative_error(layer: LUTLinear, target: torch.Tensor, col_weight: torch.Tensor | None = None) -> float:
    """‖lut[idx] ⊙ S − W‖ / ‖W‖ for the layer's current idx and scales (columns weighted by `col_weight`)."""
    with torch.no_grad():
        t = target.to(layer.scale_A)
        d = _err_weight(t, col_weight)
        return float((_weff(layer) - t).mul(d).norm() / t.mul(d).norm().clamp_min(1e-30))


def _err_weight(t: torch.Tensor, col_weight: torch.Tensor | None) -> torch.Tensor | float:
    return 1.0 if col_weight is None else col_weight.to(t).clamp_min(0).sqrt()[None, :]


@torch.no_grad()
def repick_indices_(layer: LUTLinear, target: torch.Tensor) -> None:
    """idx = nearest(W / S): the best index for every weight given the scales (error is S²·(W/S − q)²)."""
    layer.idx.copy_(nearest_index(target.to(layer.scale_A) / layer.scale_map(), layer.lut))


@torch.no_grad()
def init_from_weight_(
    layer: LUTLinear,
    weight: torch.Tensor,
    *,
    group_size: int = 32,
    lut_kind: str = "uniform",
    tighten_rounds: int = 0,
    floor: float = 0.01,
    col_weight: torch.Tensor | None = None,
) -> float:
    """Initialize scales, LUT (uniform: kept; kmeans: fitted to W/S weighted by S²) and idx; return rel. error."""
    if lut_kind not in LUT_KINDS:
        raise LutqError(f"lut_kind must be one of {LUT_KINDS}, got {lut_kind!r}")
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise LutqError(
            f"init: weight shape {tuple(weight.shape)} does not match the layer "
            f"({layer.out_features}, {layer.in_features})"
        )
    w = weight.detach().to(device=layer.scale_A.device, dtype=torch.float32)
    a, b, g = svd_scales(w, layer.rank, group_size, floor=floor)
    layer.scale_A.copy_(a)
    layer.scale_B.copy_(b)
    layer.scale_g.copy_(g)
    if lut_kind == "kmeans":
        s = layer.scale_map()
        wt = s * s if col_weight is None else s * s * col_weight.to(s)[None, :]
        layer.lut.copy_(kmeans_lut(w / s, wt, layer.lut_size).to(layer.lut))
    repick_indices_(layer, w)
    err = tighten_(layer, w, tighten_rounds, col_weight)[-1]
    if layer.mode == "latent":
        layer.set_latent_(w)  # in units of the final scales: idx = nearest(W / S) as picked
    return err


@torch.no_grad()
def tighten_(
    layer: LUTLinear, target: torch.Tensor, rounds: int, col_weight: torch.Tensor | None = None
) -> list[float]:
    """Up to `rounds` of (LS refit of A·g, LS refit of B·g, idx re-pick), kept only while the error falls.

    Returns the error after init and after each kept round (non-increasing).
    """
    if layer.snapped:
        raise LutqError("tighten: the layer is snapped to FP16; tighten before `lutq snap`")
    t = target.to(layer.scale_A)
    errors = [relative_error(layer, t, col_weight)]
    for _ in range(rounds):
        saved = [p.detach().clone() for p in (layer.scale_A, layer.scale_B, layer.scale_g, layer.idx)]
        _refit_a_(layer, t, col_weight)
        _refit_b_(layer, t)
        repick_indices_(layer, t)
        err = relative_error(layer, t, col_weight)
        if not err < errors[-1] * (1 - 1e-6):
            for p, v in zip((layer.scale_A, layer.scale_B, layer.scale_g, layer.idx), saved, strict=True):
                p.copy_(v)
            break
        errors.append(err)
    return errors


def solve_batched(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ridge-regularized solve of gram @ x = rhs (gram [..., r, r], rhs [..., r])."""
    diag = gram.diagonal(dim1=-2, dim2=-1)
    ridge = 1e-10 * diag.mean(dim=-1, keepdim=True).clamp_min(1e-30)
    gram = gram + torch.diag_embed(ridge.expand_as(diag))
    return torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)


def _pair_products(m: torch.Tensor) -> torch.Tensor:
    """[r, n] -> [r*r, n]: all row products m_k ⊙ m_l."""
    return (m[:, None, :] * m[None, :, :]).reshape(-1, m.shape[1])


def unit_factors(layer: LUTLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Â, g, B̂) in float64, without FP16 rounding."""
    a, b = layer.scale_A.double(), layer.scale_B.double()
    return (
        a / a.norm(dim=0).clamp_min(layer.eps),
        layer.scale_g.double(),
        b / b.norm(dim=1, keepdim=True).clamp_min(layer.eps),
    )


def _refit_a_(layer: LUTLinear, t: torch.Tensor, col_weight: torch.Tensor | None = None) -> None:
    """Exact LS for a = Â·diag(g) given B̂ and Q (one r×r system per output row); g takes the column norms."""
    q = layer.q().double()
    _, _, b = unit_factors(layer)
    r = b.shape[0]
    qd = q if col_weight is None else q * col_weight.to(q)[None, :]
    gram = ((q * qd) @ _pair_products(b).t()).view(-1, r, r)
    a = solve_batched(gram, (t.double() * qd) @ b.t())
    layer.scale_A.copy_(a)
    layer.scale_g.copy_(a.norm(dim=0))


def _refit_b_(layer: LUTLinear, t: torch.Tensor) -> None:
    """Exact LS for diag(g)·B̂ given Â·g and Q (one r×r system per input column); g takes the row norms."""
    q = layer.q().double()
    ahat, g, _ = unit_factors(layer)
    a = ahat * g
    r = a.shape[1]
    gram = ((q * q).t() @ _pair_products(a.t()).t()).view(-1, r, r)
    gb = solve_batched(gram, (t.double() * q).t() @ a).t()  # [r, in]: rows of B scaled so that Â·B = Â·g·B̂
    norms = gb.norm(dim=1)
    layer.scale_B.copy_(gb)
    layer.scale_g.copy_(g * norms)
