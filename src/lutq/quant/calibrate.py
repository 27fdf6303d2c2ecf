"""Calibrated (activation-aware) index picking: GPTQ for LUT layers.

Nearest-entry rounding minimizes the weight error ‖W_eff − W‖; what matters is the output error
E‖(W_eff − W) x‖² = tr(ΔW H ΔWᵀ) with H = E[x xᵀ] over real inputs. With the scales S and the LUT fixed,
GPTQ (Frantar et al., 2022) picks the indices one input column at a time and spreads each column's
rounding error onto the columns not yet picked, using the Cholesky factor of H⁻¹; columns go in order of
falling H_jj (act-order). Only idx changes, so the layer format is untouched.

    H = collect_hessians(model, blocks)       # FP model, before quantize(); {module name: H [in, in]}
    quantize(model, cfg, hessians=H)          # init as usual, then GPTQ idx per layer

Hand-rolled rather than imported: GPTQ libraries (auto-gptq, gptqmodel, torchao) quantize to a uniform
integer grid with per-group scales; here the grid is an arbitrary sorted LUT times a low-rank scale map.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from lutq.core.console import progress
from lutq.core.errors import LutqError
from lutq.models.runtime import decoder_body
from lutq.quant.init import solve_batched, unit_factors
from lutq.quant.layer import LUTLinear
from lutq.quant.lut import nearest_index
from lutq.quant.presets import CALIB_LEN, CALIB_SEQUENCES, GPTQ_DAMP, CalibSource

DEFAULT_DAMP = GPTQ_DAMP


class HessianCollector:
    """Forward pre-hooks that accumulate H = mean over tokens of x xᵀ (float32 [in, in], on the CPU) for the
    inputs of the given modules, while the caller runs forwards. Modules that read the same input tensor
    (q/k/v, gate/up) share one H.

        with HessianCollector({"q": layer_q, "k": layer_k}) as hc:
            model(...)
        hessians = hc.result()
    """

    def __init__(self, targets: dict[str, nn.Module]) -> None:
        self.targets = targets
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[Any, str | None] = (None, None)  # holding x keeps its identity unambiguous
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x is self._last[0]:  # the same tensor as the previous linear's (q/k/v, gate/up): share its H
                self.alias.setdefault(name, self._last[1])
                return
            self._last = (x, name)
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            h = (flat.t() @ flat).cpu()
            self.sums[name] = self.sums[name] + h if name in self.sums else h
            self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

        return fn

    def __enter__(self) -> HessianCollector:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.targets.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = (None, None)

    def result(self) -> dict[str, torch.Tensor]:
        """{module name: H}; fails naming the modules that no input reached."""
        out = {n: self.sums[n] / self.counts[n] for n in self.sums}
        for name, owner in self.alias.items():
            if name not in out:
                out[name] = out[owner]
        missing = sorted(set(self.targets) - set(out))
        if missing:
            raise LutqError(f"calibration: no inputs reached {missing[:3]}{'...' if len(missing) > 3 else ''}")
        return out


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    blocks: torch.Tensor,
    names: Iterable[str] | None = None,
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """H = mean over tokens of x xᵀ (float32 [in, in], on the CPU) for the inputs of every linear named
    (nn.Linear, or a LUT layer: a q4 model calibrates its own q2 conversion).

    `blocks` are token ids [N, L]. Linears that read the same input tensor (q/k/v, gate/up) share one H.
    When the output head is not among them, only the decoder body runs (no vocabulary-sized logits).
    """
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise LutqError(f"calibration: expected token blocks [N, L], got shape {tuple(blocks.shape)}")
    wanted = set(names) if names is not None else None
    targets = {n: m for n, m in model.named_modules() if _is_linear(m) and (wanted is None or n in wanted)}
    if not targets:
        raise LutqError("calibration: none of the named layers is a linear (nn.Linear or LUT) layer of this model")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    run = model if head is None or any(m is head for m in targets.values()) else decoder_body(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with HessianCollector(targets) as hc, progress(transient=True) as bar:
            task = bar.add_task("calibrating", total=blocks.shape[0], visible=show_progress)
            for s in range(0, blocks.shape[0], batch_size):
                chunk = blocks[s : s + batch_size].to(device)
                run(input_ids=chunk, use_cache=False)
                bar.advance(task, chunk.shape[0])
    finally:
        model.train(was_training)
    return hc.result()


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, LUTLinear) and m.kind == "linear")


def column_weights(hessian: torch.Tensor, power: float) -> torch.Tensor:
    """Per-input-column weights (H_jj / mean H_jj)^power [in] for an activation-aware init: columns whose
    inputs carry more energy count more in the k-means LUT and the scale refits (dead inputs weigh 0)."""
    d = torch.diagonal(hessian).float().clamp_min(0)
    return (d / d.mean().clamp_min(1e-30)) ** power


@torch.no_grad()
def gptq_indices_(
    layer: LUTLinear,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
    act_order: bool = True,
) -> float:
    """Re-pick layer.idx by GPTQ against `hessian` with the layer's scales and LUT fixed.

    Returns the relative output error √(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) after the pick (H undamped).
    """
    if layer.snapped:
        raise LutqError("gptq: the layer is snapped to FP16; calibrate before `lutq snap`")
    n_in = layer.in_features
    if tuple(hessian.shape) != (n_in, n_in):
        raise LutqError(f"gptq: Hessian shape {tuple(hessian.shape)} does not match the layer input {n_in}")
    dev = layer.scale_A.device
    w = weight.detach().to(device=dev, dtype=torch.float32).clone()
    h = hessian.to(device=dev, dtype=torch.float32).clone()
    s = layer.scale_map().detach().float()
    lut = layer.lut.detach().float()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n_in, device=dev)
    w, s, h = w[:, perm], s[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    hinv = _upper_cholesky_of_inverse(h)
    idx = torch.empty(w.shape, dtype=torch.uint8, device=dev)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, sc = w1[:, i], s[:, i1 + i]
            k = nearest_index(col / sc, lut)
            idx[:, i1 + i] = k
            e = (col - lut[k.long()] * sc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    layer.idx.copy_(idx[:, inv])
    return output_error(layer, weight, hessian)


@torch.no_grad()
def calibrate_layer_(
    layer: LUTLinear, weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = DEFAULT_DAMP, refit_rounds: int = 1
) -> float:
    """GPTQ idx, then `refit_rounds` of (output-metric refit of Â·g, GPTQ idx again) while the output error
    falls; returns the output error (the best state is kept)."""
    err = gptq_indices_(layer, weight, hessian, damp=damp)
    for _ in range(refit_rounds):
        saved = [p.detach().clone() for p in (layer.scale_A, layer.scale_g, layer.idx)]
        refit_scales_(layer, weight, hessian)
        new = gptq_indices_(layer, weight, hessian, damp=damp)
        if not new < err:
            for p, v in zip((layer.scale_A, layer.scale_g, layer.idx), saved, strict=True):
                p.copy_(v)
            break
        err = new
    return err


@torch.no_grad()
def refit_scales_(layer: LUTLinear, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Exact least squares for Â·diag(g) in the output metric, with B̂ and idx fixed: per output row i,
    min over a_i of (t_i − a_iᵀM_i) H (t_i − a_iᵀM_i)ᵀ with M_i = B̂ ⊙ q_i. Kept only if the output error
    falls; returns the output error."""
    before = output_error(layer, weight, hessian)
    saved = (layer.scale_A.detach().clone(), layer.scale_g.detach().clone())
    h = hessian.to(layer.scale_A.device, torch.float64)
    q = layer.q().detach().double()
    _, _, b = unit_factors(layer)
    t = weight.detach().to(h)
    for s in range(0, q.shape[0], 256):  # rows in chunks: M is [rows, r, in]
        m = b[None] * q[s : s + 256, None, :]
        mh = m @ h
        a = solve_batched(mh @ m.transpose(1, 2), (mh @ t[s : s + 256, :, None]).squeeze(-1))
        layer.scale_A[s : s + 256].copy_(a)
    layer.scale_g.copy_(layer.scale_A.detach().norm(dim=0))
    after = output_error(layer, weight, hessian)
    if not after < before:
        layer.scale_A.copy_(saved[0])
        layer.scale_g.copy_(saved[1])
        return before
    return after


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (H damped further if it is not positive definite)."""
    extra = 0.0
    mean = float(torch.diagonal(h).mean())
    for _ in range(6):
        l_, info = torch.linalg.cholesky_ex(h + extra * mean * torch.eye(h.shape[0], device=h.device))
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u
        extra = max(extra * 10, 1e-3)
    raise LutqError(
        "gptq: the calibration Hessian is not positive definite even after damping (too few calibration tokens?)"
    )


@torch.no_grad()
def output_error(layer: LUTLinear, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """√(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) = ‖ΔW X‖ / ‖W X‖: the layer's relative output error on the calibration inputs."""
    h = hessian.to(layer.scale_A.device, torch.float64)
    w = weight.detach().to(h)
    d = (layer.q() * layer.scale_map()).detach().to(h) - w
    ratio = float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-300))
    return max(ratio, 0.0) ** 0.5  # rounding can leave a tiny negative trace when ΔW H ΔWᵀ is ~0


