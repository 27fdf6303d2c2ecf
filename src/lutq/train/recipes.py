"""The progressive recipe: q4a4 from the FP teacher → convert q4→q2 → q2a4 mlp-only → q2a4 all.

Each stage is a `train()` run in its own directory under `out`; the conversion writes a checkpoint.
Re-running the recipe skips finished stages and resumes an interrupted one, so a killed recipe picks
up where it stopped.

    out/q4a4/        train: FP teacher quantized with q4a4, all layers
    out/q2a4_init/   checkpoint: q4a4's best converted with convert_q4_to_q2 (LUT 16→4 on MLP, rank 4→32/8)
    out/q2a4_mlp/    train: from q2a4_init, mlp-only
    out/q2a4_all/    train: from q2a4_mlp's best, all layers
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lutq.core.configs import ConfigBase
from lutq.core.console import console
from lutq.core.errors import LutqError
from lutq.quant.presets import CALIB_LEN, CALIB_SEQUENCES, CalibSource
from lutq.train.config import TrainConfig


@dataclass
class ProgressiveConfig(ConfigBase):
    """Steps and lr per stage; everything else (cache, batch, cadence, runtime) comes from `base`."""

    out: Path = Path("runs/progressive")
    base: TrainConfig = field(default_factory=TrainConfig)
    q4_preset: str = "q4a4"
    q4_steps: int = 500
    q4_lr: float = 1e-4
    q2_mlp_steps: int = 500
    q2_mlp_lr: float = 1e-4
    q2_all_steps: int = 500
    q2_all_lr: float = 5e-5
    convert_tighten_rounds: int = 2
    convert_calib_sequences: int = 256  # GPTQ for the q2 indices on the cache's train tokens; 0: nearest


@dataclass
class ProgressiveResult:
    """Where each stage's output is, and the stage results (TrainResult) by name."""

    out: Path
    stages: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Path:
        """The final q2a4 checkpoint (best of the last stage)."""
        return self.stages["q2a4_all"].checkpoint


def progressive(cfg: ProgressiveConfig) -> ProgressiveResult:
    """Run (or continue) the q4a4 → q2a4 recipe; returns the stage results."""
    if cfg.base.init is not None:
        raise LutqError("progressive recipe: base.init must be empty (the recipe starts from the FP model)")
    out = Path(cfg.out)
    result = ProgressiveResult(out)

    def stage(name: str, **changes: Any) -> Any:
        result.stages[name] = run_stage(dataclasses.replace(cfg.base, out=out / name, **changes))
        return result.stages[name]

    q4 = stage("q4a4", preset=cfg.q4_preset, mode="all", steps=cfg.q4_steps, lr=cfg.q4_lr)
    q2_init = convert_checkpoint(
        q4.checkpoint,
        out / "q2a4_init",
        tighten_rounds=cfg.convert_tighten_rounds,
        calib=str(cfg.base.cache) if cfg.convert_calib_sequences else None,
        calib_sequences=cfg.convert_calib_sequences,
    )
    result.stages["convert"] = q2_init
    mlp = stage("q2a4_mlp", init=q2_init, model=None, mode="mlp-only", steps=cfg.q2_mlp_steps, lr=cfg.q2_mlp_lr)
    stage("q2a4_all", init=mlp.checkpoint, model=None, mode="all", steps=cfg.q2_all_steps, lr=cfg.q2_all_lr)
    return result


def run_stage(cfg: TrainConfig) -> Any:
    """`train(cfg)`; if its run directory exists, resume it instead (a finished run only re-reads its
    results; one killed before its first save starts again)."""
    from lutq.train.run_dir import RunDir
    from lutq.train.trainer import train

    run = RunDir(cfg.out)
    if run.exists():
        try:
            run.resume_checkpoint()
        except LutqError as e:
            console.print(f"[yellow]recipe:[/] restarting {cfg.out} ({e})")
        else:
            console.print(f"[bold]recipe:[/] continuing {cfg.out}")
            return train(cfg, resume=True)
    console.print(f"[bold]recipe:[/] {cfg.out.name}: {cfg.mode} from {cfg.init or cfg.model or 'the cache teacher'}")
    return train(cfg, overwrite=True)


def convert_checkpoint(
    src: Path,
    dst: Path,
    *,
    tighten_rounds: int = 0,
    calib: CalibSource | None = None,
    calib_sequences: int = CALIB_SEQUENCES,
    calib_len: int = CALIB_LEN,
    reference: str | None = None,
    blockwise: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Path:
    """`lutq.quant.convert.convert_checkpoint` to the q2a4 targets, skipped when `dst` is already complete."""
    from lutq.quant.convert import convert_checkpoint as convert

    if (dst / "config.json").is_file():
        return dst
    convert(
        src,
        dst,
        tighten_rounds=tighten_rounds,
        calib=calib,
        calib_sequences=calib_sequences,
        calib_len=calib_len,
        reference=reference,
        blockwise=blockwise,
        device=device,
    )
    return dst
