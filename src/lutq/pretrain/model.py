"""A GPT-style decoder for pretraining, readable top to bottom.

    tokens -> embedding -> n_layers x [x + attn(norm(x)); x + swiglu(norm(x))] -> norm -> tied lm head

Attention variants (`ModelConfig.variant`):

- `baseline`    multi-head attention; head dim attn_dim / n_heads (attn_dim = d_model); RoPE on the head.
- `gqa`         n_heads query heads share kv_heads key/value heads (default n_heads / 4).
- `bottleneck`  Q, K, V projected to a small attn_dim in total (default sem_dim + geo_dim); o_proj maps
                attn_dim back to d_model.
- `decoupled`   a semantic Q/K path (sem_dim, no RoPE) plus a geometric Q/K path (geo_dim, RoPE); the score
                is q_sem·k_sem / √hd_sem + q_geo·k_geo / √hd_geo; V is attn_dim wide.

Options: `null_attn` (a learned key/value slot every query may attend to; manual attention),
`tie_qk` (keys come from the query projection; refused for gqa), `learned_temp` (q of head h is
multiplied by exp(s_h), s initialised to 0).

Scaling: every variant folds its 1/√d factors (per path for `decoupled`) and the temperature into q, and
the attention itself runs with scale=1.0, so each scale is applied exactly once whichever kernel runs.
The fast path is `F.scaled_dot_product_attention(is_causal=True)`; only `null_attn` needs the manual one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lutq.core.configs import ConfigBase
from lutq.core.errors import LutqError

VARIANTS = ("baseline", "gqa", "bottleneck", "decoupled")
NORMS = ("rmsnorm", "layernorm")

# Size presets: d_model / n_layers / n_heads / d_ff / block_size. `1b` is the seed launcher's final
# TinyLlama-shaped config (about 1.1B parameters as gqa with a 50k vocabulary).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384, "block_size": 256},  # CPU-trainable
    "small": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 2048, "block_size": 1024},
    "medium": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 2816, "block_size": 2048},
    "1b": {"d_model": 2048, "n_layers": 22, "n_heads": 32, "d_ff": 5632, "block_size": 2048},
}


@dataclass
class ModelConfig(ConfigBase):
    """Decoder dimensions and attention variant; None fields are derived by `resolved()`."""

    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 768
    block_size: int = 512
    variant: str = "baseline"
    kv_heads: int | None = None  # gqa: default n_heads // 4
    attn_dim: int | None = None  # total Q width (and V width); default d_model, or sem+geo for bottleneck/decoupled
    sem_dim: int | None = None  # decoupled / bottleneck default: d_model // 16
    geo_dim: int | None = None  # decoupled / bottleneck default: d_model // 8
    null_attn: bool = False
    tie_qk: bool = False
    learned_temp: bool = True
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @classmethod
    def preset(cls, size: str, **overrides: object) -> ModelConfig:
        """A size preset (`tiny`, `small`, `medium`, `1b`) with explicit overrides (None values ignored)."""
        if size not in SIZES:
            raise LutqError(f"unknown model size {size!r}; choose from {', '.join(SIZES)}")
        return cls(**SIZES[size]).replace(**overrides)

    def resolved(self) -> ModelConfig:
        """Fill the derived dimensions and check that they fit together (LutqError names the problem)."""
        c = self.replace()
        if c.variant not in VARIANTS:
            raise LutqError(f"unknown attention variant {c.variant!r}; choose from {', '.join(VARIANTS)}")
        if c.norm not in NORMS:
            raise LutqError(f"unknown norm {c.norm!r}; choose from {', '.join(NORMS)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "block_size"):
            if getattr(c, name) <= 0:
                raise LutqError(f"model {name} must be positive, got {getattr(c, name)}")
        if c.d_model % c.n_heads:
            raise LutqError(f"d_model {c.d_model} is not divisible by n_heads {c.n_heads}")
        c.kv_heads = (c.kv_heads or max(1, c.n_heads // 4)) if c.variant == "gqa" else c.n_heads
        if c.variant == "gqa":
            if c.n_heads % c.kv_heads:
                raise LutqError(f"gqa: n_heads {c.n_heads} is not divisible by kv_heads {c.kv_heads}")
            if c.tie_qk:
                raise LutqError("tie_qk is not possible with gqa (queries and keys have different head counts)")
        small = c.variant in ("bottleneck", "decoupled")
        c.sem_dim = c.sem_dim or (c.d_model // 16 if small else None)
        c.geo_dim = c.geo_dim or (c.d_model // 8 if small else None)
        c.attn_dim = c.attn_dim or ((c.sem_dim or 0) + (c.geo_dim or 0) if small else c.d_model)
        dims = {"attn_dim": c.attn_dim}
        if c.variant == "decoupled":
            dims |= {"sem_dim": c.sem_dim, "geo_dim": c.geo_dim}
        for name, dim in dims.items():
            if not dim or dim % c.n_heads:
                raise LutqError(f"{c.variant}: {name} {dim} must be a positive multiple of n_heads {c.n_heads}")
        rope_dim = c.geo_dim // c.n_heads if c.variant == "decoupled" else c.attn_dim // c.n_heads
        if rope_dim % 2:
            raise LutqError(f"{c.variant}: the RoPE head dim {rope_dim} must be even")
        if c.variant not in ("bottleneck", "decoupled"):
            c.sem_dim = c.geo_dim = None
        return c

    @property
    def head_dims(self) -> tuple[int, int]:
        """(query/key dim per head, value dim per head) of a resolved config."""
        v = self.attn_dim // self.n_heads
        if self.variant == "decoupled":
            return (self.sem_dim + self.geo_dim) // self.n_heads, v
        return v, v


# --- building blocks -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) · w, computed in float32 (the Llama definition, so HF export matches exactly)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm32(cfg.d_model, eps=cfg.norm_eps)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (weights may stay float32 under bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


def rope_tables(dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, dim] for half-split (GPT-NeoX / Llama) rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, dim]: the first half pairs with the second half."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, n·d] -> [B, n, T, d]."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)


def attention_with_null(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_null: torch.Tensor, v_null: torch.Tensor
) -> torch.Tensor:
    """Causal softmax(q·kᵀ)·v with one extra key/value slot (never masked, no RoPE) in front.

    q [B, H, T, E] is already scaled; k [B, KV, T, E], v [B, KV, T, Ev]; k_null [KV, E], v_null [KV, Ev].
    """
    B, H, T, _ = q.shape
    rep = H // k.shape[1]
    k = torch.cat([k_null.to(k.dtype)[None, :, None, :].expand(B, -1, 1, -1), k], dim=2)
    v = torch.cat([v_null.to(v.dtype)[None, :, None, :].expand(B, -1, 1, -1), v], dim=2)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2)  # [B, H, T, 1 + T]
    visible = torch.ones(T, T + 1, dtype=torch.bool, device=q.device).tril(diagonal=1)
    scores = scores.float().masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Causal self-attention in one of the four variants (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.variant, self.n_heads, self.kv_heads = cfg.variant, H, cfg.kv_heads
        self.tie_qk, self.null_attn = cfg.tie_qk, cfg.null_attn
        qk_dim, v_dim = cfg.head_dims
        if cfg.variant == "decoupled":
            self.sem_head, self.geo_head = cfg.sem_dim // H, cfg.geo_dim // H
            self.q_sem = nn.Linear(d, cfg.sem_dim, bias=False)
            self.q_geo = nn.Linear(d, cfg.geo_dim, bias=False)
            if not cfg.tie_qk:
                self.k_sem = nn.Linear(d, cfg.sem_dim, bias=False)
                self.k_geo = nn.Linear(d, cfg.geo_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * qk_dim, bias=False)
            if not cfg.tie_qk:
                self.k_proj = nn.Linear(d, self.kv_heads * qk_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * v_dim, bias=False)
        self.o_proj = nn.Linear(H * v_dim, d, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(H)) if cfg.learned_temp else None
        if cfg.null_attn:
            self.k_null = nn.Parameter(torch.zeros(self.kv_heads, qk_dim))
            self.v_null = nn.Parameter(torch.zeros(self.kv_heads, v_dim))
        self.head_dim = qk_dim

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [B, H, T, E] (scaled, RoPE'd, temperature applied), k [B, KV, T, E], v [B, KV, T, Ev]."""
        H = self.n_heads
        if self.variant == "decoupled":
            q_sem = split_heads(self.q_sem(x), H)
            k_sem = q_sem if self.tie_qk else split_heads(self.k_sem(x), H)
            q_geo = split_heads(self.q_geo(x), H)
            k_geo = q_geo if self.tie_qk else split_heads(self.k_geo(x), H)
            q_geo, k_geo = apply_rope(q_geo, cos, sin), apply_rope(k_geo, cos, sin)
            q = torch.cat([q_sem * self.sem_head**-0.5, q_geo * self.geo_head**-0.5], dim=-1)
            k = torch.cat([k_sem, k_geo], dim=-1)
        else:
            q = split_heads(self.q_proj(x), H)
            k = q if self.tie_qk else split_heads(self.k_proj(x), self.kv_heads)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q = q * self.head_dim**-0.5
        if self.logit_scale is not None:
            q = q * self.logit_scale.exp().to(q.dtype).view(1, H, 1, 1)
        v = split_heads(self.v_proj(x), self.kv_heads)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if self.null_attn:
            y = attention_with_null(q, k, v, self.k_null, self.v_null)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=1.0, enable_gqa=self.kv_heads != self.n_heads
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The decoder. `forward(input_ids, targets=None) -> (logits, loss or None)`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config.resolved()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        rope_dim = cfg.geo_dim // cfg.n_heads if cfg.variant == "decoupled" else cfg.head_dims[0]
        cos, sin = rope_tables(rope_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices, residual output projections scaled by 1/√(2·n_layers) (GPT-2)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms start at 1 (their own init), temperatures and null slots at 0
            scale = (
                1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            )
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq_len = input_ids.shape[1]
        if seq_len > self.config.block_size:
            raise LutqError(f"sequence length {seq_len} exceeds the model's block_size {self.config.block_size}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.8,
        top_k: int | None = 50,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations (no KV cache: fine for short samples); temperature 0 is greedy."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits, _ = self(ids[:, -self.config.block_size :])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def params_of(cfg: ModelConfig) -> int:
    """Parameter count of a config from its shapes, without building it (equals count_params(GPT(cfg)))."""
    c = cfg.resolved()
    d, H, KV = c.d_model, c.n_heads, c.kv_heads
    qk, v = c.head_dims
    norm = d if c.norm == "rmsnorm" else 2 * d  # LayerNorm has a bias
    q = d * H * qk
    k = 0 if c.tie_qk else (q if c.variant == "decoupled" else d * KV * qk)
    attn = q + k + d * KV * v + H * v * d
    attn += (H if c.learned_temp else 0) + (KV * (qk + v) if c.null_attn else 0)
    layer = attn + 3 * d * c.d_ff + 2 * norm
    return c.vocab_size * d + c.n_layers * layer + norm


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6·N plus the attention score/value matmuls
    6·n_layers·seq_len·n_heads·(qk head dim + v head dim) (the PaLM convention, causal mask not halved)."""
    c = cfg.resolved()
    n = n_params if n_params is not None else params_of(c)
    qk, v = c.head_dims
    return 6.0 * n + 6.0 * c.n_layers * seq_len * c.n_heads * (qk + v)
