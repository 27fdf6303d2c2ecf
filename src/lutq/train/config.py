"""`TrainConfig`: everything a KD-QAT run needs, saved as the run's `run.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.kd.loss import KDLossConfig

PRECISIONS = ("auto", "fast", "fp32", "bf16")
DEFAULT_LR = {"scales": 1e-4, "latent": 2e-3}  # what trains: the scales A, B, g, or (--latent) the latent weights
LOGGERS = ("wandb", "trackio", "tensorboard")


@dataclass
class TrainConfig(ConfigBase):
    """A KD-QAT run: student source, KD cache, optimizer, schedule, eval/save cadence, runtime.

    The student is `init` (a lutq checkpoint, trained as is) or `model` quantized with `preset`
    (`model` defaults to the cache's teacher).
    """

    cache: Path = Path("cache")
    out: Path = Path("runs/train")
    model: str | None = None
    preset: str = "q2a4"
    init: Path | None = None
    # PTQ init of a fresh student (--model): k-means LUTs, tightened scales, GPTQ indices calibrated on
    # init_calib_sequences of the cache's train split (0: nearest rounding)
    init_lut: str = "kmeans"
    init_tighten: int = 4
    init_calib_sequences: int = 256
    mode: str = "all"
    train_lut: bool = False  # also train every layer's LUT entries (kept sorted, FP16-exact)
    latent: bool = False  # train the weights: latent u = W / S from W_eff, idx = nearest(u) re-picked each step
    # optimization (steps are optimizer steps; one step = batch_size * grad_accum sequences)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # peak lr; None: DEFAULT_LR (the latent weights are in scale units: docs/train.md)
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    # KD loss (temperature, hard_top1_weight, ...): lutq.kd.KDLossConfig, its defaults
    kd: KDLossConfig = field(default_factory=KDLossConfig)
    # cadence
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    eval_batch_size: int | None = None
    save_every: int = 100
    # held-out perplexity at eval (corpus specs like "shakespeare:val"); empty: skipped
    ppl_texts: tuple[str, ...] = ()
    ppl_max_tokens: int = 8192
    ppl_max_length: int = 512
    # runtime
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    loggers: tuple[str, ...] = ()
    project: str = "lutq"

    def validate(self) -> None:
        """Raise LutqError naming the first bad field."""
        from lutq.quant.api import TRAINABLE_MODES

        if self.mode not in TRAINABLE_MODES or self.mode == "none":
            raise LutqError(
                f"train: unknown mode {self.mode!r}; choose from {', '.join(m for m in TRAINABLE_MODES if m != 'none')}"
            )
        if self.precision not in PRECISIONS:
            raise LutqError(f"train: unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise LutqError(f"train: {name} must be >= 1, got {getattr(self, name)}")
        if self.init_lut not in ("uniform", "kmeans"):
            raise LutqError(f"train: init_lut must be 'uniform' or 'kmeans', got {self.init_lut!r}")
        for name in ("warmup", "eval_batches", "init_tighten", "init_calib_sequences"):
            if getattr(self, name) < 0:
                raise LutqError(f"train: {name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise LutqError(f"train: lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise LutqError(f"train: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.kd.temperature > 0:
            raise LutqError(f"train: kd.temperature must be > 0, got {self.kd.temperature}")
        unknown = [x for x in self.loggers if x not in LOGGERS]
        if unknown:
            raise LutqError(f"train: unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)}")
        if self.init is not None and self.model is not None:
            raise LutqError(
                "train: pass either --init CKPT (a lutq checkpoint) or --model M (quantized with --preset), not both"
            )

    @property
    def peak_lr(self) -> float:
        """`lr`, or the default for what trains (DEFAULT_LR)."""
        return self.lr if self.lr is not None else DEFAULT_LR["latent" if self.latent else "scales"]

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step, over all ranks (times the cache's L-1 gives tokens)."""
        return self.batch_size * self.grad_accum
