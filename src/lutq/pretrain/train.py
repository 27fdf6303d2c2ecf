"""The pretraining loop (`lutq pretrain`), top to bottom:

1. open the token file (its meta is checked), resolve the config, print the plan; a dry run stops here
2. build the model in the chosen precision and the optimizer (AdamW, fused on CUDA, or Lion); DDP under
   torchrun (gloo on CPU), rank 0 logs and saves
3. on resume: weights, optimizer, RNG, step and token counters from RUN/last/; the data position needs
   nothing more, because batch positions derive from (seed, step, micro-batch, rank)
4. every optimizer step: lr (warmup + cosine), sequence length (schedule), grad_accum micro-batches of
   random windows from the training part of the token memmap, clip, step
5. log train.jsonl / training_log.csv (loss, lr, tok/s, MFU), evaluate on the held-out tail (best/),
   save last/ every save_every steps and at the end (atomic), summary.md with a generated sample

Precision: `fp32`; `bf16-mixed` (fp32 master weights + bf16 autocast; the CUDA default); `bf16` (bf16
matrices, while norm gains, temperatures and null slots stay fp32 so small updates are not rounded away).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lutq.core.atomic import atomic_write_text
from lutq.core.console import console, progress
from lutq.core.digest import spaced_indices
from lutq.core.errors import LutqError
from lutq.data.tokens import TokenData
from lutq.evaluate.uncertainty import LEVEL, mean_interval
from lutq.models import load_trainer_state
from lutq.models.checkpoint import load_optimizer_state
from lutq.models.runtime import AUTO_PRECISIONS, auto_picks_bf16
from lutq.pretrain.checkpoint import load_weights_into, save_pretrain_checkpoint
from lutq.pretrain.config import (
    RUNTIME_FIELDS,
    Plan,
    PretrainConfig,
    heldout_overlap_note,
    make_plan,
    unused_seq_len_note,
)
from lutq.pretrain.flops import device_name, mfu, peak_flops
from lutq.pretrain.model import GPT, flops_per_token
from lutq.train.run_dir import RunDir
from lutq.train.schedule import lr_factor
from lutq.train.state import DistContext, rng_state, seed_everything, set_rng_state, setup_distributed

__all__ = ["PretrainConfig", "load_run_config", "pretrain", "train_step"]

COLUMNS = [
    "step",
    "tokens",
    "loss",
    "eval_loss",
    "eval_ppl",
    "lr",
    "grad_norm",
    "seq_len",
    "tokens_per_s",
    "mfu",
    "elapsed",
]
Batch = tuple[torch.Tensor, torch.Tensor]


# --- data -----------------------------------------------------------------------------------------


def window_starts(seed: int, step: int, index: int, lo: int, hi: int, seq_len: int, n: int) -> np.ndarray:
    """Start offsets of `n` windows of seq_len + 1 tokens inside [lo, hi), for global micro-batch `index`
    of optimizer step `step`: a pure function of its arguments, so a resumed run reads the same data."""
    rng = np.random.default_rng([seed, step, index])
    return rng.integers(lo, hi - seq_len, size=n)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] int64 token windows (vectorized reads from the memmap)."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    return torch.from_numpy(tokens[idx].astype(np.int64))


def data_windows(data: TokenData, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """`gather_windows` of a token file, refusing ids outside its vocabulary (a corrupt file would
    otherwise index past the embedding: a raw IndexError on the CPU, a device-side assert on CUDA)."""
    w = gather_windows(data.tokens, starts, seq_len)
    if w.numel() and int(w.max()) >= data.vocab_size:
        row, col = divmod(int(w.argmax()), seq_len + 1)
        raise LutqError(
            f"{data.path}: token id {int(w.max())} at position {int(starts[row]) + col} is outside the "
            f"vocabulary (vocab_size {data.vocab_size}); the file is corrupt, re-run `lutq data prepare`"
        )
    return w


def step_batches(data: TokenData, plan: Plan, cfg: PretrainConfig, step: int, dist: DistContext) -> list[Batch]:
    """This rank's micro-batches of optimizer step `step`. Global micro-batch index = micro · world + rank,
    so N ranks with grad_accum k read exactly what one process with grad_accum N·k reads."""
    seq = plan.seq_len_at(step)
    out = []
    for micro in range(cfg.grad_accum):
        index = micro * dist.world_size + dist.rank
        starts = window_starts(cfg.seed, step, index, 0, plan.train_tokens, seq, cfg.micro_batch)
        w = data_windows(data, starts, seq).to(dist.device, non_blocking=True)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def eval_batches(data: TokenData, plan: Plan, cfg: PretrainConfig, device: torch.device) -> list[Batch]:
    """Fixed, evenly spaced windows of the held-out tail (the same at every evaluation)."""
    seq = plan.eval_seq_len
    n = cfg.eval_iters * cfg.micro_batch
    starts = np.linspace(plan.train_tokens, len(data) - seq - 1, n).round().astype(np.int64)
    out = []
    for i in range(0, n, cfg.micro_batch):
        w = data_windows(data, starts[i : i + cfg.micro_batch], seq).to(device)
        out.append((w[:, :-1], w[:, 1:]))
    return out


# --- model, precision, optimizer --------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision: 'auto' is bf16-mixed on CUDA and fp32 elsewhere; 'fast' is bf16-mixed wherever the
    device has native bf16 matmuls (CUDA, AVX512-BF16 / AMX CPUs) and fp32 elsewhere."""
    if precision in AUTO_PRECISIONS:
        return "bf16-mixed" if auto_picks_bf16(precision, device) else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the forward's autocast context (bf16 autocast only for `bf16-mixed`)."""
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def cast_for_precision(model: GPT, precision: str) -> GPT:
    """With precision `bf16` the matrices become bf16; norm gains, temperatures and null slots stay fp32."""
    if precision == "bf16":
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.to(torch.bfloat16)
    return model


