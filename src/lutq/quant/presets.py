"""The one preset registry and the quantization config (DESIGN.md "Presets").

Layers are matched by module name, the same for Qwen3, Llama (SmolLM2) and Gemma 3:
  mlp   `...mlp.gate_proj`, `...mlp.up_proj`, `...mlp.down_proj`
  attn  `...self_attn.q_proj`, `...k_proj`, `...v_proj`, `...o_proj`
  plus `lm_head` and `...embed_tokens` when quantize_lm_head / quantize_embeddings are set.
Per-layer overrides map a pattern to a LayerSpec (or None, "fp" in a TOML file: keep that layer in full precision),
or to a partial table of LayerSpec keys that changes only those keys of the spec the layer's group would give it.
A pattern is a glob over the full module name (`model.layers.0.*`), or a regex when prefixed `re:`.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re
from typing import Any

from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError

# calibrated init defaults (lutq.quant.calibrate), one home for the library, the CLI and the speedrun stages
GPTQ_DAMP = 0.01  # GPTQ damping, a fraction of the mean diag(H)
CALIB_SEQUENCES = 128  # calibration blocks
CALIB_LEN = 256  # tokens per block for data sources (a KD cache has its own L)
CalibSource = str | list[str]  # one KD cache or data source, or an even mix of several (calibration_blocks)

FULL_PRECISION = "fp"  # an override value that keeps matching layers unquantized (None in Python / JSON)

GROUP_PATTERNS = {
    "mlp": re.compile(r"(^|\.)mlp\.(gate_proj|up_proj|down_proj)$"),
    "attn": re.compile(r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|o_proj)$"),
    "lm_head": re.compile(r"(^|\.)lm_head$"),
    "embed": re.compile(r"(^|\.)embed_tokens$"),
}


@dataclasses.dataclass
class LayerSpec(ConfigBase):
    """LUT size (2..256), scale rank, and how the LUT is built ("uniform" or per-layer "kmeans")."""

    lut_size: int = 16
    rank: int = 4
    lut_kind: str = "uniform"

    def __post_init__(self) -> None:
        if not 2 <= int(self.lut_size) <= 256:
            raise LutqError(f"LayerSpec.lut_size must be in 2..256, got {self.lut_size}")
        if int(self.rank) < 1:
            raise LutqError(f"LayerSpec.rank must be >= 1, got {self.rank}")
        if self.lut_kind not in ("uniform", "kmeans"):
            raise LutqError(f"LayerSpec.lut_kind must be 'uniform' or 'kmeans', got {self.lut_kind!r}")


@dataclasses.dataclass
class QuantConfig(ConfigBase):
    """What `lutq.quantize` does to a model."""

    mlp: LayerSpec = dataclasses.field(default_factory=lambda: LayerSpec(4, 32))
    attn: LayerSpec = dataclasses.field(default_factory=lambda: LayerSpec(16, 8))
    # pattern -> a whole LayerSpec, None (full precision), or a partial dict of LayerSpec keys (only those change)
    overrides: dict[str, LayerSpec | dict[str, Any] | None] = dataclasses.field(default_factory=dict)
    group_size: int = 32
    tighten_rounds: int = 0
    gptq_damp: float = GPTQ_DAMP  # GPTQ damping (fraction of mean diag H), used when quantize() gets Hessians
    gptq_refit_rounds: int = 1  # with Hessians: rounds of (output-metric refit of Â·g, GPTQ idx again)
    # with Hessians: the init's k-means LUT and Â·g refits weight input column j by (H_jj / mean H_jj)^power
    # (activation-aware init, SqueezeLLM-style); 0: plain weight error. See docs/quant.md for what it buys.
    init_act_power: float = 0.5
    mode: str = "frozen"  # "latent": keep a trainable FP weight, idx re-picked each step (STE)
    ste_fp16: bool = False
    quantize_lm_head: bool = False
    quantize_embeddings: bool = False
    lm_head: LayerSpec = dataclasses.field(default_factory=lambda: LayerSpec(16, 8))
    embed: LayerSpec = dataclasses.field(default_factory=lambda: LayerSpec(16, 8))
    preset: str | None = None

    def __post_init__(self) -> None:
        self.overrides = {k: _as_spec(v, f"overrides[{k!r}]") for k, v in dict(self.overrides).items()}
        if self.mode not in ("frozen", "latent"):
            raise LutqError(f"QuantConfig.mode must be 'frozen' or 'latent', got {self.mode!r}")
        if not self.init_act_power >= 0:
            raise LutqError(f"QuantConfig.init_act_power must be >= 0, got {self.init_act_power}")
        if self.group_size < 1 or self.tighten_rounds < 0:
            raise LutqError(
                f"QuantConfig: group_size must be >= 1 and tighten_rounds >= 0 "
                f"(got {self.group_size}, {self.tighten_rounds})"
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["overrides"] = {k: v.to_dict() if isinstance(v, LayerSpec) else v for k, v in self.overrides.items()}
        return d

    def with_lut_kind(self, kind: str) -> QuantConfig:
        """A copy with every spec (groups and overrides) using LUT kind `kind`."""
        cfg = copy.deepcopy(self)
        for pattern, spec in cfg.overrides.items():
            if isinstance(spec, dict):
                cfg.overrides[pattern] = {**spec, "lut_kind": kind}
        for spec in (cfg.mlp, cfg.attn, cfg.lm_head, cfg.embed, *cfg.overrides.values()):
            if isinstance(spec, LayerSpec):
                spec.lut_kind = kind
                spec.__post_init__()
        return cfg

    def spec_for(self, name: str) -> tuple[str, LayerSpec] | None:
        """(group, spec) for module `name`, or None when it is not quantized under this config."""
        group = group_of(name)
        if (
            group is None
            or (group == "lm_head" and not self.quantize_lm_head)
            or (group == "embed" and not self.quantize_embeddings)
        ):
            return None
        base: LayerSpec = getattr(self, group)
        for pattern, spec in self.overrides.items():
            if matches(pattern, name):
                if isinstance(spec, dict):  # a partial table: the group's spec with those keys changed
                    spec = LayerSpec(**{**base.to_dict(), **spec})
                return None if spec is None else (group, spec)
        return group, base


def _as_spec(value: Any, where: str) -> LayerSpec | dict[str, Any] | None:
    # TOML has no null: the string "fp" is how a config file keeps a layer in full precision
    if value is None or (isinstance(value, str) and value.lower() == FULL_PRECISION):
        return None
    if isinstance(value, LayerSpec):
        return value
    if isinstance(value, dict):
        spec = LayerSpec.from_dict(value, source=where)  # checks the keys and their types
        keys = {f.name for f in dataclasses.fields(LayerSpec)}
        # every key named: a whole spec; some: only those keys change the matched layer's group spec
        return spec if keys <= value.keys() else {k: getattr(spec, k) for k in value}
    raise LutqError(
        f"QuantConfig.{where}: expected a LayerSpec, a dict, None or {FULL_PRECISION!r} (keep the layer in "
        f"full precision), got {value!r}"
    )


def group_of(name: str) -> str | None:
    """'mlp' | 'attn' | 'lm_head' | 'embed' for a module name, None for anything else."""
    return next((g for g, pat in GROUP_PATTERNS.items() if pat.search(name)), None)


def matches(pattern: str, name: str) -> bool:
    """Override pattern match: `re:<regex>` searches the name, anything else is a glob over the full name."""
    if pattern.startswith("re:"):
        try:
            return re.search(pattern[3:], name) is not None
        except re.error as e:
            raise LutqError(f"QuantConfig.overrides: bad regex {pattern!r} ({e})") from e
    return fnmatch.fnmatchcase(name, pattern)


PRESETS: dict[str, QuantConfig] = {
    "q2a4": QuantConfig(mlp=LayerSpec(4, 32), attn=LayerSpec(16, 8), preset="q2a4"),
    "q4a4": QuantConfig(mlp=LayerSpec(16, 4), attn=LayerSpec(16, 4), preset="q4a4"),
    "q4a4_r32": QuantConfig(mlp=LayerSpec(16, 32), attn=LayerSpec(16, 32), preset="q4a4_r32"),
    "q2a2": QuantConfig(mlp=LayerSpec(4, 32), attn=LayerSpec(4, 32), preset="q2a2"),
}


def get_preset(name: str) -> QuantConfig:
    """A fresh copy of preset `name` (edit it freely)."""
    if name not in PRESETS:
        raise LutqError(f"unknown quantization preset {name!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def resolve_config(config: str | QuantConfig | dict[str, Any]) -> QuantConfig:
    """A preset name, a QuantConfig or a dict (QuantConfig fields) -> QuantConfig."""
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        return QuantConfig.from_dict(config, source="quant config")
    raise LutqError(f"quantize: config must be a preset name, QuantConfig or dict, got {type(config).__name__}")
