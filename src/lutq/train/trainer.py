"""The KD-QAT training loop: `train(cfg) -> TrainResult`.

Read `train()` top to bottom: build the student (a FP model quantized with a preset, or a lutq
checkpoint), choose what trains, AdamW + warmup/cosine, then the loop over deterministic cache batches
(forward the student's final hidden states, KD loss against the cached teacher top-K, accumulate, clip,
step), with evaluation on the cache's validation split, `best/` by validation KD loss and `last/` with
the full trainer state, so `--resume` continues exactly where a killed run stopped.

Under torchrun (WORLD_SIZE > 1) the same code runs DDP (gloo on CPU, nccl on CUDA): each rank takes
its share of every global batch, gradients are averaged, and rank 0 evaluates, logs and saves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lutq import __version__
from lutq.core.console import console, progress
from lutq.core.errors import LutqError
from lutq.evaluate.compare import format_paired
from lutq.evaluate.uncertainty import LEVEL
from lutq.kd import KDCache, KDStudent, evaluate_kd
from lutq.models import load_checkpoint, load_model, load_trainer_state, save_checkpoint
from lutq.models.checkpoint import load_optimizer_state
from lutq.models.runtime import (
    AUTO_PRECISIONS,
    auto_picks_bf16,
    compile_decoder_layers,
    compile_unavailable,
    set_grad_checkpointing,
)
from lutq.quant import (
    get_preset,
    lut_layers,
    project_luts_,
    quant_config_of,
    quantize,
    set_trainable,
    unfreeze_latent,
)
from lutq.quant.calibrate import hessians_for
from lutq.train.config import TrainConfig
from lutq.train.loggers import Trackers, check_available
from lutq.train.resume import (
    best_on_disk,
    cache_identity,
    check_resume_config,
    check_run_dir,
    evals_from_log,
    latest_eval_step,
)
from lutq.train.run_dir import TRAIN_COLUMNS, RunDir, csv_columns, ppl_name
from lutq.train.schedule import make_scheduler, rebase_scheduler
from lutq.train.state import DistContext, rng_state, seed_everything, set_rng_state, setup_distributed

# On an H200 a SmolLM2-135M KD-QAT step took 0.45 s at 8 x 128 tokens and 0.35 s at 256 x 128: ~0.2 s of it is
# host work fixed per step (docs/benchmarks.md, "GPU"); below this many tokens per micro-batch the GPU mostly waits.
GPU_MIN_MICRO_TOKENS = 32_768

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: where, how far, and the validation numbers before and after. `eval_change` maps an
    eval key to its change from step 0, paired on the same units (`eval_change`)."""

    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    initial_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    best_eval_loss: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    eval_change: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def best(self) -> Path:
        return self.run_dir / "best"

    @property
    def last(self) -> Path:
        return self.run_dir / "last"

    @property
    def checkpoint(self) -> Path:
        """The checkpoint to carry on with: best/ when validation ran, else last/."""
        return self.best if (self.best / "config.json").is_file() else self.last


