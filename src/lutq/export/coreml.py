"""Core ML export: a whole-decoder ML program (static sequence length, FP16) built from the ANE artefact
with coremltools' MIL builder. LUT layers stay palettized: Q is a `constexpr_lut_to_dense` op
(uint2/uint4 indices + FP16 LUT) and the low-rank scales are applied in the factored form
    y = Σ_k scale_ag[:, k] ⊙ (Q (scale_b[k] ⊙ x)).

The decoder graph is written once against a tiny op interface with two backends: `MilOps` emits the
MIL program, `TorchOps` executes the same graph with torch so it can be checked against the model's own
logits on Linux (Core ML prediction itself needs macOS). Llama (SmolLM2) and Qwen3 are supported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lutq.core.atomic import atomic_dir, atomic_write_json
from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError
from lutq.export.ane import AneArtefact

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")
MASK_VALUE = -1e4  # additive causal mask; finite so FP16 softmax never sees -inf - -inf
PACKAGE = "model.mlpackage"
LUT_LINEAR = ".lut_linear"  # name suffix of the linear op applying a palettized Q (found again by verify)


@dataclass
class CoreMLConfig(ConfigBase):
    """Static sequence length of the program and the minimum deployment target (iOS18 = macOS 15)."""

    seq_len: int = 128
    deployment_target: str = "iOS18"


# ------------------------------------------------------------------------------------------- backends
class TorchOps:
    """Executes the decoder graph with torch (float32 by default) — the Linux-side check of the graph."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def const(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def lut(self, name: str, indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        return lut.to(self.dtype)[indices.long()]

    def gather(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table[ids.long()]

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, name: str = "") -> torch.Tensor:
        return F.linear(x, w, b)

    def matmul(self, x: torch.Tensor, y: torch.Tensor, transpose_y: bool = False) -> torch.Tensor:
        return x @ (y.transpose(-1, -2) if transpose_y else y)

    def add(self, x: Any, y: Any) -> torch.Tensor:
        return x + y

    def mul(self, x: Any, y: Any) -> torch.Tensor:
        return x * y

    def reshape(self, x: torch.Tensor, shape: list[int]) -> torch.Tensor:
        return x.reshape(shape)

    def transpose(self, x: torch.Tensor, perm: list[int]) -> torch.Tensor:
        return x.permute(perm)

    def concat(self, xs: list[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(xs, dim=axis)

    def split(self, x: torch.Tensor, sizes: list[int], axis: int) -> tuple[torch.Tensor, ...]:
        return torch.split(x, sizes, dim=axis)

    def layer_norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=eps)

    def softmax(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.softmax(x.float(), dim=axis).to(x.dtype)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def expand_dims(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.unsqueeze(axis)

    def reduce_sum(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.sum(dim=axis)

    def tile(self, x: torch.Tensor, reps: list[int]) -> torch.Tensor:
        return x.repeat(reps)

    def output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x


def _mil_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class MilOps:
    """Emits the decoder graph as MIL ops (inside an `mb.program` function); every constant is FP16."""

    def __init__(self) -> None:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        self.mb, self.types = mb, types

    def const(self, name: str, t: torch.Tensor) -> Any:
        a = t.detach().cpu().numpy()
        a = a.astype(np.float16) if t.is_floating_point() else a.astype(np.int32)
        return self.mb.const(val=a, name=_mil_name(name))

    def lut(self, name: str, indices: torch.Tensor, lut: torch.Tensor) -> Any:
        bits = _palette_bits(lut.numel())
        table = lut.detach().cpu().numpy().astype(np.float16)
        table = np.concatenate([table, np.repeat(table[-1:], 2**bits - table.size)])  # pad to 2^bits entries
        idx_dtype = getattr(self.types, f"np_uint{bits}_dtype") if bits < 8 else np.uint8
        return self.mb.constexpr_lut_to_dense(
            indices=indices.cpu().numpy().astype(idx_dtype), lut=table.reshape(1, 1, -1, 1), name=_mil_name(name)
        )

    def gather(self, table: Any, ids: Any) -> Any:
        return self.mb.gather(x=table, indices=ids, axis=0)

    def linear(self, x: Any, w: Any, b: Any = None, name: str = "") -> Any:
        kw = {"name": _mil_name(name)} if name else {}
        return self.mb.linear(x=x, weight=w, **kw) if b is None else self.mb.linear(x=x, weight=w, bias=b, **kw)

    def matmul(self, x: Any, y: Any, transpose_y: bool = False) -> Any:
        return self.mb.matmul(x=x, y=y, transpose_y=transpose_y)

    def add(self, x: Any, y: Any) -> Any:
        return self.mb.add(x=x, y=self._scalar(y))

    def mul(self, x: Any, y: Any) -> Any:
        return self.mb.mul(x=x, y=self._scalar(y))

    @staticmethod
    def _scalar(y: Any) -> Any:
        return np.float16(y) if isinstance(y, float | int) else y

    def reshape(self, x: Any, shape: list[int]) -> Any:
        return self.mb.reshape(x=x, shape=shape)

    def transpose(self, x: Any, perm: list[int]) -> Any:
        return self.mb.transpose(x=x, perm=perm)

    def concat(self, xs: list[Any], axis: int) -> Any:
        return self.mb.concat(values=xs, axis=axis)

    def split(self, x: Any, sizes: list[int], axis: int) -> tuple[Any, ...]:
        return tuple(self.mb.split(x=x, split_sizes=sizes, axis=axis))

    def layer_norm(self, x: Any, eps: float) -> Any:
        return self.mb.layer_norm(x=x, axes=[-1], epsilon=np.float16(eps))

    def softmax(self, x: Any, axis: int) -> Any:
        return self.mb.softmax(x=x, axis=axis)

    def silu(self, x: Any) -> Any:
        return self.mb.silu(x=x)

    def expand_dims(self, x: Any, axis: int) -> Any:
        return self.mb.expand_dims(x=x, axes=[axis])

    def reduce_sum(self, x: Any, axis: int) -> Any:
        return self.mb.reduce_sum(x=x, axes=[axis], keep_dims=False)

    def tile(self, x: Any, reps: list[int]) -> Any:
        return self.mb.tile(x=x, reps=reps)

    def output(self, x: Any, name: str) -> Any:
        return self.mb.identity(x=x, name=name)


def _palette_bits(lut_size: int) -> int:
    """Smallest Core ML index width (1, 2, 3, 4, 6, 8 bits) holding lut_size entries."""
    return next(b for b in (1, 2, 3, 4, 6, 8) if 2**b >= lut_size)


# --------------------------------------------------------------------------------------------- graph
def check_supported(art: AneArtefact) -> dict[str, Any]:
    """The model config, if the decoder graph covers it (Llama / Qwen3, SiLU MLP, full attention)."""
    cfg = art.config["model_config"]
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise LutqError(
            f"Core ML export supports {', '.join(SUPPORTED_MODEL_TYPES)} models, got "
            f"model_type={cfg.get('model_type')!r}; the ANE artefact (--format ane) covers it"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise LutqError(f"Core ML export: hidden_act {cfg.get('hidden_act')!r} not supported (silu only)")
    if cfg.get("use_sliding_window"):
        raise LutqError("Core ML export: sliding-window attention is not supported")
    return cfg


class DecoderGraph:
    """The Llama / Qwen3 decoder over the artefact's tensors, for one sequence of static length T.

    Activations are [T, hidden]. RMSNorm is layer_norm over [x, −x] (mean 0, so it divides by the RMS)
    with the first half kept: the FP16-safe form on the ANE (no x² overflow).
    """

    def __init__(self, ops: Any, art: AneArtefact, cos: torch.Tensor, sin: torch.Tensor) -> None:
        cfg = check_supported(art)
        self.ops, self.art, self.cfg = ops, art, cfg
        self.T = cos.shape[0]
        self.heads, self.kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        self.eps = cfg["rms_norm_eps"]
        self._consts: dict[str, Any] = {}
        self.cos, self.sin = ops.const("rope_cos", cos), ops.const("rope_sin", sin)
        mask = torch.full((self.T, self.T), MASK_VALUE).triu(1)
        self.mask = ops.const("causal_mask", mask)

    def const(
        self, name: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None, suffix: str = ""
    ) -> Any:
        """One constant per tensor (tied aliases share it)."""
        target = self.art.config.get("tied", {}).get(name, name)
        key = target + suffix
        if key not in self._consts:
            t = self.art.tensor(target)
            self._consts[key] = self.ops.const(key, transform(t) if transform else t)
        return self._consts[key]

    def has(self, name: str) -> bool:
        return name in self.art.tensors or name in self.art.config.get("tied", {})

    # ---- layers
    def linear(self, x: Any, module: str) -> Any:
        if module in self.art.lut_layers:
            return self.lut_linear(x, module)
        bias = self.const(f"{module}.bias") if self.has(f"{module}.bias") else None
        return self.ops.linear(x, self.const(f"{module}.weight"), bias)

    def lut_linear(self, x: Any, name: str) -> Any:
        """y = Σ_k scale_ag[:, k] ⊙ (Q (scale_b[k] ⊙ x)) (+ bias); x [T, in] -> [T, out]."""
        ops = self.ops
        q = self.q(name)
        xb = ops.mul(ops.expand_dims(x, 1), self.const(f"{name}.scale_b"))  # [T, r, in]
        y = ops.linear(xb, q, name=f"{name}{LUT_LINEAR}")  # [T, r, out]
        y = ops.reduce_sum(ops.mul(y, self.const(f"{name}.scale_ag", lambda t: t.t().contiguous(), "_t")), 1)
        return ops.add(y, self.const(f"{name}.bias")) if self.art.lut_layers[name]["bias"] else y

    def q(self, name: str) -> Any:
        key = f"{name}.q"
        if key not in self._consts:
            self._consts[key] = self.ops.lut(key, self.art.q_indices(name), self.art.tensors[f"{name}.lut"])
        return self._consts[key]

    def rms_norm(self, x: Any, weight: str) -> Any:
        ops = self.ops
        n = ops.layer_norm(ops.concat([x, ops.mul(x, -1.0)], -1), self.eps)
        half = ops.split(n, [self.dim_of(weight)] * 2, -1)[0]
        return ops.mul(half, self.const(weight))

    def dim_of(self, weight: str) -> int:
        return int(self.art.tensor(weight).shape[0])

    def rope(self, x: Any) -> Any:
        """x [heads, T, d]: x·cos + rotate_half(x)·sin."""
        ops = self.ops
        h = self.head_dim // 2
        x1, x2 = ops.split(x, [h, h], -1)
        rotated = ops.concat([ops.mul(x2, -1.0), x1], -1)
        return ops.add(ops.mul(x, self.cos), ops.mul(rotated, self.sin))

    def heads_first(self, x: Any, heads: int, norm: str | None) -> Any:
        """[T, heads·d] -> [heads, T, d], with Qwen3's per-head RMSNorm when `norm` is given."""
        x = self.ops.reshape(x, [self.T, heads, self.head_dim])
        if norm is not None:
            x = self.rms_norm(x, norm)
        return self.ops.transpose(x, [1, 0, 2])

    def attention(self, x: Any, p: str) -> Any:
        ops = self.ops
        qn, kn = (f"{p}.q_norm.weight", f"{p}.k_norm.weight") if self.has(f"{p}.q_norm.weight") else (None, None)
        q = self.rope(self.heads_first(self.linear(x, f"{p}.q_proj"), self.heads, qn))
        k = self.rope(self.heads_first(self.linear(x, f"{p}.k_proj"), self.kv_heads, kn))
        v = self.heads_first(self.linear(x, f"{p}.v_proj"), self.kv_heads, None)
        rep = self.heads // self.kv_heads
        if rep > 1:  # GQA: head h reads kv head h // rep
            k, v = (
                ops.reshape(ops.tile(ops.expand_dims(t, 1), [1, rep, 1, 1]), [self.heads, self.T, self.head_dim])
                for t in (k, v)
            )
        scores = ops.add(ops.matmul(ops.mul(q, float(self.head_dim**-0.5)), k, transpose_y=True), self.mask)
        out = ops.matmul(ops.softmax(scores, -1), v)  # [heads, T, d]
        out = ops.reshape(ops.transpose(out, [1, 0, 2]), [self.T, self.heads * self.head_dim])
        return self.linear(out, f"{p}.o_proj")

    def mlp(self, x: Any, p: str) -> Any:
        ops = self.ops
        return self.linear(
            ops.mul(ops.silu(self.linear(x, f"{p}.gate_proj")), self.linear(x, f"{p}.up_proj")), f"{p}.down_proj"
        )

    def embed(self, ids: Any) -> Any:
        name = "model.embed_tokens"
        if name not in self.art.lut_layers:
            return self.ops.gather(self.const(f"{name}.weight"), ids)
        ops, spec = self.ops, self.art.lut_layers[name]
        rows = ops.mul(
            ops.gather(self.q(name), ids),
            ops.matmul(ops.gather(self.const(f"{name}.scale_ag"), ids), self.const(f"{name}.scale_b")),
        )
        return ops.mul(rows, float(spec["embed_scale"])) if spec["embed_scale"] != 1.0 else rows

    def lm_head(self, x: Any) -> Any:
        if "lm_head" in self.art.lut_layers:
            return self.lut_linear(x, "lm_head")
        if "model.embed_tokens" in self.art.lut_layers and self.art.config.get("tied", {}).get("lm_head.weight"):
            return self.lut_linear(x, "model.embed_tokens")  # tied LUT embedding: logits = W_eff x
        return self.ops.linear(x, self.const("lm_head.weight"))

    def forward(self, input_ids: Any) -> Any:
        """input_ids [1, T] int32 -> logits [1, T, vocab]."""
        ops = self.ops
        x = self.embed(ops.reshape(input_ids, [self.T]))
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            x = ops.add(x, self.attention(self.rms_norm(x, f"{p}.input_layernorm.weight"), f"{p}.self_attn"))
            x = ops.add(x, self.mlp(self.rms_norm(x, f"{p}.post_attention_layernorm.weight"), f"{p}.mlp"))
        logits = self.lm_head(self.rms_norm(x, "model.norm.weight"))
        return ops.output(ops.expand_dims(logits, 0), "logits")


def rope_tables(model: nn.Module, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for positions 0..T-1, from the model's own rotary embedding."""
    rotary = model.model.rotary_emb
    dummy = torch.zeros(1, seq_len, 1)
    cos, sin = rotary(dummy, torch.arange(seq_len)[None])
    return cos[0].float(), sin[0].float()


@torch.no_grad()
def run_graph_torch(
    art: AneArtefact, model: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Logits [1, T, V] of the Core ML graph executed with torch (the Linux check of the program)."""
    check_supported(art)
    cos, sin = rope_tables(model, input_ids.shape[1])
    return DecoderGraph(TorchOps(dtype), art, cos, sin).forward(input_ids)


# ------------------------------------------------------------------------------------------- program
def _require_coremltools() -> Any:
    import logging

    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about untested torch versions and the missing macOS runtime
    try:
        import coremltools
    except ImportError as e:
        raise LutqError(
            "Core ML export needs coremltools: pip install 'lutq[coreml]' (or pip install coremltools)"
        ) from e
    finally:
        log.setLevel(level)
    return coremltools


def build_program(art: AneArtefact, model: nn.Module, cfg: CoreMLConfig) -> Any:
    """The MIL program: input `input_ids` int32 [1, T] -> output `logits` fp16 [1, T, vocab]."""
    ct = _require_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    target = getattr(ct.target, cfg.deployment_target, None)
    if target is None or target < ct.target.iOS18:
        raise LutqError(
            f"Core ML export: deployment target {cfg.deployment_target!r} must be iOS18 or newer "
            "(constexpr_lut_to_dense with sub-byte indices)"
        )
    check_supported(art)
    cos, sin = rope_tables(model, cfg.seq_len)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, cfg.seq_len), dtype=types.int32)], opset_version=target)
    def prog(input_ids: Any) -> Any:
        return DecoderGraph(MilOps(), art, cos, sin).forward(input_ids)

    return prog


def export_coreml(
    art: AneArtefact, model: nn.Module, out: str | Path, cfg: CoreMLConfig | None = None, tokenizer: Any = None
) -> Path:
    """Write OUT/model.mlpackage (+ tokenizer files + coreml.json) atomically; returns OUT."""
    cfg = cfg or CoreMLConfig()
    ct = _require_coremltools()
    if cfg.seq_len < 1:
        raise LutqError(f"Core ML export: seq_len must be >= 1, got {cfg.seq_len}")
    prog = build_program(art, model, cfg)
    mlmodel = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, cfg.deployment_target),
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    mlmodel.short_description = f"lutq palettized {art.config['architecture']} (static seq_len {cfg.seq_len})"
    out = Path(out)
    with atomic_dir(out) as tmp:
        mlmodel.save(str(tmp / PACKAGE))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "coreml.json",
            {
                "package": PACKAGE,
                "seq_len": cfg.seq_len,
                "deployment_target": cfg.deployment_target,
                "inputs": {"input_ids": {"shape": [1, cfg.seq_len], "dtype": "int32"}},
                "outputs": {
                    "logits": {"shape": [1, cfg.seq_len, art.config["model_config"]["vocab_size"]], "dtype": "float16"}
                },
                "palettized_layers": sorted(art.lut_layers),
                "source": art.config.get("source", ""),
                "size": art.config.get("size"),
            },
        )
    return out


# ------------------------------------------------------------------------------------------ checking
def load_package_program(package: str | Path) -> Any:
    """The MIL program stored in a saved .mlpackage (reads the spec and weights; no prediction needed)."""
    ct = _require_coremltools()
    from coremltools.converters.mil.frontend.milproto import load as milproto_load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise LutqError(f"{package}: not an .mlpackage (no Manifest.json)")
    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    spec = mlmodel.get_spec()
    return milproto_load.load(spec, spec.specificationVersion, mlmodel.weights_dir)


def _const_operand(op: Any) -> np.ndarray | None:
    """The constant input of a binary op (mul), or None."""
    for v in (op.x, op.y):
        if v.op is not None and v.op.op_type == "const":
            return np.asarray(v.val, dtype=np.float32)
    return None


def package_effective_weights(prog: Any) -> dict[str, torch.Tensor]:
    """W_eff per palettized layer, rebuilt from the program's own constants: lut[indices] ⊙ (ag @ b).

    Found by structure (identical constants may be merged): every linear op named `<layer>_lut_linear`
    takes Q from a constexpr_lut_to_dense, its input from mul(x, scale_b) and its output goes into
    mul(·, scale_agᵀ). Keyed by the MIL-safe layer name.
    """
    suffix = _mil_name(LUT_LINEAR)
    out: dict[str, torch.Tensor] = {}
    for op in prog.functions["main"].operations:
        if op.op_type != "linear" or not op.name.endswith(suffix):
            continue
        lut_op = op.weight.op
        if lut_op is None or lut_op.op_type != "constexpr_lut_to_dense":
            raise LutqError(f"Core ML program: {op.name} does not read a palettized weight")
        idx = torch.from_numpy(np.asarray(lut_op.indices.val).astype(np.int64))
        q = torch.from_numpy(np.asarray(lut_op.lut.val, dtype=np.float32).reshape(-1))[idx]
        b = _const_operand(op.x.op) if op.x.op is not None and op.x.op.op_type == "mul" else None
        after = [c for c in op.outputs[0].child_ops if c.op_type == "mul"]
        ag_t = _const_operand(after[0]) if after else None
        if b is None or ag_t is None:
            raise LutqError(f"Core ML program: the scales around {op.name} are not in the factored form")
        s = torch.from_numpy(ag_t).reshape(ag_t.shape[-2:]).t() @ torch.from_numpy(b).reshape(b.shape[-2:])
        out[op.name.removesuffix(suffix)] = q * s
    return out


def verify_package(art: AneArtefact, package: str | Path) -> float:
    """Max |W_eff(program) − W_eff(artefact)| over all palettized layers of a saved package (0.0 = exact)."""
    weights = package_effective_weights(load_package_program(package))
    names = {_mil_name(n): n for n in art.lut_layers}
    worst = 0.0
    for key, name in names.items():
        ref = art.effective_weight(name)
        if key in weights:
            worst = max(worst, float((weights[key] - ref).abs().max()))
        elif art.lut_layers[name]["kind"] == "linear" and not any(
            w.shape == ref.shape and torch.equal(w, ref) for w in weights.values()
        ):
            # (a layer may be absent only when Core ML merged it with an identical twin: same input and W_eff)
            raise LutqError(f"{package}: palettized layer {name} is missing from the program")
    return worst
