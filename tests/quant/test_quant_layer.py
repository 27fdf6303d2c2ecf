"""LUTLinear: materialized == factored, exact gradients, STE-FP16, trainable switches, LUT training, latent."""

from __future__ import annotations

import pytest
import torch

from lutq.core import LutqError
from lutq.quant import LUTLinear
from lutq.quant.init import init_from_weight_
from lutq.quant.lut import is_fp16_exact, kmeans_lut, nearest_index
from lutq.quant.snap import snap_layer_


def _layer(
    out: int = 24,
    n_in: int = 40,
    lut: int = 16,
    rank: int = 4,
    *,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    **kw,
) -> tuple[LUTLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g)).to(dtype)
    layer = LUTLinear(n_in, out, lut, rank, bias=bias, dtype=dtype, **kw)
    init_from_weight_(layer, w, group_size=8)
    if bias:
        layer.bias.data.normal_(generator=g)
    return layer, w


@pytest.mark.parametrize("ste", [False, True])
def test_factored_equals_materialized(ste: bool) -> None:
    layer, _ = _layer(ste_fp16=ste)
    x = torch.randn(3, 5, 40)
    y = layer(x)
    layer.factored = True
    yf = layer(x)
    assert y.shape == (3, 5, 24)
    tol = 2e-3 if ste else 1e-5  # STE rounds W_eff itself in the materialized form only
    assert torch.allclose(y, yf, atol=tol * y.abs().max().item(), rtol=0), (y - yf).abs().max()
    snap_layer_(layer)
    layer.factored = False
    y1 = layer(x)
    layer.factored = True
    assert torch.allclose(y1, layer(x), atol=tol * y1.abs().max().item(), rtol=0)


def test_gradients_match_finite_differences() -> None:
    layer, _ = _layer(6, 10, 4, 3, dtype=torch.float64)
    x = torch.randn(4, 10, dtype=torch.float64)
    params = (layer.scale_A, layer.scale_B, layer.scale_g, layer.bias)

    def f(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"scale_A": a, "scale_B": b, "scale_g": g, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, tuple(p.detach().clone().requires_grad_(True) for p in params))
    # and the gradient reaches all three through the one materialized matmul
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params[:3])


def test_norms_of_a_and_b_carry_no_meaning() -> None:
    layer, _ = _layer()
    x = torch.randn(7, 40)
    y = layer(x)
    with torch.no_grad():
        layer.scale_A.mul_(torch.rand(layer.rank) + 0.5)
        layer.scale_B.mul_(5.0)
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_ste_fp16_forward_values_are_fp16_exact() -> None:
    layer, _ = _layer(ste_fp16=True)
    w = layer.effective_weight()
    assert is_fp16_exact(w.detach())
    a, b = layer.scales()
    assert is_fp16_exact(a.detach()) and is_fp16_exact(b.detach())
    w.sum().backward()
    assert layer.scale_g.grad is not None and torch.isfinite(layer.scale_g.grad).all()


def test_bf16_input_under_autocast() -> None:
    layer, _ = _layer()
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 40))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.scale_A.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("switch", "expect"),
    [
        ("all", {"scale_A", "scale_B", "scale_g"}),
        ("g", {"scale_g"}),
        ("ab", {"scale_A", "scale_B"}),
        ("lut", {"lut"}),
        ("none", set()),
    ],
)
def test_trainable_switches(switch: str, expect: set[str]) -> None:
    layer, _ = _layer()
    layer.set_trainable(switch)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == expect
    if expect:
        layer(torch.randn(3, 40)).sum().backward()
        assert {n for n, p in layer.named_parameters() if p.grad is not None} == expect
    assert "lut" in layer.state_dict() and "idx" in layer.state_dict()
    assert is_fp16_exact(layer.scale_g.detach()) == (switch == "ab")  # g frozen at its FP16 value
    with pytest.raises(LutqError, match="unknown switch"):
        layer.set_trainable("everything")


