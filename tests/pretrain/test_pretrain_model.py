"""The pretraining decoder: every attention variant against a naive reference, scaling, configs, counts."""

from __future__ import annotations

import math

import pytest
import torch

from lutq.core.errors import LutqError
from lutq.pretrain.model import GPT, ModelConfig, count_params, flops_per_token, params_of

T = 12


def small_config(variant: str, **kw) -> ModelConfig:
    base = {
        "vocab_size": 97,
        "d_model": 128,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 96,
        "block_size": 32,
        "variant": variant,
    }
    return ModelConfig(**(base | kw)).resolved()


def naive_rope(t: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate the pair (i, i + d/2) of position p by angle p · theta^(-2i/d), written out explicitly."""
    d = t.shape[-1]
    half = d // 2
    pos = torch.arange(t.shape[-2], dtype=torch.float64)[:, None]
    angle = pos * theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    c, s = angle.cos(), angle.sin()
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def reference_attention(attn, x: torch.Tensor, cfg: ModelConfig, *, double_scale: bool = False) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + causal mask)·V in float64, from the module's weights, with an explicit null column."""
    x = x.double()
    B, n, _ = x.shape
    H, KV = cfg.n_heads, cfg.kv_heads

    def proj(layer, heads):
        return (x @ layer.weight.double().T).view(B, n, heads, -1).transpose(1, 2)

    if cfg.variant == "decoupled":
        hs, hg = cfg.sem_dim // H, cfg.geo_dim // H
        q_sem, q_geo = proj(attn.q_sem, H), naive_rope(proj(attn.q_geo, H), cfg.rope_theta)
        k_sem = q_sem if cfg.tie_qk else proj(attn.k_sem, H)
        k_geo = naive_rope(proj(attn.q_geo if cfg.tie_qk else attn.k_geo, H), cfg.rope_theta)
        scores = q_sem @ k_sem.transpose(-1, -2) / math.sqrt(hs) + q_geo @ k_geo.transpose(-1, -2) / math.sqrt(hg)
        if double_scale:  # the seed's bug: SDPA's default scale applied on top
            scores = scores / math.sqrt(hs + hg)
        if cfg.null_attn:
            kn = attn.k_null.double()  # [H, hs + hg]: semantic part, then geometric part
            null = (q_sem @ kn[:, :hs, None]) / math.sqrt(hs) + (q_geo @ kn[:, hs:, None]) / math.sqrt(hg)
    else:
        hd = cfg.attn_dim // H
        q = naive_rope(proj(attn.q_proj, H), cfg.rope_theta)
        k = naive_rope(proj(attn.q_proj if cfg.tie_qk else attn.k_proj, KV), cfg.rope_theta)
        k = k.repeat_interleave(H // KV, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if cfg.null_attn:
            kn = attn.k_null.double().repeat_interleave(H // KV, dim=0)
            null = (q @ kn[:, :, None]) / math.sqrt(hd)
    v = proj(attn.v_proj, KV).repeat_interleave(H // KV, dim=1)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    if cfg.null_attn:
        scores = torch.cat([null, scores], dim=-1)
        v_null = attn.v_null.double().repeat_interleave(H // KV, dim=0)[None, :, None, :].expand(B, -1, 1, -1)
        v = torch.cat([v_null, v], dim=2)
    if cfg.learned_temp:
        scores = scores * attn.logit_scale.double().exp()[None, :, None, None]
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, n, -1) @ attn.o_proj.weight.double().T


CASES = [
    ("baseline", {}),
    ("baseline", {"null_attn": True}),
    ("baseline", {"tie_qk": True}),
    ("baseline", {"learned_temp": False}),
    ("gqa", {"kv_heads": 2}),
    ("gqa", {"kv_heads": 1, "null_attn": True}),
    ("bottleneck", {}),
    ("bottleneck", {"null_attn": True, "tie_qk": True}),
    ("decoupled", {}),
    ("decoupled", {"null_attn": True}),
    ("decoupled", {"tie_qk": True}),
    ("decoupled", {"tie_qk": True, "null_attn": True, "learned_temp": False}),
]


def _randomize_extras(model: GPT) -> None:
    """Give temperatures and null slots non-zero values so they matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("logit_scale", "k_null", "v_null")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize(("variant", "options"), CASES, ids=lambda c: str(c))
def test_attention_matches_naive_reference(variant: str, options: dict) -> None:
    cfg = small_config(variant, **options)
    model = GPT(cfg)
    _randomize_extras(model)
    attn = model.layers[0].attn
    x = torch.randn(2, T, cfg.d_model)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        ours = attn(x, cos, sin).double()
        ref = reference_attention(attn, x, cfg)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_decoupled_scales_each_path_exactly_once() -> None:
    cfg = small_config("decoupled", learned_temp=False, sem_dim=16, geo_dim=32)  # head dims 4 and 8
    model = GPT(cfg)
    attn = model.layers[0].attn
    with torch.no_grad():  # large projections so the scale visibly changes the softmax
        for layer in (attn.q_sem, attn.k_sem, attn.q_geo, attn.k_geo):
            layer.weight.mul_(40)
    x = torch.randn(2, T, cfg.d_model)
    with torch.no_grad():
        ours = attn(x, model.rope_cos[:T], model.rope_sin[:T]).double()
        right = reference_attention(attn, x, cfg)
        double = reference_attention(attn, x, cfg, double_scale=True)
    torch.testing.assert_close(ours, right, atol=2e-5, rtol=1e-4)
    assert (ours - double).abs().max() > 1e-2  # the seed's extra 1/sqrt(12) would be caught


def test_model_is_causal_and_checkpointing_gives_same_gradients() -> None:
    cfg = small_config("gqa", kv_heads=2)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    logits, _ = model(ids)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(changed)[0][:, :-1], logits[:, :-1])  # the future never leaks back

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        model.train()
        model(ids, ids.roll(-1, 1))[1].backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"variant": "gqa", "tie_qk": True}, "tie_qk is not possible with gqa"),
        ({"variant": "gqa", "kv_heads": 3}, "not divisible by kv_heads"),
        ({"variant": "nope"}, "unknown attention variant"),
        ({"variant": "decoupled", "geo_dim": 12}, "RoPE head dim 3 must be even"),
        ({"variant": "bottleneck", "attn_dim": 30}, "multiple of n_heads"),
        ({"norm": "batchnorm"}, "unknown norm"),
    ],
)
def test_bad_configs_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(LutqError, match=message):
        small_config(**({"variant": "baseline"} | kw))


def test_1b_parameter_counts_match_the_seed() -> None:
    """The seed launcher's final 1B shape (vocab 50,257; the seed used LayerNorm with bias)."""
    counts = {
        v: params_of(ModelConfig.preset("1b", variant=v, norm="layernorm", learned_temp=False))
        for v in ("baseline", "gqa", "decoupled")
    }
    assert round(counts["baseline"] / 1e6) == 1233
    assert round(counts["gqa"] / 1e6) == 1095  # kv_heads 8
    assert round(counts["decoupled"] / 1e6) == 934  # sem 128 / geo 256 / attn 384
    tied = params_of(ModelConfig.preset("1b", variant="decoupled", tie_qk=True, norm="layernorm"))
    assert round(tied / 1e6) == 916


@pytest.mark.parametrize(("variant", "options"), [*CASES, ("baseline", {"norm": "layernorm"})], ids=lambda c: str(c))
def test_analytic_parameter_count_matches_the_model(variant: str, options: dict) -> None:
    cfg = small_config(variant, **options)
    assert params_of(cfg) == count_params(GPT(cfg))


def test_flops_per_token_is_6n_plus_attention() -> None:
    cfg = small_config("baseline")
    n = params_of(cfg)
    assert flops_per_token(cfg, 16) == 6 * n + 12 * cfg.n_layers * 16 * cfg.d_model
    dec = small_config("decoupled")
    qk, v = dec.head_dims
    assert (qk, v) == ((dec.sem_dim + dec.geo_dim) // 4, dec.attn_dim // 4)
    assert flops_per_token(dec, 16) == 6 * params_of(dec) + 6 * dec.n_layers * 16 * 4 * (qk + v)


def test_sequence_longer_than_block_is_refused() -> None:
    model = GPT(small_config("baseline"))
    with pytest.raises(LutqError, match="exceeds the model's block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
