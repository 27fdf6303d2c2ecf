"""The CUDA paths, checked against the CPU fp32 reference: LUT layer numerics under bf16 autocast, the KD
cache written by a bf16 teacher, KD-QAT training (bf16 autocast, checkpoint read back on the CPU) and
pretraining. Marked `gpu`: skipped without a CUDA device (CI has none); `scripts/device-check.sh` runs them on
a lent GPU."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lutq.kd import CacheConfig, KDCache, build_cache, evaluate_kd
from lutq.models import load_checkpoint, save_checkpoint
from lutq.quant import LUTLinear
from lutq.quant.api import quantize_checkpoint
from lutq.quant.convert import convert_checkpoint
from lutq.quant.init import init_from_weight_
from lutq.testing import WORDS, tiny_model, tiny_tokenizer, write_teacher_and_docs

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    write_teacher_and_docs(root, num_docs=40)
    return root


def _cache(root: Path, name: str, device: str, dtype: str) -> Path:
    return build_cache(
        CacheConfig(
            model=str(root / "teacher"),
            source=str(root / "docs.jsonl"),
            thinking="none",
            seq_len=32,
            top_k=8,
            num_sequences=48,
            val_fraction=0.125,
            batch_size=16,
            device=device,
            dtype=dtype,
            out=root / name,
        )
    )


@pytest.fixture
def ieee_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32 for the test (lutq pretrain turns TF32 on for the process)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def test_lut_linear_on_cuda_matches_cpu_fp32(ieee_fp32_matmuls: None) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=g) * 0.05
    ref = LUTLinear(256, 384, 4, 32)
    init_from_weight_(ref, w, lut_kind="kmeans", tighten_rounds=2)
    x = torch.randn(4, 64, 256, generator=g)
    y_ref = ref(x)
    y_ref.square().mean().backward()
    cuda = LUTLinear(256, 384, 4, 32).cuda()
    cuda.load_state_dict(ref.state_dict())
    with torch.no_grad():  # fp32 on the GPU: the same function
        assert _rel(cuda(x.cuda()), y_ref) < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = cuda(x.cuda())
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) < 2e-2
    y.float().square().mean().backward()
    for name in ("scale_A", "scale_B", "scale_g"):
        assert cuda.get_parameter(name).grad.dtype == torch.float32  # fp32 master weights
        assert _rel(cuda.get_parameter(name).grad, ref.get_parameter(name).grad) < 5e-2, name
    cuda.factored = True
    with torch.no_grad():
        assert _rel(cuda(x.cuda()), y_ref) < 1e-4  # the ANE's factored form, on the GPU


def test_q_cache_on_cuda_is_bit_exact_under_bf16_autocast() -> None:
    """The cached FP16 Q gives the same W_eff, output and gradients as gathering every forward, on CUDA in bf16."""
    g = torch.Generator().manual_seed(1)
    layer = LUTLinear(256, 384, 16, 4)
    init_from_weight_(layer, torch.randn(384, 256, generator=g) * 0.05, lut_kind="kmeans")
    layer = layer.cuda()
    layer.set_trainable("all")
    x = torch.randn(4, 64, 256, generator=g).cuda()
    outs, grads = [], []
    for cached in (True, False):
        layer.clear_cache()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if cached:
                layer(x)  # fills the cache
                assert layer.__dict__["_q_cache"][1].dtype == torch.float16
                y = layer(x)
            else:
                w = torch.take(layer.lut, layer.idx.long()) * layer.scale_map()
                y = torch.nn.functional.linear(x, w.to(x.dtype))
        y.float().square().mean().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in (layer.scale_A, layer.scale_B, layer.scale_g)])
        for p in (layer.scale_A, layer.scale_B, layer.scale_g):
            p.grad = None
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))


def test_kd_cache_from_a_bf16_teacher_on_cuda_matches_the_cpu_cache(teacher_dir: Path) -> None:
    cpu, gpu = KDCache(_cache(teacher_dir, "cpu", "cpu", "fp32")), KDCache(_cache(teacher_dir, "gpu", "cuda", "auto"))
    assert gpu.meta["teacher_dtype"] == "bfloat16" and cpu.meta["teacher_dtype"] == "float32"
    for split in ("train", "val"):
        n = cpu.num_sequences(split)
        assert gpu.num_sequences(split) == n
        a, b = cpu.read(split, list(range(n))), gpu.read(split, list(range(n)))
        assert torch.equal(a["input_ids"], b["input_ids"])  # the same tokens, in the same order
        top1 = (a["topk_ids"][..., 0] == b["topk_ids"][..., 0]).float().mean()
        assert top1 > 0.9, f"{split}: top-1 agreement {top1:.3f} between the bf16 and fp32 teachers"
        scale = a["topk_logits"].abs().max()
        assert (a["topk_logits"][..., 0] - b["topk_logits"][..., 0]).abs().max() < 0.05 * scale
        assert (a["teacher_lse"] - b["teacher_lse"]).abs().max() < 0.05 * scale


def test_kd_qat_on_cuda_in_bf16_trains_and_reads_back_on_the_cpu(teacher_dir: Path, tmp_path: Path) -> None:
    from lutq.train import RunDir
    from lutq.train.config import TrainConfig
    from lutq.train.trainer import train

    cache = _cache(teacher_dir, "train-cache", "cpu", "fp32")
    cfg = TrainConfig(
        cache=cache,
        out=tmp_path / "run",
        model=str(teacher_dir / "teacher"),
        preset="q2a4",
        steps=12,
        batch_size=4,
        lr=1e-2,
        warmup=1,
        log_every=1,
        eval_every=6,
        eval_batches=2,
        save_every=6,
        device="cuda",
        precision="fast",
        init_lut="uniform",
        init_tighten=0,
        init_calib_sequences=0,
    )
    result = train(cfg)
    run = RunDir(result.run_dir)
    assert run.read_config()["precision"] == "bf16"
    losses = [r["loss"] for r in run.rows() if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])
    assert result.final_eval["eval_kd"] < result.initial_eval["eval_kd"]
    model, _, _ = load_checkpoint(result.run_dir / "last", load_tokenizer=False)  # a CUDA run's checkpoint
    assert next(model.parameters()).device.type == "cpu"
    on_cpu = evaluate_kd(model, cache, "val", batch_size=4, max_batches=2)
    assert on_cpu["kd"] == pytest.approx(result.final_eval["eval_kd"], rel=5e-2)


def test_kd_qat_with_compiled_decoder_layers_on_cuda_tracks_eager(teacher_dir: Path, tmp_path: Path) -> None:
    """`--compile` (inductor, one compile per decoder layer shape) gives the eager run's losses within bf16 noise."""
    from lutq.train import RunDir
    from lutq.train.config import TrainConfig
    from lutq.train.trainer import train

    cache = _cache(teacher_dir, "train-cache", "cpu", "fp32")
    base = dict(
        cache=cache,
        model=str(teacher_dir / "teacher"),
        preset="q2a4",
        steps=4,
        batch_size=4,
        lr=1e-2,
        warmup=1,
        log_every=1,
        eval_every=4,
        eval_batches=1,
        save_every=4,
        device="cuda",
        precision="fast",
        init_lut="uniform",
        init_tighten=0,
        init_calib_sequences=0,
        seed=0,
    )
    runs = {
        name: RunDir(train(TrainConfig(out=tmp_path / name, compile=name == "compiled", **base)).run_dir)
        for name in ("eager", "compiled")
    }
    eager, compiled = ([r["loss"] for r in runs[k].rows() if "loss" in r] for k in ("eager", "compiled"))
    assert len(compiled) == len(eager) == 4
    assert compiled == pytest.approx(eager, rel=5e-2)