# ----------------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train a LUT student against a KD cache (see the module docstring); returns a TrainResult.

    `resume=True` continues the run in `cfg.out` from its last/ checkpoint, exactly.
    """
    cfg.validate()
    cfg = cfg.replace(lr=cfg.peak_lr)  # run.json records the learning rate the run used
    check_available(cfg.loggers)  # a missing tracker fails now, not after the student was built
    ctx = setup_distributed(cfg.device)
    try:
        return _train(cfg, ctx, resume=resume, overwrite=overwrite)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: DistContext, *, resume: bool, overwrite: bool) -> TrainResult:
    run = RunDir(cfg.out)
    check_run_dir(run, resume=resume, overwrite=overwrite)
    seed_everything(cfg.seed)
    cache = KDCache(cfg.cache)
    if cfg.kd.full_kl_weight and not cache.has_teacher_lse:
        raise LutqError(
            f"train: --full-kl-weight needs the teacher's log-sum-exp, which KD cache {cfg.cache} "
            "lacks (built before lutq stored it); rebuild it with `lutq cache`"
        )
    _check_batch(cfg, ctx)

    # the student: a checkpoint (resume / --init) or a FP model quantized with the preset
    state: dict[str, Any] = {}
    if resume:
        ckpt = run.resume_checkpoint()
        check_resume_config(cfg, run, cache)
        state = load_trainer_state(
            ckpt, keys=("optimizer", "scheduler", "rng", "step", "tokens", "elapsed", "best_eval_loss")
        )
        if int(state["step"]) >= cfg.steps:
            return _finished(cfg, run, state, ctx)
        model, tokenizer, _ = load_checkpoint(ckpt)
    else:
        model, tokenizer = build_student(cfg, cache, verbose=ctx.is_main)
        if cfg.latent:
            unfreeze_latent(model)  # starts at W_eff: the same indices, now free to move
    cache.check_tokenizer(tokenizer, model)
    preset = student_preset(model, cfg)
    trainable = set_trainable(model, cfg.mode, lut=cfg.train_lut)
    if not trainable:
        raise LutqError(f"train: mode {cfg.mode!r} leaves no trainable parameters in this model")
    model.to(ctx.device).train()
    if cfg.grad_checkpointing:
        set_grad_checkpointing(model, True)

    # optimizer over the trainable tensors (in model order, so a resumed optimizer lines up), schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
    step, tokens, elapsed0 = 0, 0, 0.0
    best = {"eval_loss": math.inf, "step": None}
    if resume:
        load_optimizer_state(optimizer, state, ckpt, "resume with the run's own --mode / --train-lut / --latent")
        scheduler.load_state_dict(state["scheduler"])
        rebase_scheduler(scheduler, cfg.peak_lr)  # a resume may change --lr, --steps, --warmup, --min-lr-ratio
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay  # ... and --weight-decay
        set_rng_state(state["rng"])
        step, tokens, elapsed0 = int(state["step"]), int(state["tokens"]), float(state["elapsed"])
        best = {"eval_loss": float(state["best_eval_loss"]), "step": state.get("best_step")}
        if (saved_best := best_on_disk(run)) and saved_best["eval_loss"] < best["eval_loss"]:
            best = saved_best  # best/ was saved after last/ (a kill in between): a resume must not replace it by worse

    # one module for the forward + loss, wrapped for DDP; --compile compiles the decoder layers (regionally)
    if cfg.compile:
        if (why := compile_unavailable(ctx.device)) is None:
            compile_decoder_layers(model)
        elif ctx.is_main:
            console.print(
                f"[yellow]note:[/] torch.compile does not work on {ctx.device} here ({why}); training "
                "eager (on a CPU inductor needs a C++ compiler)"
            )
    student: torch.nn.Module = KDStudent(model, cfg.kd)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        student = torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    precision = resolve_precision(cfg.precision, ctx.device)
    amp = _autocast_factory(precision, ctx.device)

    # logs (rank 0): a fresh run writes run.json + headers; a resume drops rows after its checkpoint
    ppl_docs = _load_ppl_texts(cfg.ppl_texts) if ctx.is_main else {}
    trackers = None
    initial_eval: dict[str, float] = {}
    final_eval: dict[str, float] = {}
    final_eval_step: int | None = None  # the step final_eval was measured at
    if ctx.is_main:
        if resume:  # a --ppl-text added on resume gets its CSV column
            names = list(dict.fromkeys([*run.ppl_names(), *(ppl_name(s) for s in cfg.ppl_texts)]))
            run.truncate(step, csv_columns(names))
            initial_eval, final_eval = evals_from_log(run)
            final_eval_step = latest_eval_step(run)
        else:
            run.clear()  # an overwritten run must not leave a stale best/ or last/ behind
            run.write_config(_run_record(cfg, cache, ctx, precision))
            run.start_logs(csv_columns([ppl_name(s) for s in cfg.ppl_texts]))
        trackers = Trackers(cfg.loggers, run_dir=run.path, project=cfg.project, config=cfg.to_dict(), resume=resume)

    do_eval = cfg.eval_batches > 0 and cache.num_sequences("val") > 0
    if ctx.is_main:
        if cfg.eval_batches > 0 and not do_eval:
            console.print(f"[yellow]warning:[/] {cfg.cache} has no validation sequences; no evaluation, no best/")
        where = f"resuming {run.path} at step {step}" if resume else f"training {run.path}"
        console.print(
            f"{where}: mode {cfg.mode}, {sum(p.numel() for p in params):,} trainable parameters, "
            f"{cfg.steps} steps × {cfg.sequences_per_step} sequences × {cache.L} tokens, "
            f"{ctx.device} × {ctx.world_size}, {precision}"
        )
        if note := small_batch_note(ctx.device, cfg.batch_size // ctx.world_size * cache.L):
            console.print(f"[yellow]note:[/] {note}")
        if note := ste_fp16_precision_note(model, precision):
            console.print(f"[yellow]warning:[/] {note}")

    def evaluate() -> dict[str, float]:
        """Validation KD metrics (+ held-out perplexity), rank 0 only; others wait at the barrier."""
        out: dict[str, float] = {}
        if ctx.is_main and do_eval:
            units: dict[str, Any] = {}
            out = evaluate_student(model, cache, cfg, amp, ppl_docs, tokenizer, units=units)
            run.save_eval_units(step, units)
            model.train()
        ctx.barrier()
        return out

    def save_last() -> None:
        _check_finite_params(model, step, run)  # identical on every rank: all stop together
        if ctx.is_main:
            trainer_state = {
                "step": step,
                "tokens": tokens,
                "elapsed": elapsed0 + time.time() - t0,
                "best_eval_loss": best["eval_loss"],
                "best_step": best["step"],
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "world_size": ctx.world_size,
            }
            save_checkpoint(
                run.last, model, tokenizer, extra=_ckpt_extra(cfg, step, preset=preset), trainer_state=trainer_state
            )
        ctx.barrier()

    def maybe_save_best(metrics: dict[str, float]) -> None:
        if ctx.is_main and metrics.get("eval_loss", math.inf) < best["eval_loss"]:
            best.update(eval_loss=metrics["eval_loss"], step=step)
            save_checkpoint(run.best, model, tokenizer, extra=_ckpt_extra(cfg, step, metrics, preset=preset))

    t0 = time.time()
    if not resume:
        initial_eval = evaluate()
        maybe_save_best(initial_eval)
        if ctx.is_main and initial_eval:
            run.log({"step": 0, "tokens": 0, **initial_eval, "elapsed": 0.0})
            trackers.log(initial_eval, 0)
            _print_eval(0, cfg.steps, initial_eval)

    # deterministic batches: the global batch of micro-step i is the same however many ranks share it
    batches = cache.batches(
        "train",
        cfg.batch_size // ctx.world_size,
        seed=cfg.seed,
        start_step=step * cfg.grad_accum,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    step_metrics: dict[str, float] = {}
    t_log, tokens_log, tps = time.time(), tokens, 0.0
    try:
        with _bar(ctx.is_main, cfg.steps, step) as (bar, task):
            while step < cfg.steps:
                # ---- one optimizer step: grad_accum micro-batches; metrics averaged over micro-steps and ranks
                sums: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(batches).items()}
                    last_micro = micro == cfg.grad_accum - 1
                    with contextlib.nullcontext() if last_micro or not ctx.distributed else student.no_sync():
                        with amp():
                            loss, metrics = student(batch)
                        (loss / cfg.grad_accum).backward()
                    for k, v in metrics.items():  # floats, "loss" included
                        sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                    tokens += batch["input_ids"].numel() * ctx.world_size
                step_metrics = _all_reduce_mean(sums, ctx)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf))
                _check_finite_step(step + 1, step_metrics["loss"], grad_norm, run)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                project_luts_(model)  # a trained LUT stays sorted and FP16-exact (no-op otherwise)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # ---- log / eval / save
                row: dict[str, Any] = {}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.time()
                    tps = (tokens - tokens_log) / max(now - t_log, 1e-9)
                    t_log, tokens_log = now, tokens
                    row.update(
                        {k: step_metrics[k] for k in TRAIN_COLUMNS if k in step_metrics},
                        lr=lr,
                        grad_norm=grad_norm,
                        tokens_per_s=tps,
                    )
                t_pause = time.time()  # evaluating and saving are not training: tokens_per_s leaves them out
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    final_eval, final_eval_step = evaluate(), step
                    maybe_save_best(final_eval)
                    row.update(final_eval)
                    if ctx.is_main and final_eval:
                        _print_eval(step, cfg.steps, final_eval, step_metrics["loss"])
                if ctx.is_main and row:
                    row = {"step": step, "tokens": tokens, **row, "elapsed": elapsed0 + time.time() - t0}
                    run.log(row)
                    trackers.log(row, step)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    save_last()
                t_log += time.time() - t_pause
                if bar is not None:
                    bar.update(task, advance=1, loss=step_metrics["loss"], tps=tps)
    except LutqError as e:
        if ctx.is_main:
            trackers.close()
            partial = TrainResult(
                run_dir=run.path,
                step=step,
                tokens=tokens,
                elapsed_s=elapsed0 + time.time() - t0,
                initial_eval=initial_eval,
                final_eval=final_eval,
                eval_change=eval_change(run, final_eval_step),
            )
            write_summary(run, cfg, partial, status=f"stopped: {e}", preset=preset)
        raise

    result = TrainResult(
        run_dir=run.path,
        step=step,
        tokens=tokens,
        elapsed_s=elapsed0 + time.time() - t0,
        initial_eval=initial_eval,
        final_eval=final_eval,
        best_eval_loss=best["eval_loss"] if math.isfinite(best["eval_loss"]) else None,
        best_step=best["step"],
        final_train_loss=step_metrics.get("loss"),
        eval_change=eval_change(run, final_eval_step) if ctx.is_main else {},
    )
    if ctx.is_main:
        trackers.close()
        write_summary(run, cfg, result, status="completed", preset=preset)
    ctx.barrier()  # the ranks leave (and tear down the process group) together, after rank 0's writing
    return result


# ----------------------------------------------------------------------------------------------------
# building blocks


def small_batch_note(device: torch.device, micro_tokens: int) -> str | None:
    """A hint when a GPU micro-batch is too small to keep the GPU busy (None on CPUs and for large batches)."""
    if device.type != "cuda" or micro_tokens >= GPU_MIN_MICRO_TOKENS:
        return None
    return (
        f"{micro_tokens:,} tokens per micro-batch; on a GPU a step has ~0.2 s of fixed host work "
        f"(docs/benchmarks.md), so below ~{GPU_MIN_MICRO_TOKENS:,} the GPU mostly waits: raise --batch-size "
        "(and lower --grad-accum) if memory allows"
    )


def ste_fp16_precision_note(model: torch.nn.Module, precision: str) -> str | None:
    """A warning when STE-FP16 layers train under bf16 autocast (None otherwise): autocast runs the layers' matmuls
    in bf16, so the FP16 rounding they emulate is lost (the seed's "STE-FP16 under bf16 autocast" muddle)."""
    if precision != "bf16":
        return None
    n = sum(1 for _, layer in lut_layers(model) if layer.ste_fp16)
    if not n:
        return None
    return (
        f"{n} LUT layers emulate FP16 (ste_fp16), but bf16 autocast casts their weights to bf16 in the matmul, "
        "so training does not see the FP16 numbers; use --precision fp32 for that"
    )


def build_student(cfg: TrainConfig, cache: KDCache, *, verbose: bool = True) -> tuple[torch.nn.Module, Any]:
    """The initial student: `cfg.init` (a quantized lutq checkpoint) or `cfg.model` (default: the cache's
    teacher) quantized in place with `cfg.preset` (LUT kind, tighten rounds and GPTQ calibration on the
    cache's train tokens from cfg.init_*)."""
    if cfg.init is not None:
        model, tokenizer, info = load_checkpoint(cfg.init)
        if not info.quant:
            raise LutqError(
                f"{cfg.init}: not a quantized lutq checkpoint; to start from a FP model pass "
                f"--model {cfg.init} --preset {cfg.preset}"
            )
        return model, tokenizer
    spec = cfg.model or cache.meta.get("teacher")
    if not spec:
        raise LutqError(f"{cfg.cache}/meta.json names no teacher; pass --model")
    model, tokenizer = load_model(spec)
    qcfg = get_preset(cfg.preset).with_lut_kind(cfg.init_lut).replace(tighten_rounds=cfg.init_tighten)
    hessians = None
    if cfg.init_calib_sequences:
        hessians = hessians_for(
            model, qcfg, str(cache.path), tokenizer, num_sequences=cfg.init_calib_sequences, show_progress=verbose
        )
    report = quantize(model, qcfg, hessians=hessians, progress=verbose)
    if verbose:
        how = f"GPTQ on {cfg.init_calib_sequences} cache sequences" if hessians else "nearest rounding"
        console.print(
            f"quantized {spec} with preset {cfg.preset} ({cfg.init_lut} LUTs, {cfg.init_tighten} tighten rounds, {how})"
        )
        console.print(report.table(per_layer=False))
    return model, tokenizer


def evaluate_student(
    model: torch.nn.Module,
    cache: KDCache,
    cfg: TrainConfig,
    amp: Any,
    ppl_docs: dict[str, list[Any]],
    tokenizer: Any,
    units: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Validation KD metrics as eval_<name> (+ eval_ppl_<corpus> for each held-out text). `units`, when given,
    receives the per-unit sums the numbers come from (`kd_units`, `kd_unit`, `ppl_segments`: `lutq.evaluate.compare`'s
    record), for paired intervals."""
    from lutq.evaluate.compare import unit_columns
    from lutq.evaluate.perplexity import perplexity
    from lutq.kd.loss import kd_unit

    model.eval()
    out: dict[str, float] = {}
    kd_units: list[dict[str, float]] = []
    with torch.no_grad(), amp():
        metrics = evaluate_kd(
            model,
            cache,
            split="val",
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            max_batches=cfg.eval_batches,
            cfg=cfg.kd,
            per_unit=kd_units,
        )
        out.update({f"eval_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        for name, docs in ppl_docs.items():
            res = perplexity(
                model,
                tokenizer,
                docs,
                max_length=cfg.ppl_max_length,
                stride=cfg.ppl_max_length // 2,
                max_tokens=cfg.ppl_max_tokens,
                show_progress=False,
            )
            out[f"eval_ppl_{name}"] = res.ppl
            if units is not None:
                units.setdefault("ppl_segments", {})[name] = res.segments()
    if units is not None:
        units["kd_units"], units["kd_unit"] = unit_columns(kd_units), kd_unit(cache, "val")
        units["kd_ids_sha256"] = metrics["ids_sha256"]
    return out


def _load_ppl_texts(specs: tuple[str, ...]) -> dict[str, list[Any]]:
    if not specs:
        return {}
    from lutq.data import load_documents

    return {ppl_name(s): load_documents(s) for s in specs}


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' (autocast, fp32 master weights) or 'fp32': the choice itself, or what 'auto' / 'fast' pick on
    `device` (lutq.models.runtime.auto_picks_bf16)."""
    if precision in AUTO_PRECISIONS:
        return "bf16" if auto_picks_bf16(precision, device) else "fp32"
    return precision


def _autocast_factory(precision: str, device: torch.device) -> Any:
    """A factory of the forward's autocast context for a resolved precision ('bf16' or 'fp32')."""
    if precision != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _finished(cfg: TrainConfig, run: RunDir, state: dict[str, Any], ctx: DistContext) -> TrainResult:
    """A resume of a run that already made its `cfg.steps` steps: its results, re-read; nothing is written."""
    step = int(state["step"])
    if step > cfg.steps:
        raise LutqError(
            f"{run.path}: --steps {cfg.steps} is below step {step} that the run already reached; "
            f"pass --steps above {step} to train longer"
        )
    if ctx.is_main:
        console.print(
            f"{run.path}: already finished (step {step}/{cfg.steps}); pass --steps above {step} to train longer"
        )
    initial_eval, final_eval = evals_from_log(run)
    final_eval_step = latest_eval_step(run)
    losses = [r["loss"] for r in run.rows() if isinstance(r.get("loss"), int | float)]
    best_loss = float(state["best_eval_loss"])
    return TrainResult(
        run_dir=run.path,
        step=step,
        tokens=int(state["tokens"]),
        elapsed_s=float(state["elapsed"]),
        initial_eval=initial_eval,
        final_eval=final_eval,
        best_eval_loss=best_loss if math.isfinite(best_loss) else None,
        best_step=state.get("best_step"),
        final_train_loss=losses[-1] if losses else None,
        eval_change=eval_change(run, final_eval_step) if ctx.is_main else {},
    )


def _check_batch(cfg: TrainConfig, ctx: DistContext) -> None:
    if cfg.batch_size % ctx.world_size:
        raise LutqError(f"train: batch_size {cfg.batch_size} (global) is not divisible by the {ctx.world_size} ranks")


def _all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    if not ctx.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if ctx.device.type == "cuda":
        t = t.to(ctx.device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _check_finite_step(step: int, loss: float, grad_norm: float, run: RunDir) -> None:
    """Stop before a non-finite loss or gradient reaches the weights; last/ keeps the last good state."""
    bad = [f"loss is {loss}"] if not math.isfinite(loss) else []
    if not math.isfinite(grad_norm):
        bad.append(f"gradient norm is {grad_norm}")
    if bad:
        raise LutqError(
            f"training diverged at step {step}: {' and '.join(bad)}; stopped without updating the "
            f"weights; the last good checkpoint is {_last_note(run)} (lower --lr, or check the cache)"
        )


def _check_finite_params(model: torch.nn.Module, step: int, run: RunDir) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise LutqError(
                f"training diverged at step {step}: parameter {name} is not finite; not saving it; "
                f"the last good checkpoint is {_last_note(run)} (lower --lr)"
            )


def _last_note(run: RunDir) -> str:
    step = run.last_step()
    return "none (no checkpoint was saved yet)" if step is None else f"{run.last} (step {step})"


def student_preset(model: torch.nn.Module, cfg: TrainConfig) -> str:
    """The student's preset: its own quant config's when it has one (an --init checkpoint: cfg.preset is only
    the default then, not what the student is), else cfg.preset; 'custom' for a config built without one."""
    qcfg = quant_config_of(model)
    if qcfg is not None and qcfg.preset:
        return qcfg.preset
    return "custom" if cfg.init is not None else cfg.preset


def _ckpt_extra(cfg: TrainConfig, step: int, metrics: dict[str, float] | None = None, *, preset: str) -> dict[str, Any]:
    return {
        "train": {
            "run": str(cfg.out),
            "step": step,
            "mode": cfg.mode,
            "preset": preset,
            "cache": str(cfg.cache),
            "metrics": metrics or {},
            "config": cfg.to_dict(),  # what a later --resume continues (RunDir.resume_config)
        }
    }


def _run_record(cfg: TrainConfig, cache: KDCache, ctx: DistContext, precision: str) -> dict[str, Any]:
    meta = cache_identity(cache)
    return {
        "config": cfg.to_dict(),
        "lutq_version": __version__,
        "torch_version": torch.__version__,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "precision": precision,
        "cache_meta": meta,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _print_eval(step: int, total: int, m: dict[str, float], train_loss: float | None = None) -> None:
    parts = [f"step {step}/{total}"]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.4f}")
    parts += [f"val {k[5:]} {v:.4f}" for k, v in m.items() if k not in ("eval_tokens", "eval_sequences")]
    console.print(" | ".join(parts))


@contextlib.contextmanager
def _bar(enabled: bool, total: int, start: int) -> Any:
    from rich.progress import TextColumn

    if not enabled:
        yield None, None
        return
    cols = (TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"))
    with progress(*cols) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
        yield bar, task


# ----------------------------------------------------------------------------------------------------
# summary


def write_summary(
    run: RunDir, cfg: TrainConfig, result: TrainResult, *, status: str, preset: str | None = None
) -> None:
    """summary.md: status, the numbers before/after, where the checkpoints are, the config. `preset`: the
    student's (`student_preset`; default cfg.preset)."""
    from lutq.core.atomic import atomic_write_text

    lines = [
        f"# lutq train: {run.path}",
        "",
        f"- status: {status}",
        f"- steps: {result.step}/{cfg.steps}, tokens: {result.tokens:,}, time: {result.elapsed_s:.1f} s "
        f"({result.tokens / max(result.elapsed_s, 1e-9):,.0f} tok/s)",
        f"- student: {cfg.init or cfg.model or 'cache teacher'} ({preset or cfg.preset}), mode {cfg.mode}",
        f"- best validation loss: {_fmt(result.best_eval_loss)} at step {result.best_step}",
        f"- final train loss: {_fmt(result.final_train_loss)}",
        "",
    ]
    keys = sorted((set(result.initial_eval) | set(result.final_eval)) - {"eval_tokens", "eval_sequences"})
    if keys:
        lines += [f"| metric | initial | final | change ({LEVEL:.0%} CI, paired) |", "|---|---|---|---|"]
        lines += [
            f"| {k[5:]} | {_fmt(result.initial_eval.get(k))} | {_fmt(result.final_eval.get(k))} "
            f"| {format_paired(result.eval_change.get(k))} |"
            for k in keys
        ]
        lines += ["", PAIRED_NOTE if result.eval_change else NO_PAIRED_NOTE, ""]
    lines += ["## config", "", "```json", _json(cfg.to_dict()), "```", ""]
    atomic_write_text(run.summary, "\n".join(lines))


PAIRED_NOTE = (
    "The change is final minus initial (perplexity: final over initial), each unit (validation document, or batch "
    "for a cache without documents; perplexity window) paired with itself, so passage difficulty cancels; an "
    "interval that excludes zero is a real change."
)
NO_PAIRED_NOTE = (
    "No paired intervals: eval_units.json holds no step-0 and final evaluation of the same units (a run started "
    "before lutq kept them, a resume that evaluates other batches, or a single unit)."
)


def eval_change(run: RunDir, step: int | None) -> dict[str, dict[str, float | None]]:
    """{eval key: change} of the evaluation at `step` (the one the summary's final column shows) against step 0's,
    from eval_units.json, paired unit by unit (`lutq.evaluate.compare.paired_changes`): KD metrics as {diff, low,
    high}, perplexities as {ratio, low, high}. Empty when either evaluation is missing or they scored different
    units."""
    from lutq.evaluate.compare import paired_changes

    saved = run.eval_units()
    initial, latest = saved.get("initial"), saved.get("latest")
    if not initial or not latest or step is None or latest.get("step") != step or step == 0:
        return {}
    texts = sorted(initial.get("ppl_segments", {}).keys() & latest.get("ppl_segments", {}).keys())
    ppl, kd = paired_changes(initial, latest, texts)
    out: dict[str, dict[str, float | None]] = {f"eval_{k}": v for k, v in (kd or {}).items()}
    out.update({f"eval_ppl_{t}": v for t, v in ppl.items() if v is not None})
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _json(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d, indent=2, default=str)