def calibration_blocks(
    source: CalibSource,
    tokenizer: Any,
    *,
    num_sequences: int = CALIB_SEQUENCES,
    seq_len: int = CALIB_LEN,
    thinking: str = "off",
) -> torch.Tensor:
    """Token blocks [N, L] for calibration from one source or an even mix of several, interleaved: a KD cache
    directory (the first sequences of its train split; its L is the block length of the whole mix) or a data
    source (blocks of `seq_len` spread over its train documents, rendered with `thinking` when they are chats;
    `_source_blocks`).

    A mix keeps the calibration statistics from fitting one domain: GPTQ on chat alone leaves more error on
    other text (docs/quant.md, "Calibration data").
    """
    from pathlib import Path

    from lutq.data import mix_shares
    from lutq.kd.reader import KDCache
    from lutq.kd.shards import META

    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise LutqError("calibration: no calibration source given")
    if num_sequences < len(sources):
        raise LutqError(f"calibration: {num_sequences} sequences cannot be shared by {len(sources)} sources")
    caches = {}
    for spec in sources:
        path = Path(spec).expanduser()
        if (path / META).is_file() and not (path / "config.json").is_file():  # a KD cache, not a checkpoint
            caches[spec] = KDCache(path)
            caches[spec].check_tokenizer(tokenizer)
    lengths = {c.L for c in caches.values()}
    if len(lengths) > 1:
        raise LutqError(f"calibration: KD caches of different lengths L {sorted(lengths)} cannot be mixed")
    block_len = lengths.pop() if lengths else seq_len
    shares = mix_shares(num_sequences, [1] * len(sources))
    parts = []
    for spec, share in zip(sources, shares, strict=True):
        if spec in caches:
            n = min(share, caches[spec].num_sequences("train"))
            part = caches[spec].read("train", np.arange(n))["input_ids"].long()
        else:
            part = _source_blocks(spec, tokenizer, share, block_len, thinking)
        if part.shape[0] == 0:
            raise LutqError(f"calibration: {spec} gave fewer than {block_len} tokens")
        parts.append(part)
    # round-robin, so that any prefix of the blocks (a batch of block-wise calibration) holds every source
    position = np.concatenate([np.arange(len(p)) for p in parts])
    owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    return torch.cat(parts)[torch.from_numpy(np.lexsort((owner, position)))]


