"""LUTLinear: W_eff = lut[idx] ⊙ (Â·diag(g)·B̂), trained by materializing W_eff once per forward.

Â / B̂ are scale_A's columns / scale_B's rows scaled to unit norm, so only g carries magnitude. Modes:
  frozen  idx is a fixed uint8 buffer; gradients reach scale_A, scale_B, scale_g (and the LUT if trained).
  latent  a trainable full-precision `latent` u = W / S, in units of the scale map (of the LUT); idx =
          nearest(u) is re-picked every forward and the quantizer is straight-through: with w = u ⊙ S,
          W_q = w + stopgrad(lut[idx]·S − w). `freeze()` → frozen. In scale units one learning rate moves every
          layer's weights by the same fraction of a bin (in weight units the bins of SmolLM2-135M's layers
          differ 10×, and the layers with narrow bins flip indices 9× as often: docs/train.md).
After `snapped = True` (see lutq.quant.snap) the scales are baked: scale_A = Â·g, scale_g = 1, and the
forward uses scale_A / scale_B as they are (no normalization), so the FP16 numbers are used exactly.

A trainable LUT (`set_trainable("lut")`) is an nn.Parameter that the forward reads through ste_fp16;
call `project_()` after each optimizer step to restore the invariants (sorted with idx remapped,
FP16-exact, strictly increasing). `lutq.quant.project_luts_(model)` does it for a whole model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lutq.core.errors import LutqError
from lutq.quant.lut import check_lut, nearest_index, repair_lut, round_fp16, ste_fp16, uniform_lut

MODES = ("frozen", "latent")
# per-layer trainable switches -> the parts they unfreeze
TRAINABLE = {"all": {"A", "B", "g"}, "g": {"g"}, "ab": {"A", "B"}, "lut": {"lut"}, "none": set()}


def _weight_over_scale(weight: torch.Tensor, s: torch.Tensor, lut: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """weight / S, the latent weights' units (where S = 0: lut[idx], the centre of the index's bin)."""
    return torch.where(s != 0, weight.detach().to(s) / s, lut[idx.long()].to(s))


_KEEP_Q_CACHE = [0]  # > 0 inside keep_q_cache()


def _graph_capture_active() -> bool:
    """True while fx, dynamo / export, jit or a functorch transform traces the forward (the Q cache stays out).
    The fx and functorch probes are private, so look them up defensively: GPU machines keep their own torch."""
    fx = torch.fx._symbolic_trace
    return bool(
        getattr(fx, "_is_fx_tracing_flag", False)
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()
    )


@contextlib.contextmanager
def keep_q_cache() -> Iterator[None]:
    """Within: LUT layers keep their forward's Q cache under no_grad too (for many no_grad passes over the same
    indices, as block-wise calibration makes), at 2 bytes per quantized weight."""
    _KEEP_Q_CACHE[0] += 1
    try:
        yield
    finally:
        _KEEP_Q_CACHE[0] -= 1


class LUTLinear(nn.Module):
    """Linear layer with palettized weights and low-rank scales (DESIGN.md "The LUT linear layer")."""

    lutq_quantized = True
    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lut_size: int = 16,
        rank: int = 4,
        *,
        bias: bool = False,
        mode: str = "frozen",
        lut: torch.Tensor | None = None,
        factored: bool = False,
        ste_fp16: bool = False,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise LutqError(f"LUTLinear: mode must be one of {MODES}, got {mode!r}")
        if rank < 1:
            raise LutqError(f"LUTLinear: rank must be >= 1, got {rank}")
        lut = uniform_lut(lut_size) if lut is None else lut.detach().float().clone()
        if lut.numel() != lut_size:
            raise LutqError(f"LUTLinear: lut has {lut.numel()} entries, lut_size is {lut_size}")
        if lut.device.type != "meta":
            check_lut(lut)
        fk: dict[str, Any] = {"device": device, "dtype": dtype or torch.float32}
        self.in_features, self.out_features = in_features, out_features
        self.lut_size, self.rank, self.mode, self.eps = lut_size, rank, mode, eps
        self.factored, self.ste_fp16, self.snapped = factored, ste_fp16, False
        self.register_buffer("lut", lut.to(device))
        self.register_buffer("idx", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.scale_A = nn.Parameter(torch.ones(out_features, rank, **fk))
        self.scale_B = nn.Parameter(torch.ones(rank, in_features, **fk))
        self.scale_g = nn.Parameter(torch.full((rank,), 1.0 / rank, **fk))
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        if mode == "latent":
            self.latent = nn.Parameter(torch.zeros(out_features, in_features, **fk))
            self.set_trainable("all")

    # ------------------------------------------------------------------------------------------ math
    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors of S: (Â·diag(g) [out, r], B̂ [r, in]); FP16-rounded (straight-through) if ste_fp16."""
        return self._factors(self.scale_A, self.scale_B, self.scale_g)

    def _factors(self, A: torch.Tensor, B: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.snapped:
            a, b = A * g, B
        else:
            a = A * (g / A.norm(dim=0).clamp_min(self.eps))
            b = B / B.norm(dim=1, keepdim=True).clamp_min(self.eps)
        if self.ste_fp16:
            a, b = ste_fp16(a), ste_fp16(b)
        return a, b

    def scale_map(self) -> torch.Tensor:
        """S = Â·diag(g)·B̂ [out, in]."""
        a, b = self.scales()
        return a @ b

    def lut_values(self) -> torch.Tensor:
        """The LUT as the forward sees it (straight-through FP16 while it trains)."""
        return ste_fp16(self.lut) if self.lut.requires_grad else self.lut

    def q(self) -> torch.Tensor:
        """Q = lut[idx] [out, in], in the LUT's dtype (a new tensor; the forward's cached copy is internal)."""
        return torch.take(self.lut_values(), self.idx.long())

    def _q(self) -> torch.Tensor:
        """lut[idx] for the forward, cached between training forwards while the indices and a frozen LUT stay.

        Gathering through int64 indices every forward cost ~9 % of a block-wise PTQ step on the CPU
        (docs/benchmarks.md). The cache is keyed on the idx and LUT tensors themselves (held, so their ids
        cannot be reused) and their version counters, which every in-place op bumps (copy_, load_state_dict,
        project_); writes around them (`idx.data[...] = ...`, a numpy view) are not seen: write with copy_,
        or call `clear_cache()`. It holds FP16 when the LUT is FP16-exact and the layer fp32 (exact), which is
        also what autograd saves for the backward of Q ⊙ S, so training memory goes down. It is made only
        with gradients on (training) or inside `keep_q_cache()` (calibration, whose no_grad passes repeat):
        under no_grad elsewhere (evaluation) an existing one is used but none is made, so evaluation does not
        hold an extra copy. Bypassed where the gather must stay in the graph or
        changes every step: a trained LUT, latent mode, torch.compile / tracing / functorch transforms (which
        fuse the gather anyway), inference mode (such tensors have no version counter)."""
        lut, idx = self.lut_values(), self.idx
        if (
            _graph_capture_active()  # first: fx cannot branch on a traced parameter
            or lut.requires_grad
            or self.mode == "latent"
            or torch.is_inference_mode_enabled()  # a cached inference tensor could not be saved for backward later
            or idx.is_inference()
            or lut.is_inference()
        ):
            return torch.take(lut, idx.long())
        key = (idx, idx._version, lut, lut._version)
        cached = self.__dict__.get("_q_cache")
        if cached is not None and cached[0][0] is idx and cached[0][2] is lut and cached[0][1::2] == key[1::2]:
            return cached[1]
        q = torch.take(lut, idx.long())
        if lut.dtype == self.scale_A.dtype == torch.float32 and torch.equal(lut.half().float(), lut):
            q = q.half()
        if torch.is_grad_enabled() or _KEEP_Q_CACHE[0]:
            self.__dict__["_q_cache"] = (key, q)
        else:
            self.clear_cache()  # a stale one would only hold memory
        return q

    def clear_cache(self) -> None:
        """Drop the forward's cached Q (after writing idx or the LUT around their version counters)."""
        self.__dict__.pop("_q_cache", None)

    def _apply(self, fn: Any, recurse: bool = True) -> LUTLinear:
        self.clear_cache()  # .to(device / dtype) makes new tensors: drop the old copy now
        return super()._apply(fn, recurse)

    def effective_weight(self) -> torch.Tensor:
        """W_eff = lut[idx] ⊙ S (latent mode: the straight-through W_q); differentiable in A, B, g."""
        if self.mode == "latent":
            w = self._latent_weight()
        else:
            q, s = self._q(), self.scale_map()
            if q.dtype != self.lut.dtype and q.dtype == s.dtype:  # FP16 Q, FP16 S (fp16 autocast): in the LUT's dtype
                q = q.to(self.lut.dtype)
            w = q * s
        return ste_fp16(w) if self.ste_fp16 else w

    def _latent_weight(self) -> torch.Tensor:
        with torch.no_grad():
            self.idx.copy_(nearest_index(self.latent, self.lut, check=False))  # no per-layer sync on a GPU
        u = self.latent  # straight-through: the value is lut[idx] ⊙ S, the gradient dL/du = dL/dW_q ⊙ S
        return (u + (self.q() - u).detach()) * self.scale_map().detach()  # the scales do not train here

    @torch.no_grad()
    def _scale_units(self, weight: torch.Tensor) -> torch.Tensor:
        return _weight_over_scale(weight, self.scale_map(), self.lut, self.idx)

    @torch.no_grad()
    def set_latent_(self, weight: torch.Tensor) -> None:
        """Latent layer: u = weight / S, so that idx = nearest(u) = nearest(weight / S)."""
        if self.mode != "latent":
            raise LutqError("LUTLinear.set_latent_: the layer is not latent")
        self.latent.copy_(self._scale_units(weight))

    @torch.no_grad()
    def upgrade_state_(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """lutq before 2026-11-30 stored a latent layer's weights W in weight units as `weight`: replace them in
        `state` (in place) by u = W / S as `latent`, S from the scales in `state`. No-op for current states."""
        if self.mode != "latent" or prefix + "weight" not in state or prefix + "latent" in state:
            return
        ref = self.scale_A
        a, b = self._factors(*(state[prefix + k].to(ref) for k in ("scale_A", "scale_B", "scale_g")))
        lut, idx = state.get(prefix + "lut", self.lut), state.get(prefix + "idx", self.idx)
        state[prefix + "latent"] = _weight_over_scale(state.pop(prefix + "weight"), a @ b, lut, idx)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.upgrade_state_(state_dict, prefix)  # checkpoints go through storage.decode_state, which upgrades first
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored:
            return self.factored_forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.effective_weight().to(x.dtype), bias)

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = Σ_k g_k Â_k ⊙ (Q (B̂_k ⊙ x)) + bias: the ANE's form, r× the FLOPs (for checking numerics)."""
        if self.mode == "latent":
            raise LutqError("LUTLinear: the factored forward needs a frozen layer; call freeze() first")
        a, b = self.scales()
        xb = x.unsqueeze(-2) * b.to(x.dtype)  # [..., r, in]
        y = F.linear(xb, self.q().to(x.dtype))  # [..., r, out]
        y = (y * a.t().to(x.dtype)).sum(-2)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # ------------------------------------------------------------------------------------ switches
    def set_trainable(self, parts: str | Iterable[str] = "all") -> None:
        """Unfreeze `parts` and freeze the rest: "all" (A, B, g), "g", "ab", "lut", "none", or a set of
        {"A", "B", "g", "lut"}. Training A or B with g frozen rounds g to FP16 first. Latent layers train
        `latent` for "all". Snapped layers cannot train."""
        chosen = set(TRAINABLE[parts]) if isinstance(parts, str) and parts in TRAINABLE else set(parts)
        if isinstance(parts, str) and parts not in TRAINABLE:
            raise LutqError(f"LUTLinear.set_trainable: unknown switch {parts!r}; valid: {sorted(TRAINABLE)}")
        if chosen - {"A", "B", "g", "lut"}:
            raise LutqError(f"LUTLinear.set_trainable: unknown parts {sorted(chosen - {'A', 'B', 'g', 'lut'})}")
        if chosen and self.snapped:
            raise LutqError("LUTLinear.set_trainable: the layer is snapped to FP16; training it would undo that")
        if self.mode == "latent":
            if chosen not in ({"A", "B", "g"}, set()):
                raise LutqError("LUTLinear.set_trainable: a latent layer trains its weight ('all') or nothing")
            self.latent.requires_grad_(bool(chosen))
            chosen = set()  # the straight-through quantizer passes no gradient to the scales
        self.scale_A.requires_grad_("A" in chosen)
        self.scale_B.requires_grad_("B" in chosen)
        self.scale_g.requires_grad_("g" in chosen)
        if chosen & {"A", "B"} and "g" not in chosen:
            with torch.no_grad():  # g frozen while A, B train: freeze it at its FP16 value (DESIGN.md)
                self.scale_g.copy_(round_fp16(self.scale_g))
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._set_lut_trainable("lut" in chosen)

    def _set_lut_trainable(self, flag: bool) -> None:
        if flag == isinstance(self.lut, nn.Parameter):
            self.lut.requires_grad_(flag)
            return
        t = self.lut.detach().clone()
        del self.lut
        if flag:
            self.lut = nn.Parameter(t)
        else:
            self.register_buffer("lut", t)

    @torch.no_grad()
    def project_(self) -> None:
        """Restore the LUT invariants after an optimizer step: sorted (idx remapped so W_eff keeps its
        entries), FP16-exact, strictly increasing. A no-op for a valid LUT."""
        v = self.lut.detach()
        order = torch.argsort(v)
        ar = torch.arange(v.numel(), device=v.device)
        if not torch.equal(order, ar):
            inv = torch.empty_like(order)
            inv[order] = ar
            self.idx.copy_(inv.to(torch.uint8)[self.idx.long()])
        self.lut.copy_(repair_lut(v[order].cpu()).to(v))

    @torch.no_grad()
    def freeze(self) -> None:
        """Latent → frozen: pick idx = nearest(u) once, drop the latent weights, train A, B, g."""
        if self.mode != "latent":
            return
        self.idx.copy_(nearest_index(self.latent.detach(), self.lut))
        del self.latent
        self.mode = "frozen"
        self.set_trainable("all")

    @torch.no_grad()
    def unfreeze(self, start: torch.Tensor | None = None, *, margin: float = 0.02) -> None:
        """Frozen → latent: trainable latent weights u (in scale units, idx = nearest(u)) that start exactly at
        the current indices (e.g. a GPTQ pick) and move them only as training moves u.

        u starts at lut[idx] (the centre of each index's bin), or with `start` (e.g. the FP weight the layer was
        quantized from) at start / S clipped into its index's bin, `margin` × the entry's smaller gap to a
        neighbour inside the bin's edges: a weight that sat near an edge stays near it, so a small step can
        flip its index."""
        if self.mode == "latent":
            return
        if self.snapped:
            raise LutqError("LUTLinear.unfreeze: the layer is snapped to FP16; unfreeze before `lutq snap`")
        lut, idx = self.lut.detach().float(), self.idx.long()
        u = lut[idx]
        if start is not None:
            if start.shape != u.shape:
                raise LutqError(f"LUTLinear.unfreeze: start has shape {tuple(start.shape)}, the layer {tuple(u.shape)}")
            if not 0 < margin < 0.5:  # 0 would put weights on an edge, where nearest() picks the lower entry
                raise LutqError(f"LUTLinear.unfreeze: margin must be in (0, 0.5), got {margin}")
            mids = (lut[1:] + lut[:-1]) / 2
            inf = torch.full((1,), math.inf, device=lut.device)
            lo, hi = torch.cat([-inf, mids]), torch.cat([mids, inf])
            gaps = lut[1:] - lut[:-1]
            width = torch.minimum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]]))  # end bins: one side
            pad = margin * width
            u = torch.clamp(self._scale_units(start), (lo + pad)[idx], (hi - pad)[idx])
        self.latent = nn.Parameter(u.to(self.scale_A.dtype).clone())
        self.mode = "latent"
        self.set_trainable("all")

    # ------------------------------------------------------------------------------------- layout
    def layout(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this module before loading its tensors."""
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "lut_size": self.lut_size,
            "rank": self.rank,
            "bias": self.bias is not None,
            "mode": self.mode,
            "snapped": self.snapped,
            "ste_fp16": self.ste_fp16,
            "factored": self.factored,
            "eps": self.eps,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, lut_size={self.lut_size}, "
            f"rank={self.rank}, bias={self.bias is not None}, mode={self.mode}, snapped={self.snapped}"
        )


class LUTEmbedding(LUTLinear):
    """An embedding table [num_embeddings, dim] stored as a LUT weight (only with quantize_embeddings).

    `embed_scale` keeps Gemma 3's scaled embeddings (output × √hidden) working.
    """

    kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        lut_size: int = 16,
        rank: int = 4,
        *,
        padding_idx: int | None = None,
        embed_scale: float = 1.0,
        **kw: Any,
    ) -> None:
        kw.pop("bias", None)
        super().__init__(embedding_dim, num_embeddings, lut_size, rank, bias=False, **kw)
        self.padding_idx, self.embed_scale = padding_idx, embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.effective_weight(), self.padding_idx)
        return out * self.embed_scale if self.embed_scale != 1.0 else out

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "padding_idx": self.padding_idx, "embed_scale": self.embed_scale}


def build_from_layout(
    layout: dict[str, Any], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LUTLinear:
    """Rebuild an (uninitialized) LUTLinear / LUTEmbedding from `layer.layout()`."""
    d = dict(layout)
    kind, snapped = d.pop("kind", "linear"), d.pop("snapped", False)
    shape = (d.pop("in_features"), d.pop("out_features"), d.pop("lut_size"), d.pop("rank"))
    if kind == "embedding":
        d.pop("bias", None)
        layer: LUTLinear = LUTEmbedding(shape[1], shape[0], shape[2], shape[3], device=device, dtype=dtype, **d)
    elif kind == "linear":
        layer = LUTLinear(*shape, device=device, dtype=dtype, **d)
    else:
        raise LutqError(f"quant layout: unknown layer kind {kind!r}")
    layer.snapped = bool(snapped)
    return layer