def test_trainable_lut_stays_sorted_and_fp16_exact() -> None:
    layer, _ = _layer(lut=8)
    layer.set_trainable("lut")
    x = torch.randn(5, 40)
    opt = torch.optim.SGD([layer.lut], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) - 1).square().mean().backward()
        opt.step()
        layer.project_()
        lut = layer.lut.detach()
        assert is_fp16_exact(lut) and bool((lut[1:] > lut[:-1]).all())
    # an optimizer step that swaps two entries: project_ re-sorts and remaps idx so W_eff keeps its values
    with torch.no_grad():
        layer.lut[[2, 5]] = layer.lut[[5, 2]].clone()
        before = layer.effective_weight()
    layer.project_()
    assert torch.equal(layer.effective_weight().detach(), before)
    layer.set_trainable("all")
    assert not isinstance(layer.lut, torch.nn.Parameter) and "lut" in dict(layer.named_buffers())


def test_latent_mode_ste_and_freeze() -> None:
    layer, w = _layer(lut=4, rank=2, mode="latent")
    s = layer.scale_map().detach()
    # latent weights are in scale units: u = W / S, and idx = nearest(u) is the init's pick
    assert torch.allclose(layer.latent * s, w, atol=1e-6) and layer.latent.requires_grad
    assert not layer.scale_A.requires_grad and not hasattr(layer, "weight")
    assert torch.equal(nearest_index(layer.latent.detach(), layer.lut), layer.idx)
    x = torch.randn(6, 40)
    dy = torch.randn(6, 24)
    y = layer(x)
    # the forward uses the quantized weight, and the straight-through gradient is dL/dW_q = dyᵀ x
    with torch.no_grad():
        layer.mode = "frozen"
        expect = layer(x)
        layer.mode = "latent"
    assert torch.allclose(y, expect, atol=1e-6)
    y.backward(dy)
    assert torch.allclose(layer.latent.grad, (dy.t() @ x) * s, atol=1e-5)  # dL/du = dL/dW_q ⊙ S
    assert layer.scale_A.grad is None
    # moving the latent weight re-picks idx on the next forward
    with torch.no_grad():
        layer.latent.mul_(-1)
        idx_before = layer.idx.clone()
        layer(x)
    assert not torch.equal(layer.idx, idx_before)
    y_latent = layer(x).detach()
    layer.freeze()
    assert layer.mode == "frozen" and not hasattr(layer, "latent") and "latent" not in layer.state_dict()
    assert torch.allclose(layer(x), y_latent, atol=1e-6)
    assert layer.scale_A.requires_grad
    with pytest.raises(LutqError, match="latent"):
        LUTLinear(4, 4, 4, 1, mode="latent").set_trainable("g")
    with pytest.raises(LutqError, match="not latent"):
        layer.set_latent_(w)  # frozen now


def test_latent_state_in_weight_units_loads_in_scale_units() -> None:
    # lutq checkpoints before 2026-11-30 stored latent layers' weights in weight units as `weight`
    layer, w = _layer(lut=4, rank=2, mode="latent")
    state = {k: v for k, v in layer.state_dict().items() if k != "latent"} | {"weight": w.clone()}
    old = LUTLinear(40, 24, 4, 2, bias=True, mode="latent")
    old.load_state_dict(state)
    assert torch.allclose(old.latent, layer.latent, atol=1e-6) and old.latent.requires_grad
    assert torch.equal(old.idx, layer.idx)


