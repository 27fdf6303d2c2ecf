"""Block-wise calibration of a LUT model against its full-precision reference, one decoder block at a time.

One-shot GPTQ (`lutq.quant.calibrate`) takes every layer's Hessian from the FP model, so no layer sees
the error of the layers before it. Here the blocks are calibrated in order, each on the inputs X_q that
the already-calibrated quantized prefix produces (the "sequential" GPTQ of Frantar et al.), and then each
block's scales are trained to reproduce the reference's outputs (block reconstruction, as in BRECQ /
EfficientQAT's Block-AP, with only A, B, g — and optionally the LUT — free):

    for block l = 0 .. n-1:
        Y   = reference block l on X_fp                 (the FP model's hidden states; X_fp ← Y after)
        for each group of sublayers that read one input (q/k/v, o, gate/up, down), in forward order:
            H = E[x xᵀ] of that input, from the quantized block as calibrated so far, on X_q
            idx ← GPTQ(W_fp, H) (+ output-metric refit of Â·g)        [gptq=True]
        A, B, g ← Adam on ‖block_q(X_q) − Y‖² / ‖Y‖² per token    [steps > 0; kept only if it helps]
        X_q ← block_q(X_q)

The target Y is the FP model's own hidden state ("fp", the asymmetric target: a block may also undo
error that came from upstream) or the reference block applied to X_q ("local"). Only the decoder body
runs; the blocks are called directly with the keyword arguments (rotary embeddings, masks) that the
model passes them, captured once. Works for any model whose decoder layers live in `model.model.layers`
(Qwen3, Llama / SmolLM2, Gemma 3).

    reference = copy.deepcopy(model)          # the FP model
    quantize(model, "q2a4")                   # nearest init (k-means / tighten per the config)
    report = reconstruct_(model, reference, calibration_blocks(cache, tok), ReconstructConfig(steps=64))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lutq.core.configs import ConfigBase
from lutq.core.console import progress
from lutq.core.errors import LutqError
from lutq.models.runtime import decoder_body, decoder_layers
from lutq.quant.api import QuantReport, QuantRow, lut_layers, quant_config_of
from lutq.quant.calibrate import HessianCollector, calibrate_layer_, column_weights
from lutq.quant.init import init_from_weight_, relative_error
from lutq.quant.layer import LUTLinear, keep_q_cache
from lutq.quant.presets import QuantConfig, group_of

TARGETS = ("fp", "local")
LATENT_STARTS = ("weff", "fp")


@dataclass
class ReconstructConfig(ConfigBase):
    """What `reconstruct_` does per block (see the module doc)."""

    gptq: bool = True  # sequential GPTQ index picking before the scales train
    latent_steps: int = 0  # first, Adam steps on latent FP weights (indices move, straight-through), then frozen
    latent_lr: float = 2.5e-4  # latent weights are in scale units (W / S): ≈ 1e-4 in weight units at the median layer
    # where the latent weights start: "weff" (each index's bin centre) or "fp" (the FP weight clipped into its
    # index's bin, so weights near a bin edge can flip with small steps); either way the indices start unchanged
    latent_start: str = "weff"
    steps: int = 0  # Adam steps on the scales A, B, g per block (0: none)
    batch_size: int = 8  # calibration sequences per step (and per forward chunk)
    lr: float = 1e-3
    train_lut: bool = False  # the LUT entries train with the scales
    target: str = "fp"  # "fp": the reference's hidden states; "local": the reference block on X_q
    seed: int = 0

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise LutqError(f"reconstruct: target must be one of {TARGETS}, got {self.target!r}")
        if self.latent_start not in LATENT_STARTS:
            raise LutqError(f"reconstruct: latent_start must be one of {LATENT_STARTS}, got {self.latent_start!r}")
        if min(self.steps, self.latent_steps) < 0 or self.batch_size < 1 or not min(self.lr, self.latent_lr) > 0:
            raise LutqError(
                f"reconstruct: steps >= 0, batch_size >= 1 and lr > 0 needed (got steps "
                f"{self.steps} / {self.latent_steps}, batch {self.batch_size}, lr {self.lr} / "
                f"{self.latent_lr})"
            )


class _Stop(Exception):
    """Raised by a capture hook to end a forward early (control flow, not an error)."""


@torch.no_grad()
def _block_inputs(
    reference: nn.Module, blocks: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """(the first block's input hidden states per chunk of `batch_size` sequences, every block's keyword
    arguments for a chunk of that size) from the reference model's own forward."""
    layers = decoder_layers(reference)
    body = decoder_body(reference)
    device = next(reference.parameters()).device
    kwargs: list[dict[str, Any]] = [{} for _ in layers]
    inputs: list[torch.Tensor] = []

    def capture(i: int, first: bool):
        def hook(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            hidden = args[0] if args else kw["hidden_states"]
            if i == 0:
                inputs.append(hidden.detach().clone())
            if first:
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if not first or i == len(layers) - 1:
                raise _Stop

        return hook

    for s in range(0, blocks.shape[0], batch_size):
        first = s == 0
        hooks = [
            layer.register_forward_pre_hook(capture(i, first), with_kwargs=True)
            for i, layer in enumerate(layers)
            if first or i == 0
        ]
        try:
            body(input_ids=blocks[s : s + batch_size].to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
    return inputs, kwargs


def _run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _recon_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖y − target‖² / ‖target‖²: each token counts alike, outlier tokens included."""
    err = (y.float() - target.float()).pow(2).sum(-1)
    return (err / target.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def _mean_loss(block: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], kwargs: dict[str, Any]) -> float:
    return sum(float(_recon_loss(_run_block(block, x, kwargs), y)) for x, y in zip(xs, ys, strict=True)) / len(xs)


def _sublayer_stages(
    block: nn.Module, layers: dict[str, LUTLinear], x: torch.Tensor, kwargs: dict[str, Any]
) -> list[list[str]]:
    """The block's LUT layers grouped by the input tensor they read, in forward order."""
    # The input tensors themselves are kept (not their id()): a freed tensor's id can be reused by the next
    # one, which would merge e.g. o_proj into the gate/up stage on some runs and not others.
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            order.append((name, args[0]))

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            _run_block(block, x, kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last: torch.Tensor | None = None
    for name, x in order:
        if stages and x is last:
            stages[-1].append(name)
        else:
            stages.append([name])
        last = x
    return stages


def _train_block(
    block: nn.Module,
    layers: dict[str, LUTLinear],
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    kwargs: dict[str, Any],
    *,
    before: float,
    steps: int,
    lr: float,
    latent: bool,
    train_lut: bool,
    seed: int,
    starts: dict[str, torch.Tensor] | None = None,
) -> float:
    """Adam on the block's scales (and LUTs), or with `latent` on latent weights (u = W / S, started at W_eff, or at
    `starts` clipped into their bins) whose indices are re-picked every step (straight-through, then frozen
    again), to reconstruct ys. Returns the loss over all chunks afterwards; the trained state is kept only
    if it fell below `before`."""
    saved = {k: v.detach().clone() for k, v in block.state_dict().items()}
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        if latent:  # the same indices until training moves them
            layer.unfreeze(None if starts is None else starts[name])
        else:
            layer.set_trainable({"A", "B", "g"} | ({"lut"} if train_lut else set()))
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))
    )
    gen = torch.Generator().manual_seed(seed)
    was_training = block.training
    block.train()
    try:
        for _ in range(steps):
            i = int(torch.randint(len(xs), (1,), generator=gen))
            loss = _recon_loss(_run_block(block, xs[i], kwargs), ys[i])
            if not torch.isfinite(loss):
                raise LutqError(f"reconstruct: block loss is {loss.item()}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for layer in layers.values():
                if isinstance(layer.lut, nn.Parameter):
                    layer.project_()
    finally:
        block.train(was_training)
        for layer in layers.values():
            layer.freeze()  # latent -> frozen (idx = nearest(u)); a no-op for frozen layers
            layer.set_trainable("none")
        for n, p in block.named_parameters():
            p.requires_grad_(flags.get(n, False))
    after = _mean_loss(block, xs, ys, kwargs)
    if not after < before:
        block.load_state_dict(saved)
        return before
    return after


@keep_q_cache()  # the block's no_grad passes (Hessians, losses, next inputs) reuse each layer's Q
def reconstruct_(
    model: nn.Module,
    reference: nn.Module,
    blocks: torch.Tensor,
    cfg: ReconstructConfig | None = None,
    *,
    reinit: bool = False,
    show_progress: bool = True,
) -> QuantReport:
    """Calibrate the LUT layers of `model` block by block against the FP `reference` (same architecture and
    layer names) on token blocks [N, L]; in place. Returns the per-layer report (weight error vs. the FP
    weight, GPTQ output error) with each block's reconstruction loss before / after in `report.blocks`.
    With `reinit`, GPTQ on and the model's QuantConfig.init_act_power > 0, each layer is first re-initialized from
    its FP weight with the activation-aware init on the Hessian of its block's quantized-prefix inputs (what
    `quantize_blockwise` does; a converted q4 model keeps its starting point)."""
    cfg = cfg or ReconstructConfig()
    cfg.validate()
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise LutqError(f"reconstruct: expected token blocks [N, L], got shape {tuple(blocks.shape)}")
    q_layers, fp_layers = decoder_layers(model), decoder_layers(reference)
    if len(q_layers) != len(fp_layers):
        raise LutqError(f"reconstruct: the model has {len(q_layers)} decoder layers, the reference {len(fp_layers)}")
    named = dict(lut_layers(model))
    if not named:
        raise LutqError("reconstruct: the model has no LUT layers (quantize it first)")
    qcfg = quant_config_of(model) or QuantConfig()  # GPTQ damping and refit rounds: one home, the QuantConfig
    bs = min(cfg.batch_size, blocks.shape[0])
    blocks = blocks[: blocks.shape[0] // bs * bs]
    model_was_training, ref_was_training = model.training, reference.training
    model.eval()
    reference.eval()
    report = QuantReport(
        title=f"block-wise calibration ({'sequential GPTQ' if cfg.gptq else 'no GPTQ'}, "
        f"{cfg.steps} reconstruction steps per block, target {cfg.target})"
    )
    try:
        xs_fp, kwargs = _block_inputs(reference, blocks, bs)
        xs_q = [x.clone() for x in xs_fp]
        with progress(transient=True) as bar:
            task = bar.add_task("calibrating blocks", total=len(q_layers), visible=show_progress)
            for i, (q_block, fp_block) in enumerate(zip(q_layers, fp_layers, strict=True)):
                base = _block_prefix(model, q_block)
                layers = {n: m for n, m in named.items() if n.startswith(base + ".") and m.kind == "linear"}
                weights = {n: _reference_weight(reference, n) for n in layers}
                with torch.no_grad():
                    ys_fp = [_run_block(fp_block, x, kwargs[i]) for x in xs_fp]
                    ys = ys_fp if cfg.target == "fp" else [_run_block(fp_block, x, kwargs[i]) for x in xs_q]
                out_errs: dict[str, float] = {}
                if cfg.gptq and layers:
                    for stage in _sublayer_stages(q_block, layers, xs_q[0], kwargs[i]):
                        with HessianCollector({n: layers[n] for n in stage}) as hc, torch.no_grad():
                            for x in xs_q:
                                _run_block(q_block, x, kwargs[i])
                        hessians = hc.result()
                        for n in stage:
                            if qcfg.init_act_power and reinit:  # activation-aware init on this block's real inputs
                                spec = qcfg.spec_for(n)
                                init_from_weight_(
                                    layers[n],
                                    weights[n],
                                    group_size=qcfg.group_size,
                                    lut_kind=spec[1].lut_kind if spec else "kmeans",
                                    tighten_rounds=qcfg.tighten_rounds,
                                    col_weight=column_weights(hessians[n], qcfg.init_act_power),
                                )
                            out_errs[n] = calibrate_layer_(
                                layers[n],
                                weights[n],
                                hessians[n],
                                damp=qcfg.gptq_damp,
                                refit_rounds=qcfg.gptq_refit_rounds,
                            )
                before = after = _mean_loss(q_block, xs_q, ys, kwargs[i])
                for latent, steps, lr in ((True, cfg.latent_steps, cfg.latent_lr), (False, cfg.steps, cfg.lr)):
                    if steps and layers:
                        after = _train_block(
                            q_block,
                            layers,
                            xs_q,
                            ys,
                            kwargs[i],
                            before=after,
                            steps=steps,
                            lr=lr,
                            latent=latent,
                            train_lut=cfg.train_lut and not latent,
                            seed=cfg.seed * 100_003 + 2 * i + latent,
                            starts=weights if latent and cfg.latent_start == "fp" else None,
                        )
                report.blocks.append({"block": i, "loss_before": before, "loss_after": after})
                for n, layer in layers.items():
                    report.rows.append(
                        QuantRow(
                            n,
                            group_of(n) or "other",
                            (layer.out_features, layer.in_features),
                            layer.lut_size,
                            layer.rank,
                            "kept",
                            relative_error(layer, weights[n]),
                            out_errs.get(n),
                        )
                    )
                with torch.no_grad():
                    xs_q = [_run_block(q_block, x, kwargs[i]) for x in xs_q]
                xs_fp = ys_fp
                bar.advance(task)
    finally:
        model.train(model_was_training)
        reference.train(ref_was_training)
        for layer in named.values():
            layer.clear_cache()  # kept through the no_grad passes above (keep_q_cache); not past the calibration
    return report


def _block_prefix(model: nn.Module, block: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is block:
            return name
    raise LutqError("reconstruct: decoder block not found in the model")


def _reference_weight(reference: nn.Module, name: str) -> torch.Tensor:
    try:
        m = reference.get_submodule(name)
    except AttributeError as e:
        raise LutqError(f"reconstruct: the reference model has no layer {name!r}") from e
    if isinstance(m, LUTLinear) or not isinstance(m, nn.Linear):
        raise LutqError(f"reconstruct: the reference's {name} is {type(m).__name__}, not a full-precision nn.Linear")
    return m.weight.detach()


def quantize_blockwise(
    model: nn.Module,
    config: Any,
    blocks: torch.Tensor,
    recon: ReconstructConfig | None = None,
    *,
    show_progress: bool = True,
) -> QuantReport:
    """`quantize(model, config)` then `reconstruct_` against a copy of the FP model taken first: the
    one-call block-wise calibrated PTQ (the copy doubles the model's memory while it runs).

    With the activation-aware init (config.init_act_power > 0, GPTQ on), `reconstruct_` initializes every
    decoder-block layer on its block's Hessian, so `quantize` skips their plain init (it would be thrown away)
    and initializes only the LUT layers outside the blocks (a quantized lm_head or embedding)."""
    import copy

    from lutq.quant.api import quantize
    from lutq.quant.presets import resolve_config

    qcfg = resolve_config(config)
    recon = recon or ReconstructConfig()
    reference = copy.deepcopy(model)
    in_blocks: set[str] = set()
    if qcfg.init_act_power and recon.gptq:
        block_modules = {id(m) for block in decoder_layers(model) for m in block.modules()}
        in_blocks = {n for n, m in model.named_modules() if id(m) in block_modules}
    quantize(model, qcfg, skip_init=in_blocks, progress=show_progress)
    return reconstruct_(model, reference, blocks, recon, reinit=True, show_progress=show_progress)