def test_ptq_on_cuda_matches_the_cpu_ptq(tmp_path: Path, ieee_fp32_matmuls: None) -> None:
    """`lutq quantize --device cuda` (one-shot GPTQ q4a4; block-wise q2a4 with reconstruction steps) and `lutq
    convert --device cuda` give models as good as the CPU path's: same init errors and block losses within a few
    percent (SVD / k-means / GPTQ ties may round differently on the two devices), close logits."""
    save_checkpoint(tmp_path / "fp", tiny_model("llama", layers=2), tiny_tokenizer())
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60))}) + "\n" for i in range(24)
        )
    )
    kw = {"calib": str(calib), "calib_sequences": 8, "calib_len": 32, "show_progress": False}
    reports = {}
    for dev in ("cpu", "cuda"):
        reports["q4", dev] = quantize_checkpoint(str(tmp_path / "fp"), tmp_path / f"q4-{dev}", "q4a4", device=dev, **kw)
        reports["q2", dev] = quantize_checkpoint(
            str(tmp_path / "fp"), tmp_path / f"q2-{dev}", "q2a4", device=dev, blockwise={"steps": 5}, **kw
        )
        convert_checkpoint(
            tmp_path / f"q4-{dev}",
            tmp_path / f"c2-{dev}",
            calib=str(calib),
            calib_sequences=8,
            calib_len=32,
            device=dev,
            show=False,
        )
    assert load_checkpoint(tmp_path / "q2-cuda")[2].extra["device"] == "cuda"
    for kind in ("q4", "q2"):
        cpu, cuda = reports[kind, "cpu"], reports[kind, "cuda"]
        assert abs(cuda.mean_error() - cpu.mean_error()) < 0.05 * cpu.mean_error(), kind
        assert abs(cuda.mean_out_error() - cpu.mean_out_error()) < 0.05 * cpu.mean_out_error(), kind
    for b_cpu, b_cuda in zip(reports["q2", "cpu"].blocks, reports["q2", "cuda"].blocks, strict=True):
        assert b_cuda["loss_after"] < 1.05 * b_cpu["loss_after"]
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for kind in ("q4", "q2", "c2"):
            cpu, _, _ = load_checkpoint(tmp_path / f"{kind}-cpu")
            cuda, _, _ = load_checkpoint(tmp_path / f"{kind}-cuda")  # written from the CPU, read on the CPU
            assert _rel(cuda(ids).logits, cpu(ids).logits) < 0.05, kind


def test_pretrain_on_cuda_in_bf16(tmp_path: Path) -> None:
    from lutq.data.tokens import prepare_tokens
    from lutq.pretrain import PretrainConfig, pretrain

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(80)))
    data = prepare_tokens(str(tmp_path / "tok"), [str(corpus)], tmp_path / "data.npy", workers=1).path
    cfg = PretrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        d_model=64,
        n_layers=2,
        n_heads=2,
        d_ff=128,
        seq_len=32,
        micro_batch=8,
        grad_accum=1,
        steps=30,
        warmup=3,
        lr=3e-3,
        eval_every=15,
        eval_iters=2,
        log_every=5,
        save_every=0,
        sample_tokens=0,
        seed=0,
        device="cuda",
        precision="bf16",
    )
    pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and all(torch.isfinite(torch.tensor(evals))) and evals[-1] < evals[0]