def build_model(plan: Plan, precision: str, device: torch.device, grad_checkpoint: bool, seed: int) -> GPT:
    """The decoder, initialized from `seed`, in the run's precision, on `device`."""
    torch.manual_seed(seed)
    model = cast_for_precision(GPT(plan.model), precision)
    model.grad_checkpointing = grad_checkpoint
    return model.to(device)


def make_optimizer(model: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or Lion; weight decay on matrices only (not norms, temperatures, null slots)."""
    # the null slots are [kv_heads, head_dim] but learned key/value vectors, not matrices: no decay either
    spared = {id(p) for n, p in model.named_parameters() if p.dim() < 2 or n.endswith(("k_null", "v_null"))}
    decay = [p for p in model.parameters() if id(p) not in spared]
    no_decay = [p for p in model.parameters() if id(p) in spared]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=cfg.lr, betas=(0.9, 0.99))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, cfg: PretrainConfig, total: int, step: int) -> float:
    lr = cfg.lr * lr_factor(step, total=total, warmup=min(cfg.warmup, max(0, total - 1)), min_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over `batches` (gradient accumulation; under DDP gradients sync on the last
    micro-batch only). Returns (mean loss, grad norm before clipping) as tensors."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        sync = model.no_sync() if ddp and i < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        total += loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batches), grad_norm


@torch.no_grad()
def evaluate(model: GPT, batches: Sequence[Batch], autocast: Callable[[], Any]) -> list[float]:
    """The mean next-token loss of each of `batches` (all the same shape: their mean is the validation loss)."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast():
            losses.append(model(x, y)[1].float())
    model.train(was_training)
    return torch.stack(losses).tolist()


def all_mean(value: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """Mean of `value` over ranks (SUM then divide: gloo has no AVG)."""
    if not dist.distributed:
        return value
    value = value.clone()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value / dist.world_size


def any_rank(flag: bool, dist: DistContext) -> bool:
    if not dist.distributed:
        return flag
    t = torch.tensor([int(flag)], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# --- run directory ----------------------------------------------------------------------------------


def load_run_config(run: str | Path) -> PretrainConfig:
    """The resolved config a run was started with (RUN/run.json), with `out` = RUN (where the run is now,
    so a moved or copied run directory resumes in place, never into the directory it was started in)."""
    data = RunDir(run).read_config()
    if "pretrain" not in data:
        raise LutqError(f"{Path(run) / 'run.json'}: not a pretraining run")
    return PretrainConfig.from_dict(data["pretrain"], source=str(Path(run) / "run.json")).replace(out=str(Path(run)))


def _check_resume_config(saved: PretrainConfig, cfg: PretrainConfig, run: Path) -> None:
    # `data` may name another path (the token file moved with the run): _check_resume_run checks its identity
    a, b = saved.to_dict(), cfg.to_dict()
    diff = sorted(k for k in a if k not in (*RUNTIME_FIELDS, "data") and a[k] != b.get(k))
    if diff:
        raise LutqError(
            f"{run}: cannot resume exactly, the config differs from run.json in "
            + ", ".join(f"{k} ({a[k]!r} -> {b.get(k)!r})" for k in diff)
        )


# What a resume must find unchanged in the token file (run.json records it)
DATA_IDENTITY = ("tokenizer_fingerprint", "vocab_size", "eos_id", "tokens", "sample_sha256")


def data_digest(data: TokenData, samples: int = 4096) -> str:
    """sha256 of the token count and of `samples` tokens at evenly spaced positions: tells a re-prepared or
    replaced token file apart without reading all of it (a copy of the same file has the same digest)."""
    idx = spaced_indices(len(data), samples)
    h = hashlib.sha256(str(len(data)).encode())
    h.update(np.asarray(data.tokens[idx], dtype=np.int64).tobytes())
    return h.hexdigest()


def data_record(data: TokenData) -> dict[str, Any]:
    """The token file's identity as run.json records it."""
    meta = {k: data.meta.get(k) for k in ("tokenizer", "tokenizer_fingerprint", "vocab_size", "eos_id", "tokens")}
    return meta | {"sources": data.meta.get("sources"), "sample_sha256": data_digest(data)}


def _check_resume_run(saved: dict[str, Any], data: TokenData, world_size: int, run: Path) -> None:
    """Refuse a resume that cannot be exact for reasons outside the config: another number of processes (the
    global batch is micro x accum x world) or a token file that is not the one the run started on (other
    windows, and a held-out tail that may now hold tokens already trained on)."""
    if saved.get("world_size") is not None and int(saved["world_size"]) != world_size:
        raise LutqError(
            f"{run}: cannot resume exactly, the run was started with world size {saved['world_size']} and this "
            f"invocation has {world_size} (the global batch would change); resume with as many processes"
        )
    recorded, now = saved.get("data") or {}, data_record(data)
    diff = [k for k in DATA_IDENTITY if recorded.get(k) is not None and now[k] is not None and recorded[k] != now[k]]
    if diff:
        raise LutqError(
            f"{run}: cannot resume exactly, the token file {data.path} is not the one the run started on: "
            + ", ".join(f"{k} ({recorded[k]!r} -> {now[k]!r})" for k in diff)
        )


@dataclass
class RunState:
    """Counters saved in trainer_state (the data position is `step`)."""

    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0  # training seconds over all invocations


def _trainer_state(p: RunState, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "step": p.step,
        "tokens": p.tokens,
        "best_val": p.best_val,
        "elapsed": p.elapsed,
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
    }


def _restore(ckpt: Path, model: GPT, optimizer: torch.optim.Optimizer, device: torch.device) -> RunState:
    """Load weights, optimizer, RNG and counters from the checkpoint `ckpt` (RUN/last/)."""
    load_weights_into(model, ckpt)
    state = load_trainer_state(ckpt, keys=("optimizer", "rng", "step", "tokens", "best_val", "elapsed"))
    # e.g. a --null-attn run saved before the null slots left the weight-decay group
    load_optimizer_state(optimizer, state, ckpt, "it was saved by another lutq version or optimizer setup")
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = device.type == "cuda" or None
    set_rng_state(state["rng"])
    return RunState(
        step=int(state["step"]),
        tokens=int(state["tokens"]),
        best_val=float(state["best_val"]),
        elapsed=float(state["elapsed"]),
    )


def print_plan(plan: Plan, cfg: PretrainConfig, precision: str, device: torch.device) -> None:
    from rich.table import Table

    table = Table("plan", "", title=f"lutq pretrain -> {cfg.out}", show_header=False)
    for k, v in plan.rows():
        table.add_row(k, v)
    table.add_row(
        "optimizer",
        f"{cfg.optimizer}, lr {cfg.lr:g}, warmup {cfg.warmup}, cosine to "
        f"{cfg.min_lr_ratio:g}x, wd {cfg.weight_decay:g}, clip {cfg.grad_clip:g}",
    )
    table.add_row(
        "precision",
        f"{precision}"
        + (", grad checkpointing" if cfg.grad_checkpoint else "")
        + (", torch.compile" if cfg.compile else ""),
    )
    table.add_row("device", f"{device_name(device)} x {plan.world_size}")
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")


# --- the loop ---------------------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig, *, run: bool = True, resume: bool = False) -> dict[str, Any]:
    """Print the plan, then (when `run`) train; `resume` continues the run in `cfg.out` exactly.
    Returns the plan and, after training, the final metrics."""
    dist = setup_distributed(cfg.device)
    try:
        return _pretrain(cfg, dist, run=run, resume=resume)
    finally:
        dist.close()


def _pretrain(cfg: PretrainConfig, dist: DistContext, *, run: bool, resume: bool) -> dict[str, Any]:
    if not cfg.data:
        raise LutqError("no token file given (--data data.npy, written by `lutq data prepare`)")
    data = TokenData.open(cfg.data)
    explicit_seq_len = cfg.seq_len
    cfg = cfg.resolve()
    device = dist.device
    if cfg.compile is None:
        cfg = cfg.replace(compile=device.type == "cuda")
    precision = resolve_precision(cfg.precision, device)
    plan = make_plan(cfg, len(data), data.vocab_size, dist.world_size)
    if not resume and (note := unused_seq_len_note(explicit_seq_len, cfg.seq_schedule)):
        plan.notes.append(note)
    if note := heldout_overlap_note(plan, data.meta):
        plan.notes.append(note)
    if dist.is_main:
        print_plan(plan, cfg, precision, device)
    result: dict[str, Any] = {
        "plan": dict(plan.rows()),
        "params": plan.params,
        "steps": plan.steps,
        "planned_tokens": plan.planned_tokens,
        "epochs": plan.epochs,
        "flops": plan.flops,
    }
    if not run:
        if dist.is_main:
            console.print("[bold]dry run[/]: nothing was trained; add --run to start")
        return result

    run_dir = RunDir(cfg.out)
    if resume:
        _check_resume_config(load_run_config(run_dir.path), cfg, run_dir.path)
        _check_resume_run(run_dir.read_config(), data, dist.world_size, run_dir.path)
    elif run_dir.exists():
        raise LutqError(
            f"{run_dir.path} already holds a run; continue it with --resume {run_dir.path} or choose another --out"
        )
    dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    model = build_model(plan, precision, device, bool(cfg.grad_checkpoint), cfg.seed)
    optimizer = make_optimizer(model, cfg, device)
    state = RunState()
    if resume:
        state = _restore(run_dir.resume_checkpoint(), model, optimizer, device)
        if dist.is_main:
            run_dir.truncate(state.step)  # drop rows logged after the checkpoint
            console.print(f"resumed {run_dir.path} at step {state.step:,} ({state.tokens:,} tokens)")
    elif dist.is_main:
        run_dir.write_config(
            {
                "pretrain": cfg.to_dict(),
                "model": plan.model.to_dict(),
                "params": plan.params,
                "world_size": dist.world_size,
                "data": data_record(data),
            }
        )
        run_dir.start_logs(COLUMNS)
    dist.barrier()

    train_model: nn.Module = torch.compile(model) if cfg.compile else model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    tokenizer = _load_tokenizer(data) if dist.is_main else None
    autocast = autocast_for(precision, device)
    val_batches = eval_batches(data, plan, cfg, device) if dist.is_main else []
    peak = peak_flops(device)
    extra = {"data": str(data.path), "tokenizer": data.tokenizer_name}

    def save(path: Path, with_state: bool, **info: Any) -> None:
        save_pretrain_checkpoint(
            path,
            model,
            tokenizer=tokenizer,
            trainer_state=_trainer_state(state, optimizer) if with_state else None,
            extra={**extra, "step": state.step, "tokens": state.tokens, **info},
        )

    started = time.time()
    start_step = state.step
    interval_tokens, interval_time = 0, 0.0
    last_eval: float | None = None
    last_eval_ci: tuple[float, float] | None = None
    stopped_early = False
    bar = progress() if dist.is_main else contextlib.nullcontext()
    with bar as p:
        task = p.add_task("pretraining", total=plan.steps, completed=state.step) if p else None
        while state.step < plan.steps:
            t0 = time.perf_counter()
            lr = set_lr(optimizer, cfg, plan.steps, state.step)
            seq = plan.seq_len_at(state.step)
            batches = step_batches(data, plan, cfg, state.step, dist)
            loss_t, grad_norm = train_step(train_model, optimizer, batches, autocast=autocast, grad_clip=cfg.grad_clip)
            loss = all_mean(loss_t, dist).item()
            if not math.isfinite(loss):
                raise LutqError(
                    f"{run_dir.path}: loss is {loss} at step {state.step + 1}; lower --lr or check the data "
                    f"({_last_checkpoint_note(run_dir)})"
                )
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += plan.global_batch * seq
            state.elapsed += dt
            interval_tokens += plan.global_batch * seq
            interval_time += dt
            done = state.step == plan.steps
            stop = (cfg.stop_after is not None and state.step - start_step >= cfg.stop_after) or (
                cfg.time_limit is not None and any_rank(time.time() - started > cfg.time_limit * 60, dist)
            )
            stopped_early = stop and not done
            row: dict[str, Any] = {}
            if state.step % cfg.log_every == 0 or done or stop:
                tok_s = interval_tokens / max(interval_time, 1e-9)
                row |= {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else grad_norm.item(),
                    "seq_len": seq,
                    "tokens_per_s": tok_s,
                    "mfu": mfu(tok_s, flops_per_token(plan.model, seq, plan.params), peak, dist.world_size),
                }
                interval_tokens, interval_time = 0, 0.0
            if dist.is_main and ((cfg.eval_every and state.step % cfg.eval_every == 0) or done):
                batch_losses = evaluate(model, val_batches, autocast)
                last_eval = sum(batch_losses) / len(batch_losses)
                last_eval_ci = mean_interval(batch_losses, [1] * len(batch_losses))
                row |= {"eval_loss": last_eval, "eval_ppl": math.exp(min(last_eval, 50.0))}
                if last_eval < state.best_val:
                    state.best_val = last_eval
                    save(run_dir.best, False, val_loss=last_eval)
            if dist.is_main:
                if row:
                    run_dir.log({"step": state.step, "tokens": state.tokens, **row, "elapsed": state.elapsed})
                p.update(task, completed=state.step, description=f"pretraining loss {loss:.3f}")
                if (cfg.save_every and state.step % cfg.save_every == 0) or done or stop:
                    save(run_dir.last, True)
            if stop:
                break
    dist.barrier()
    result |= {
        "run": str(run_dir.path),
        "final_step": state.step,
        "tokens": state.tokens,
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "last_val_loss": last_eval,
        "last_val_ci": None if last_eval_ci is None else list(last_eval_ci),
        "stopped_early": stopped_early,
        "wall_s": time.time() - started,
    }
    if dist.is_main:
        rows = [r for r in run_dir.rows() if r.get("tokens_per_s")]
        tok_s = float(np.mean([r["tokens_per_s"] for r in rows[1:] or rows])) if rows else None
        mfus = [r["mfu"] for r in rows[1:] or rows if r.get("mfu") is not None]
        result |= {"tokens_per_s": tok_s, "mfu": float(np.mean(mfus)) if mfus else None}
        if not stopped_early and cfg.sample_tokens and tokenizer is not None:
            result["sample"] = generate_sample(model, data, plan, tokenizer, cfg, autocast)
        write_summary(run_dir, plan, cfg, precision, device, result)
    # the ranks leave (and tear down the process group) together: under load a rank that left while rank 0 was
    # still writing the summary once aborted at exit ("terminate called without an active exception")
    dist.barrier()
    return result


def _last_checkpoint_note(run_dir: RunDir) -> str:
    """The last good checkpoint of a run stopped by a bad loss: last/ and its step, or that none was saved."""
    step = run_dir.last_step()
    if step is None:
        return "no checkpoint was saved before it: start again, e.g. with a lower --lr"
    return f"last good checkpoint: {run_dir.last} at step {step}"


def _load_tokenizer(data: TokenData) -> Any:
    try:
        return data.load_tokenizer()
    except LutqError as e:
        console.print(f"[yellow]warning:[/] checkpoints will carry no tokenizer ({e})")
        return None


def generate_sample(
    model: GPT,
    data: TokenData,
    plan: Plan,
    tokenizer: Any,
    cfg: PretrainConfig,
    autocast: Callable[[], Any],
    prompt_tokens: int = 24,
) -> dict[str, str]:
    """A sampled continuation (temperature 0.8, top-k 50, seeded) of the first held-out tokens."""
    device = next(model.parameters()).device
    start = plan.train_tokens
    # begin at a document, when one starts early in the tail with a whole prompt after it (the file ends with
    # EOS: a tail inside one long document has its only EOS last, and an empty prompt cannot be sampled from)
    eos = np.nonzero(np.asarray(data.tokens[start : start + 4096]) == data.eos_id)[0]
    if len(eos) and eos[0] + 1 + prompt_tokens < 4096 and start + eos[0] + 1 + prompt_tokens <= len(data):
        start += int(eos[0]) + 1
    prompt = torch.from_numpy(np.asarray(data.tokens[start : start + prompt_tokens]).astype(np.int64))[None].to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    with autocast():
        out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return {
        "prompt": tokenizer.decode(prompt[0].tolist()),
        "continuation": tokenizer.decode(out[0, prompt.shape[1] :].tolist()),
    }


def _ci_text(ci: Sequence[float] | None, cfg: PretrainConfig) -> str:
    """' [3.1502, 3.2718] (95 % CI over 20 batches; ppl 23.3-26.3)' for a validation loss's interval, else ''."""
    if not ci:
        return ""
    low, high = ci
    return (
        f" [{low:.4f}, {high:.4f}] ({LEVEL:.0%} CI over {cfg.eval_iters} batches; "
        f"ppl {math.exp(min(low, 50.0)):.2f}-{math.exp(min(high, 50.0)):.2f})"
    )


def write_summary(
    run: RunDir, plan: Plan, cfg: PretrainConfig, precision: str, device: torch.device, result: dict[str, Any]
) -> None:
    def fmt(v: float | None, spec: str = ".4f") -> str:
        return "n/a" if v is None else format(v, spec)

    best = result["best_val_loss"]
    mfu_text = "n/a" if result.get("mfu") is None else f"{100 * result['mfu']:.1f}%"
    early = " (stopped early; continue with `lutq pretrain --resume RUN --run`)" if result["stopped_early"] else ""
    lines = [f"# pretrain run `{run.path}`", "", "## plan", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in plan.rows()]
    lines += [
        f"| optimizer | {cfg.optimizer}, lr {cfg.lr:g} |",
        f"| precision | {precision} |",
        f"| device | {device_name(device)} x {plan.world_size} |",
        "",
        "## result",
        "",
        f"- steps: {result['final_step']:,} of {plan.steps:,}{early}",
        f"- tokens: {result['tokens']:,}",
        f"- best validation loss: {fmt(best)} (ppl {fmt(math.exp(best) if best is not None else None, '.2f')})",
        f"- last validation loss: {fmt(result['last_val_loss'])}{_ci_text(result.get('last_val_ci'), cfg)}",
        f"- throughput: {fmt(result.get('tokens_per_s'), ',.0f')} tokens/s, MFU {mfu_text}",
        f"- wall time this invocation: {result['wall_s']:.0f} s",
        "",
    ]
    if result.get("sample"):
        s = result["sample"]
        lines += ["## sample", "", "```", s["prompt"] + "⟨" + s["continuation"] + "⟩", "```", ""]
    atomic_write_text(run.summary, "\n".join(lines))