@pytest.mark.parametrize("lut", [4, 16])
def test_unfreeze_from_a_start_weight_keeps_the_indices(lut: int) -> None:
    layer, w = _layer(lut=lut, rank=3)
    with torch.no_grad():  # move a fifth of the indices one entry off their nearest pick, as GPTQ does
        g = torch.Generator().manual_seed(0)
        moved = torch.rand(layer.idx.shape, generator=g) < 0.2
        step = torch.where(layer.idx.long() == 0, 1, -1)
        layer.idx.copy_(torch.where(moved, layer.idx.long() + step, layer.idx.long()).to(torch.uint8))
    x = torch.randn(6, 40)
    y_frozen, idx = layer(x).detach(), layer.idx.clone()
    s = layer.scale_map().detach()
    layer.unfreeze(w, margin=0.05)
    # the forward and the indices are unchanged
    assert torch.allclose(layer(x), y_frozen, atol=1e-6) and torch.equal(layer.idx, idx)
    values, il = layer.lut, idx.long()
    lo = torch.where(il > 0, (values[(il - 1).clamp_min(0)] + values[il]) / 2, -torch.inf)
    hi = torch.where(il < lut - 1, (values[il] + values[(il + 1).clamp_max(lut - 1)]) / 2, torch.inf)
    u, v = w / s, layer.latent.detach()
    assert bool(((v > lo) & (v < hi)).all())
    # where the start sat well inside its index's bin, the weight is the start
    pad = 0.05 * (values[1:] - values[:-1]).max()
    inner = (u > lo + pad) & (u < hi - pad)
    assert inner.float().mean() > 0.5 and torch.allclose(v[inner], u[inner], atol=1e-5)
    # where it sat in another bin (the moved indices), the weight waits at the edge on the start's side
    outside = (u < lo) | (u > hi)
    assert outside[moved].float().mean() > 0.9 and not outside[~moved].any()
    assert bool((torch.sign(v - values[il]) == torch.sign(u - values[il]))[outside].all())
    assert bool((torch.minimum((v - lo).abs(), (hi - v).abs()) < 0.1 * pad / 0.05)[outside].all())
    # W_eff start, and bad arguments
    fresh, w2 = _layer(lut=lut, rank=3)
    fresh.unfreeze()
    assert torch.equal(fresh.latent.detach(), fresh.q())  # u = lut[idx]: W_eff in scale units
    bad, _ = _layer(lut=lut, rank=3)
    with pytest.raises(LutqError, match="shape"):
        bad.unfreeze(w2[:, :8])
    for margin in (0.0, 0.5):
        with pytest.raises(LutqError, match="margin"):
            bad.unfreeze(w2, margin=margin)


def test_snapped_layer_refuses_training_and_bad_args() -> None:
    layer, _ = _layer()
    snap_layer_(layer)
    with pytest.raises(LutqError, match="snapped"):
        layer.set_trainable("all")
    with pytest.raises(LutqError, match="mode"):
        LUTLinear(4, 4, mode="weird")
    with pytest.raises(LutqError, match="entries"):
        LUTLinear(4, 4, 16, lut=kmeans_lut(torch.randn(100), None, 4))
    with pytest.raises(LutqError, match="factored"):
        layer = LUTLinear(4, 4, 4, 1, mode="latent", factored=True)
        layer(torch.randn(1, 4))