def _source_blocks(spec: str, tokenizer: Any, num_blocks: int, seq_len: int, thinking: str) -> torch.Tensor:
    """`num_blocks` blocks of a data source's train documents (in a fixed shuffled order), spread over as many of
    them as possible (`lutq.data.spread_or_pack`)."""
    import random

    from lutq.data import load_documents, spread_or_pack

    docs = load_documents(spec + ("" if ":" in spec else ":train"))
    random.Random(0).shuffle(docs)
    return torch.from_numpy(spread_or_pack(docs, tokenizer, num_blocks, seq_len, thinking)).long()


def hessians_for(
    model: nn.Module,
    config: Any,
    source: CalibSource,
    tokenizer: Any,
    *,
    num_sequences: int = CALIB_SEQUENCES,
    seq_len: int = CALIB_LEN,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Hessians on `source` of exactly the linears `config` (a preset name or QuantConfig) will quantize, or
    of the layer names given as a set."""
    from lutq.quant.presets import resolve_config

    if isinstance(config, set | frozenset):
        names = sorted(config)
    else:
        cfg = resolve_config(config)
        names = [n for n, m in model.named_modules() if _is_linear(m) and cfg.spec_for(n) is not None]
    blocks = calibration_blocks(source, tokenizer, num_sequences=num_sequences, seq_len=seq_len)
    return collect_hessians(model, blocks, names, show_progress=show_progress)