def _uncached(layer: LUTLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward without the Q cache: gather, product with S, matmul."""
    w = torch.take(layer.lut, layer.idx.long()) * layer.scale_map()
    return torch.nn.functional.linear(x, w, layer.bias)


def test_q_cache_follows_every_change_of_idx_and_lut() -> None:
    layer, _ = _layer()
    x = torch.randn(3, 40)
    assert torch.equal(layer(x), _uncached(layer, x))
    assert layer._q() is layer._q() and layer._q().dtype == torch.float16  # cached, FP16 (the LUT is FP16-exact)
    with torch.no_grad():
        layer.idx.copy_((layer.idx.long() + 1).clamp_max(15).to(torch.uint8))  # in place: the version moves
    assert torch.equal(layer(x), _uncached(layer, x))
    with torch.no_grad():
        layer.lut.copy_(kmeans_lut(torch.randn(500), None, 16))
    assert torch.equal(layer(x), _uncached(layer, x))
    other, _ = _layer()
    layer.load_state_dict(other.state_dict())  # a checkpoint load copies into the same tensors
    assert torch.equal(layer(x), other(x)) and torch.equal(layer.q(), torch.take(other.lut, other.idx.long()))
    assert layer.q().dtype == torch.float32 and layer.q() is not layer.q()  # public q(): a new tensor, LUT dtype
    layer.double()  # new tensors: the cache is dropped, the product is fp64 again
    assert "_q_cache" not in layer.__dict__ and layer(x.double()).dtype == torch.float64
    assert torch.equal(layer(x.double()), _uncached(layer, x.double()))


def test_q_cache_is_bit_exact_and_grads_flow_after_inference_mode() -> None:
    layer, _ = _layer()
    layer.set_trainable("all")
    x = torch.randn(5, 40)
    layer.__dict__.pop("_q_cache", None)  # (the init's q() filled it)
    with torch.inference_mode():  # not cached here: an inference tensor could not be saved for backward
        ref = layer(x)
    assert "_q_cache" not in layer.__dict__
    out = layer(x)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.scale_A, layer.scale_B, layer.scale_g)]
    for p in (layer.scale_A, layer.scale_B, layer.scale_g):
        p.grad = None
    _uncached(layer, x).square().sum().backward()
    assert all(
        torch.equal(g, p.grad) for g, p in zip(grads, (layer.scale_A, layer.scale_B, layer.scale_g), strict=True)
    )


def test_q_cache_not_used_for_a_trained_lut_or_latent_layer() -> None:
    layer, _ = _layer()
    layer.set_trainable("lut")
    layer.__dict__.pop("_q_cache", None)
    assert layer._q().requires_grad and "_q_cache" not in layer.__dict__
    latent, _ = _layer(mode="latent")
    latent(torch.randn(2, 40))
    assert "_q_cache" not in latent.__dict__


def test_q_cache_made_only_with_gradients_on_and_clearable() -> None:
    layer, _ = _layer()
    layer.clear_cache()
    x = torch.randn(2, 40)
    with torch.no_grad():  # evaluation holds no extra copy of Q
        layer(x)
    assert "_q_cache" not in layer.__dict__
    layer(x)
    assert "_q_cache" in layer.__dict__
    with torch.no_grad():  # a write around the version counter is not seen until clear_cache()
        layer.idx.data[:] = (layer.idx.long() + 1).clamp_max(15).to(torch.uint8)
    layer.clear_cache()
    assert torch.equal(layer(x), _uncached(layer, x))


def test_q_cache_keeps_the_product_dtype_under_fp16_autocast() -> None:
    layer, _ = _layer()
    layer(torch.randn(2, 40))  # the FP16 cache exists
    with torch.autocast("cpu", dtype=torch.float16):
        w = layer.effective_weight()
        ref = torch.take(layer.lut, layer.idx.long()) * layer.scale_map()
    assert w.dtype == ref.dtype == torch.float32 and torch.equal(w, ref)


def test_q_cache_does_not_break_fx_tracing() -> None:
    layer, _ = _layer(bias=False)
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(3, 40)
    assert torch.equal(traced(x), layer(x))


def test_keep_q_cache_caches_under_no_grad_inside_only() -> None:
    from lutq.quant.layer import keep_q_cache

    layer, _ = _layer()
    layer.clear_cache()
    x = torch.randn(2, 40)
    with keep_q_cache(), torch.no_grad():
        out = layer(x)
    assert "_q_cache" in layer.__dict__ and torch.equal(out, _uncached(layer, x))
    layer.clear_cache()
    with torch.no_grad():
        layer(x)
    assert "_q_cache" not in layer.__dict__


def test_q_cache_logic_compiles_without_graph_breaks() -> None:
    """Inside torch.compile the cache is bypassed; its checks must not break the graph (dynamo only: the eager
    backend keeps this fast, inductor is the same trace)."""
    layer, _ = _layer()
    layer.set_trainable("all")
    x = torch.randn(3, 40)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, _uncached(layer, x), atol=1e-6) and layer.scale_g.grad is not None
