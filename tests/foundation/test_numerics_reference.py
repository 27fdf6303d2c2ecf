"""Independent, naive float64 references for the numbers lutq reports, straight from the docs, compared with the
library on tiny inputs: the KD cache (docs/kd.md "The cache"), the KD loss and its metrics (docs/kd.md "The
loss"), `evaluate_kd`, sliding-window perplexity (docs/evaluate.md), bits per weight (docs/quant.md "Size
formula", docs/formats.md), the LUT layer's materialized / factored / STE-FP16 forwards and the FP16 snap
(DESIGN.md, docs/quant.md "Snap"). The references use loops and float64 and share no code with lutq."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lutq.testing import tiny_cache, tiny_config, tiny_model, tiny_tokenizer

F64 = torch.float64


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even FP16 of a float64 tensor, back in float64 (the reference rounding)."""
    return torch.from_numpy(np.asarray(x.detach().double().numpy()).astype(np.float16).astype(np.float64))


def _fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The FP16 spacing at |x| (float64)."""
    a = np.abs(np.asarray(x.detach().double().numpy())).astype(np.float16)
    return torch.from_numpy(np.asarray(np.spacing(a)).astype(np.float64))


def _assert_fp16_rounding_of(lib: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """lib holds the FP16 rounding of ref64: FP16-exact, equal to the rounding of the float64 reference except
    where float32 noise crosses a rounding boundary (then one FP16 step away at most)."""
    lib64 = lib.detach().double().cpu()
    assert torch.equal(_fp16(lib64), lib64), f"{what}: not FP16-exact"
    exact = (lib64 == _fp16(ref64)).double().mean().item()
    assert exact >= 0.995, f"{what}: only {exact:.4f} of the values are the FP16 rounding of the reference"
    assert bool(((lib64 - ref64).abs() <= _fp16_ulp(ref64)).all()), f"{what}: off by more than one FP16 step"


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


# ============================================================================ 1. the KD cache (docs/kd.md)
L_CACHE, K_CACHE, R_CACHE = 24, 8, 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KD cache of the sharp tiny teacher over plain-text documents: L=24, K=8, R=4, 7 train + 3 val."""
    root = tmp_path_factory.mktemp("numerics_kd")
    return tiny_cache(
        root,
        num_docs=30,
        seq_len=L_CACHE,
        top_k=K_CACHE,
        negatives=R_CACHE,
        num_sequences=10,
        val_fraction=0.3,
        batch_size=4,
        shard_size=3,
    )


@pytest.fixture(scope="module")
def hf_teacher_f64(cache_dir: Path) -> torch.nn.Module:
    """The teacher loaded by transformers directly (not through lutq), in float64."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cache_dir.parent / "teacher", dtype=F64).eval()


def _read_all(cache_dir: Path, split: str) -> dict[str, torch.Tensor]:
    from lutq.kd import KDCache

    cache = KDCache(cache_dir)
    return cache.read(split, list(range(cache.num_sequences(split))))


@pytest.mark.parametrize("split", ["train", "val"])
def test_cache_topk_is_teacher_topk_at_position_t(cache_dir: Path, hf_teacher_f64: torch.nn.Module, split: str) -> None:
    batch = _read_all(cache_dir, split)
    ids, stored, lse = batch["topk_ids"], batch["topk_logits"], batch["teacher_lse"]
    B = ids.shape[0]
    assert B >= 2 and ids.shape == (B, L_CACHE - 1, K_CACHE) and lse.shape == (B, L_CACHE - 1)
    with torch.no_grad():
        logits = hf_teacher_f64(input_ids=batch["input_ids"]).logits  # [B, L, V]
    V = logits.shape[-1]
    for b in range(B):
        for t in range(L_CACHE - 1):  # position t (tokens 0..t) predicts token t+1
            row = logits[b, t]
            order = sorted(range(V), key=lambda j: -row[j].item())
            kth = row[order[K_CACHE - 1]].item()
            got = ids[b, t].tolist()
            assert len(set(got)) == K_CACHE
            # the stored ids are a top-K set of the position's logits (exactly: the float32 teacher vs the float64
            # one moves logits by ~1e-6, far less than the gaps here) ...
            assert all(row[j].item() >= kth - 1e-5 for j in got), (b, t)
            assert got[0] == order[0], (b, t)  # index 0 is the teacher's argmax
            # ... the stored logits are the raw logits there, rounded to FP16, sorted descending
            ref = _fp16(row[got])
            assert torch.allclose(stored[b, t].double(), ref, rtol=0, atol=1e-5) or bool(
                ((stored[b, t].double() - row[got]).abs() <= _fp16_ulp(row[got])).all()
            ), (b, t)
            assert all(stored[b, t, k] >= stored[b, t, k + 1] for k in range(K_CACHE - 1)), (b, t)
            # teacher_lse: the log-sum-exp of all logits, the top-K counted at their stored FP16 values
            vals = [stored[b, t, k].item() for k in range(K_CACHE)]
            vals += [row[j].item() for j in range(V) if j not in set(got)]
            lse_ref = _logsumexp(vals)
            assert abs(lse[b, t].item() - lse_ref) < 2e-5, (b, t, lse[b, t].item(), lse_ref)
            # ... so that exp(stored - lse) and the tail mass sum to 1
            mass = sum(math.exp(v - lse[b, t].item()) for v in vals)
            assert abs(mass - 1) < 2e-5
    # not aligned one position off (the check above would then have failed; make the distinction explicit)
    shifted = logits[:, 1:].topk(1, dim=-1).indices[..., 0]
    assert not torch.equal(shifted, ids[:, :, 0])


def test_cache_negatives_and_packing(cache_dir: Path, hf_teacher_f64: torch.nn.Module) -> None:
    from lutq.kd import KDCache

    cache = KDCache(cache_dir)
    tok = tiny_tokenizer()
    vocab_limit = min(len(tok), hf_teacher_f64.config.vocab_size)
    assert cache.meta["negatives"]["vocab_limit"] == vocab_limit
    batch = _read_all(cache_dir, "train")
    with torch.no_grad():
        logits = hf_teacher_f64(input_ids=batch["input_ids"]).logits[:, :-1]
    neg, neg_logits, top = batch["neg_ids"], batch["neg_logits"], batch["topk_ids"]
    assert neg.shape == (top.shape[0], L_CACHE - 1, R_CACHE)
    for b in range(neg.shape[0]):
        for t in range(L_CACHE - 1):
            for r in range(R_CACHE):
                j = int(neg[b, t, r])
                assert 0 <= j < vocab_limit and j not in set(top[b, t].tolist())
                assert abs(neg_logits[b, t, r].item() - logits[b, t, j].item()) <= _fp16_ulp(logits[b, t, j]).item()
    # blocks: the split's documents, each tokenized as is and followed by EOS, concatenated and cut into L-token
    # blocks (no padding), so the split's blocks in order are one stream that starts at a document's start
    docs = {json.loads(line)["text"] for line in (cache_dir.parent / "docs.jsonl").read_text().splitlines()}
    eos = tok.eos_token_id
    for split in ("train", "val"):
        flat = _read_all(cache_dir, split)["input_ids"].reshape(-1).tolist()
        cuts = [-1] + [i for i, x in enumerate(flat) if x == eos]
        assert len(cuts) >= (2 if split == "train" else 1)  # (val: 72 tokens, inside one document)
        pieces = [flat[a + 1 : b] for a, b in itertools.pairwise(cuts)]
        assert all(tok.decode(p) in docs for p in pieces)  # every piece up to an EOS is one whole document
        rest = tok.decode(flat[cuts[-1] + 1 :])
        assert any(d.startswith(rest) for d in docs)  # the stream is cut inside a document


def test_cache_storage_per_token(cache_dir: Path) -> None:
    """docs/kd.md: (K + R) × 6 + 4 bytes per position plus 4 bytes per input token (array payload of each shard;
    the rest of a file is its safetensors header)."""
    import struct

    from lutq.kd import KDCache

    cache = KDCache(cache_dir)
    per_seq = 4 * L_CACHE + (L_CACHE - 1) * ((K_CACHE + R_CACHE) * 6 + 4)
    for split in ("train", "val"):
        for sh in cache.meta["shards"][split]:
            data = (cache_dir / sh["file"]).read_bytes()
            (header,) = struct.unpack("<Q", data[:8])
            assert len(data) - 8 - header == sh["sequences"] * per_seq
    assert round((64 * 6 + 4) * 127 / 128 + 4) == 389  # the documented L128 K64 R0 figure


def test_sample_negatives_is_exactly_uniform_over_the_allowed_ids() -> None:
    from lutq.kd.cache import sample_negatives

    V, K = 37, 6
    g = torch.Generator().manual_seed(0)
    top = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(5)])  # [5, K]
    n = V - K
    u = ((torch.arange(n, dtype=F64) + 0.5) / n).expand(5, n)  # one uniform in the middle of each of n cells
    got = sample_negatives(top, u, V)
    for row in range(5):
        allowed = [j for j in range(V) if j not in set(top[row].tolist())]
        assert got[row].tolist() == allowed  # the k-th cell maps to the k-th allowed id: a bijection, so uniform


def test_stored_lse_from_bf16_logits() -> None:
    """The GPU teacher's path (bf16 logits), on the CPU: same definition, counted from the bf16 values."""
    from lutq.kd.cache import targets_from_logits

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 6, 50, generator=g, dtype=F64) * 4).to(torch.bfloat16)
    out = targets_from_logits(logits, K=5)
    for b in range(2):
        for t in range(5):
            row = logits[b, t].double()
            got = out["topk_ids"][b, t].tolist()
            vals = [out["topk_logits"][b, t, k].item() for k in range(5)] + [
                row[j].item() for j in range(50) if j not in set(got)
            ]
            assert abs(out["teacher_lse"][b, t].item() - _logsumexp(vals)) < 1e-5
            assert torch.equal(out["topk_logits"][b, t].double(), _fp16(row[got]))
    assert out["topk_ids"].shape == (2, 5, 5)  # the last position predicts nothing


# ============================================================================ 2. the KD loss (docs/kd.md)


def _ref_kd_terms(
    z: torch.Tensor, batch: dict[str, torch.Tensor], T: float, use_negatives: bool = True, softcap: float | None = None
) -> dict[str, torch.Tensor]:
    """Per-position terms [N] from the student's full logits z [N, V] (float64, differentiable), one position at a
    time, from docs/kd.md: kd = T²·KL(p_T ‖ q_T) over the candidates (top-K + negatives, renormalized on them),
    kl = the same at T = 1, ce = full-vocab CE on the teacher's top-1, label_ce = full-vocab CE on the text's next
    token, full_kl = Σ_topK p (log p − log q) + p_r (log p_r − log q_r) with absolute probabilities (the teacher's
    from teacher_lse), sampled_ce = CE over the candidates on the teacher's top-1, top1_agree."""
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    K = batch["topk_ids"].shape[-1]
    top = batch["topk_ids"].reshape(-1, K)
    t_top = batch["topk_logits"].reshape(-1, K).double()
    labels = batch["input_ids"][:, 1:].reshape(-1)
    lse_t = batch["teacher_lse"].reshape(-1).double() if "teacher_lse" in batch else None
    if use_negatives and "neg_ids" in batch:
        R = batch["neg_ids"].shape[-1]
        cand = torch.cat([top, batch["neg_ids"].reshape(-1, R)], 1)
        t_cand = torch.cat([t_top, batch["neg_logits"].reshape(-1, R).double()], 1)
    else:
        cand, t_cand = top, t_top
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("kd", "kl", "ce", "label_ce", "full_kl", "sampled_ce", "top1_agree")
    }
    V = z.shape[1]
    for n in range(z.shape[0]):
        s = torch.stack([z[n, j] for j in cand[n].tolist()])
        t = t_cand[n]
        for temp, key in ((T, "kd"), (1.0, "kl")):
            p = torch.exp(t / temp - torch.logsumexp(t / temp, 0))
            log_q = s / temp - torch.logsumexp(s / temp, 0)
            out[key].append(
                (temp * temp if key == "kd" else 1.0) * sum(p[c] * (torch.log(p[c]) - log_q[c]) for c in range(len(p)))
            )
        log_q_full = z[n] - torch.logsumexp(z[n], 0)
        out["ce"].append(-log_q_full[int(top[n, 0])])
        out["label_ce"].append(-log_q_full[int(labels[n])])
        out["sampled_ce"].append(-(s[0] - torch.logsumexp(s, 0)))
        out["top1_agree"].append(torch.tensor(float(int(z[n].argmax()) == int(top[n, 0])), dtype=F64))
        if lse_t is not None:
            ids = top[n].tolist()
            p = torch.exp(t_top[n] - lse_t[n])
            q = torch.stack([torch.exp(log_q_full[j]) for j in ids])
            p_r = 1 - p.sum()
            q_r = sum(torch.exp(log_q_full[j]) for j in range(V) if j not in set(ids))
            head = sum(p[k] * (torch.log(p[k]) - torch.log(q[k])) for k in range(K))
            tail = p_r * (torch.log(p_r) - torch.log(q_r)) if p_r > 0 else -0.0 * torch.log(q_r)
            out["full_kl"].append(head + tail)
    return {k: torch.stack(v) for k, v in out.items() if v}


def _ref_loss(terms: dict[str, torch.Tensor], cfg: object) -> torch.Tensor:
    return (
        cfg.kd_weight * terms["kd"].mean()
        + cfg.hard_top1_weight * terms["ce"].mean()
        + cfg.label_ce_weight * terms["label_ce"].mean()
        + cfg.full_kl_weight * terms["full_kl"].mean()
        + cfg.sampled_ce_weight * terms["sampled_ce"].mean()
    )


def _synthetic_batch(seed: int, B: int = 2, L: int = 8, V: int = 40, K: int = 6, R: int = 3, H: int = 12):
    """hidden [B, L-1, H], lm_head [V, H] and a cache batch built per docs/kd.md from random teacher logits."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L - 1, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    teacher = torch.randn(B, L - 1, V, generator=g, dtype=F64) * 2.5
    teacher[..., 3] += 4.0  # a dominant token at some positions, a flat tail at others
    vals, ids = teacher.topk(K, dim=-1)
    stored = _fp16(vals)
    lse = torch.empty(B, L - 1, dtype=F64)
    neg = torch.empty(B, L - 1, R, dtype=torch.long)
    for b in range(B):
        for t in range(L - 1):
            top = set(ids[b, t].tolist())
            lse[b, t] = _logsumexp(stored[b, t].tolist() + [teacher[b, t, j].item() for j in range(V) if j not in top])
            allowed = torch.tensor([j for j in range(V) if j not in top])
            neg[b, t] = allowed[torch.randint(len(allowed), (R,), generator=g)]
    batch = {
        "input_ids": torch.randint(0, V, (B, L), generator=g),
        "topk_ids": ids,
        "topk_logits": stored.float(),
        "teacher_lse": lse.float(),
        "neg_ids": neg,
        "neg_logits": _fp16(teacher.gather(-1, neg)).float(),
    }
    return hidden, weight, batch


def test_kd_loss_defaults_are_the_documented_ones() -> None:
    from lutq.kd import KDLossConfig

    c = KDLossConfig()
    assert (
        c.temperature,
        c.kd_weight,
        c.hard_top1_weight,
        c.label_ce_weight,
        c.full_kl_weight,
        c.sampled_ce_weight,
    ) == (2.0, 1.0, 0.2, 0.0, 0.0, 0.0)


LOSS_CASES = {
    "defaults": {},
    "all_terms_T1.5_softcap": dict(
        temperature=1.5,
        kd_weight=0.7,
        hard_top1_weight=0.3,
        label_ce_weight=0.25,
        full_kl_weight=0.4,
        sampled_ce_weight=0.15,
        softcap=6.0,
    ),
    "full_kl_only_no_negatives": dict(
        temperature=3.0, kd_weight=0.0, hard_top1_weight=0.0, full_kl_weight=1.0, use_negatives=False
    ),
    "T1_label_ce": dict(temperature=1.0, hard_top1_weight=0.0, label_ce_weight=1.0),
    # full-vocabulary weights that sum to exactly 0 (the chunked gradient is normalized by that sum)
    "full_vocab_weights_cancel": dict(hard_top1_weight=-0.5, label_ce_weight=0.25, full_kl_weight=0.25),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_kd_loss_against_naive_reference(case: str) -> None:
    from lutq.kd import KDLossConfig, kd_loss

    opts = dict(LOSS_CASES[case])
    softcap = opts.pop("softcap", None)
    cfg = KDLossConfig(**opts, ce_chunk_size=5)  # 14 positions: chunks of 5, 5, 4
    hidden, weight, batch = _synthetic_batch(seed=len(case))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = kd_loss(h, w, batch, cfg, logit_softcap=softcap)

    h64 = hidden.double().reshape(-1, hidden.shape[-1]).requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    terms = _ref_kd_terms(h64 @ w64.T, batch, cfg.temperature, cfg.use_negatives, softcap)
    ref = _ref_loss(terms, cfg)
    assert out.loss.item() == pytest.approx(ref.item(), rel=2e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(ref.item(), rel=2e-5, abs=1e-6)
    for key in ("kd", "kl", "ce", "label_ce", "top1_agree"):
        assert out.metrics[key] == pytest.approx(terms[key].mean().item(), rel=2e-5, abs=1e-6), key
    if cfg.full_kl_weight:
        assert out.metrics["full_kl"] == pytest.approx(terms["full_kl"].mean().item(), rel=2e-5, abs=1e-6)
    if cfg.sampled_ce_weight:
        assert out.metrics["sampled_ce"] == pytest.approx(terms["sampled_ce"].mean().item(), rel=2e-5, abs=1e-6)
    # the gradient (custom backward of the candidate gather, the chunked full-vocabulary terms, the tail bucket)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(gh.double().reshape(-1, hidden.shape[-1]), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


def test_kd_loss_metrics_in_evaluation_include_full_kl() -> None:
    """Without a gradient (evaluation) every metric is reported, full_kl whatever its weight (docs/kd.md)."""
    from lutq.kd import KDLossConfig, kd_loss

    hidden, weight, batch = _synthetic_batch(seed=11)
    cfg = KDLossConfig()
    with torch.no_grad():
        out = kd_loss(hidden, weight, batch, cfg)
    terms = _ref_kd_terms(hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T, batch, cfg.temperature)
    for key in ("kd", "kl", "ce", "label_ce", "top1_agree", "full_kl"):
        assert out.metrics[key] == pytest.approx(terms[key].mean().item(), rel=2e-5, abs=1e-6), key
    assert out.metrics["loss"] == pytest.approx(_ref_loss(terms, cfg).item(), rel=2e-5)
    # a random student: the tail-bucket KL (a KL over K + 1 outcomes) is strictly positive
    assert out.metrics["full_kl"] > 0


def test_tail_bucket_kl_of_the_teacher_with_itself_is_zero() -> None:
    """A student whose logits are the teacher's (at the stored FP16 values on the top-K) has full_kl ≈ 0 and
    top-1 agreement 1; kd / kl over the candidates are 0 too."""
    from lutq.kd import KDLossConfig, kd_loss

    _, _, batch = _synthetic_batch(seed=5, V=40)
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(2, 7, 40, generator=g, dtype=F64) * 2.5
    vals, ids = teacher.topk(6, dim=-1)
    teacher.scatter_(-1, ids, _fp16(vals))
    lse = teacher.logsumexp(-1)
    batch = {
        "input_ids": batch["input_ids"],
        "topk_ids": ids,
        "topk_logits": teacher.gather(-1, ids).float(),
        "teacher_lse": lse.float(),
    }
    # student logits = teacher logits exactly: hidden = one-hot rows, lm_head = the teacher's logits as columns
    N, V = 14, 40
    hidden = torch.eye(N, dtype=torch.float32).reshape(2, 7, N)
    weight = teacher.reshape(N, V).T.float().contiguous()  # [V, N]
    with torch.no_grad():
        out = kd_loss(hidden, weight, batch, KDLossConfig())
    assert abs(out.metrics["full_kl"]) < 1e-5 and abs(out.metrics["kl"]) < 1e-6 and abs(out.metrics["kd"]) < 1e-6
    assert out.metrics["top1_agree"] == 1.0


# ============================================================================ 3. evaluate_kd


def _student(kind: str) -> torch.nn.Module:
    if kind == "qwen3_q4a4_lut_lm_head":  # a LUT lm_head (quantize_lm_head): the head's weight is its W_eff
        from lutq.quant import get_preset, quantize

        model = tiny_model("qwen3", seed=7)
        quantize(model, get_preset("q4a4").replace(quantize_lm_head=True), progress=False)
        return model
    return tiny_model(kind, seed=7)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen3_q4a4_lut_lm_head"])
def test_evaluate_kd_against_naive_token_weighted_means(cache_dir: Path, kind: str) -> None:
    from lutq.kd import KDCache, KDLossConfig, evaluate_kd

    cache = KDCache(cache_dir)
    assert cache.num_sequences("val") == 3  # batches of 2 and 1: a mean of batch means would differ
    student = _student(kind)
    cfg = KDLossConfig(temperature=2.0, hard_top1_weight=0.3)
    got = evaluate_kd(student, cache, split="val", batch_size=2, cfg=cfg)

    batch = _read_all(cache_dir, "val")
    with torch.no_grad():
        z = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    terms = _ref_kd_terms(z.reshape(-1, z.shape[-1]), batch, cfg.temperature)
    assert got["tokens"] == 3 * (L_CACHE - 1) and got["sequences"] == 3
    for key in ("kd", "kl", "ce", "label_ce", "top1_agree", "full_kl"):
        assert got[key] == pytest.approx(terms[key].mean().item(), rel=1e-4, abs=1e-6), key
    assert got["loss"] == pytest.approx(_ref_loss(terms, cfg).item(), rel=1e-4)


def test_evaluate_kd_of_the_teacher_itself(cache_dir: Path) -> None:
    """The teacher as the student: top-1 agreement 1, the tail-bucket KL at the FP16 storage floor (docs/kd.md:
    4e-6 with teacher_lse; 0.0015 nats with a plain log-sum-exp)."""
    from lutq.kd import evaluate_kd
    from lutq.models import load_model

    teacher, _ = load_model(cache_dir.parent / "teacher")
    got = evaluate_kd(teacher, cache_dir, split="train", batch_size=4)
    assert got["top1_agree"] == 1.0
    assert abs(got["full_kl"]) < 2e-5 and got["kl"] < 1e-4


# ============================================================================ 4. perplexity (docs/evaluate.md)
PPL_DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Seven wizards quietly hex jolly bakers!",
    "A third, shorter one.",
]


def _ref_perplexity(model: torch.nn.Module, ids: list[int], L: int, s: int) -> tuple[float, int, int]:
    """Token by token: token j (j >= 1) is predicted by the window that scores it (windows start at 0, s, 2s, ...,
    at most L long, the last ends at the text's end; each scores the tokens after the previous one's end), from
    that window's tokens before j. Returns (Σ NLL, predictions, windows)."""
    N = len(ids)
    spans, begin = [], 0
    while True:
        end = min(begin + L, N)
        spans.append((begin, end))
        if end == N:
            break
        begin += s
    owner: dict[int, int] = {}
    prev_end = 1
    for begin, end in spans:
        for j in range(prev_end, end):
            assert j not in owner
            owner[j] = begin
        prev_end = end
    assert sorted(owner) == list(range(1, N))  # every token after the first exactly once
    total = 0.0
    for j in range(1, N):
        begin = owner[j]
        assert j - begin >= min(L - s, j)  # at least L - s tokens of context (except in the first window)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin:j]])).logits[0, -1].double()
        total += -(logits[ids[j]] - torch.logsumexp(logits, 0)).item()
    return total, N - 1, len(spans)


@pytest.mark.parametrize(
    ("L", "s", "batch_size", "max_tokens"), [(16, 5, 3, None), (12, 11, 1, None), (16, 8, 4, 41), (256, 128, 4, None)]
)
def test_perplexity_against_token_by_token_reference(L: int, s: int, batch_size: int, max_tokens: int | None):
    from lutq.evaluate.perplexity import perplexity

    model, tok = tiny_model("qwen3", seed=2), tiny_tokenizer()
    ids = tok("\n\n".join(PPL_DOCS))["input_ids"]  # documents joined with a blank line, tokenized once
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nll_sum, preds, wins = _ref_perplexity(model, ids, L, s)
    got = perplexity(
        model, tok, PPL_DOCS, max_length=L, stride=s, batch_size=batch_size, max_tokens=max_tokens, show_progress=False
    )
    assert got.text_tokens == len(ids) and got.tokens == preds and got.windows == wins
    assert got.nll_sum == pytest.approx(nll_sum, rel=1e-5)
    assert got.nll == pytest.approx(nll_sum / preds, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(nll_sum / preds), rel=1e-5)


# ============================================================================ 5. size / bits per weight


def _biased_tiny_qwen3() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3")
    cfg.attention_bias = True  # LUT layers with a bias: the [+ 16·out] term
    torch.manual_seed(4)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_bits_per_weight_against_a_hand_count(tmp_path: Path) -> None:
    """docs/quant.md: bits = N·b + 16·n + 16·r·(out + in + 1) [+ 16·out], b = 1, 2, 4, 8 for n = 2, 3–4, 5–16,
    17–256 (docs/formats.md); dense tensors at their dtype (32 bits), tied tensors once; model_size's whole-model
    bits per weight = all bits / (LUT weights + dense parameters)."""
    from safetensors import safe_open

    from lutq.evaluate.size import model_size
    from lutq.models import save_checkpoint
    from lutq.quant import quantize, snap_model

    model = _biased_tiny_qwen3()
    quantize(model, "q2a4", progress=False)
    c = model.config
    hd = c.head_dim
    shapes = {
        "q_proj": (c.num_attention_heads * hd, c.hidden_size),
        "k_proj": (c.num_key_value_heads * hd, c.hidden_size),
        "v_proj": (c.num_key_value_heads * hd, c.hidden_size),
        "o_proj": (c.hidden_size, c.num_attention_heads * hd),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }
    preset = {"mlp": (4, 32), "attn": (16, 8)}  # DESIGN.md: q2a4 = MLP LUT 4 / rank 32, attention LUT 16 / rank 8
    width = {4: 2, 16: 4}
    groups: dict[str, dict[str, int]] = {"mlp": {"w": 0, "bits": 0}, "attn": {"w": 0, "bits": 0}}
    disk_lut_bytes = 0
    assert model.model.layers[0].self_attn.o_proj.bias is not None  # Qwen3: a bias on q, k, v and o
    for _layer in range(c.num_hidden_layers):
        for name, (out, inp) in shapes.items():
            g = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "attn"
            n, r = preset[g]
            bias = 16 * out if g == "attn" else 0
            groups[g]["w"] += out * inp
            groups[g]["bits"] += out * inp * width[n] + 16 * n + 16 * r * (out + inp + 1) + bias
            disk_lut_bytes += math.ceil(out * inp * width[n] / 8) + 2 * (n + r * (out + inp + 1)) + bias // 8
    dense = c.vocab_size * c.hidden_size + c.hidden_size  # tied embedding / lm_head once, final norm
    dense += c.num_hidden_layers * (2 * c.hidden_size + 2 * hd)  # 2 RMSNorms, q_norm, k_norm
    lut_w = sum(v["w"] for v in groups.values())
    lut_bits = sum(v["bits"] for v in groups.values())

    size = model_size(model)
    for g, v in groups.items():
        assert size["groups"][g]["weights"] == v["w"]
        assert size["groups"][g]["bits_per_weight"] == pytest.approx(v["bits"] / v["w"], rel=1e-12), g
    assert size["lut"]["weights"] == lut_w
    assert size["lut"]["bits_per_weight"] == pytest.approx(lut_bits / lut_w, rel=1e-12)
    assert size["total"]["params"] == lut_w + dense
    assert size["total"]["bits_per_weight"] == pytest.approx((lut_bits + 32 * dense) / (lut_w + dense), rel=1e-12)
    assert size["total"]["size_mb"] == pytest.approx((math.ceil(lut_bits / 8) + 4 * dense) / 1e6, rel=1e-12)

    # a snapped checkpoint holds exactly that: packed indices, FP16 LUT / scales / biases, fp32 dense tensors
    snap_model(model)
    assert model_size(model)["report"]["disk_bytes"] == disk_lut_bytes + 4 * dense
    save_checkpoint(tmp_path / "ck", model, tiny_tokenizer())
    with safe_open(str(tmp_path / "ck/model.safetensors"), "pt") as f:
        on_disk = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert on_disk == disk_lut_bytes + 4 * dense


def test_quant_docs_qwen3_0_6b_size_table() -> None:
    """The Qwen3-0.6B q2a4 table in docs/quant.md, recomputed from the formula by hand and by size_report on a
    meta-device model."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lutq.quant import quantize
    from lutq.quant.storage import size_report

    cfg = Qwen3Config(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    quantize(model, "q2a4", init=False, progress=False)
    rep = size_report(model)
    mlp_w = 28 * 3 * 1024 * 3072
    mlp_bits = mlp_w * 2 + 28 * 3 * (16 * 4 + 16 * 32 * (1024 + 3072 + 1))
    attn = [(2048, 1024), (1024, 1024), (1024, 1024), (1024, 2048)]
    attn_w = 28 * sum(o * i for o, i in attn)
    attn_bits = attn_w * 4 + 28 * sum(16 * 16 + 16 * 8 * (o + i + 1) for o, i in attn)
    assert rep["groups"]["mlp"]["weights"] == mlp_w and rep["groups"]["attn"]["weights"] == attn_w
    assert rep["groups"]["mlp"]["bits"] == mlp_bits and rep["groups"]["attn"]["bits"] == attn_bits
    # the documented figures (rounded as printed)
    assert round(mlp_w / 1e6, 1) == 264.2 and round(mlp_bits / mlp_w, 3) == 2.667 and round(mlp_bits / 8e6, 1) == 88.1
    assert round(attn_w / 1e6, 1) == 176.2 and round(attn_bits / attn_w, 3) == 4.209
    assert round(attn_bits / 8e6, 1) == 92.7
    lut_bits = mlp_bits + attn_bits
    assert round((mlp_w + attn_w) / 1e6, 1) == 440.4 and round(lut_bits / (mlp_w + attn_w), 3) == 3.284
    dense = 151936 * 1024 + 1024 + 28 * (2 * 1024 + 2 * 128)
    assert rep["other_params"] == dense and round(dense / 1e6, 1) == 155.6 and round(4 * dense / 1e6, 1) == 622.6
    assert round((math.ceil(lut_bits / 8) + 4 * dense) / 1e6) == 803


# ============================================================================ 6. the LUT layer and the snap


def _random_layer(seed: int, *, bias: bool = True, lut_size: int = 16, rank: int = 4, out: int = 24, inp: int = 40):
    from lutq.quant import LUTLinear

    g = torch.Generator().manual_seed(seed)
    layer = LUTLinear(inp, out, lut_size, rank, bias=bias)
    with torch.no_grad():
        # A, B with norms far from 1 (the normalization must matter) and g of both signs
        layer.scale_A.copy_(torch.randn(out, rank, generator=g) * 3.7)
        layer.scale_B.copy_(torch.randn(rank, inp, generator=g) * 0.2)
        layer.scale_g.copy_(torch.randn(rank, generator=g) * 0.05)
        layer.idx.copy_(torch.randint(0, lut_size, (out, inp), generator=g).to(torch.uint8))
        if bias:
            layer.bias.copy_(torch.randn(out, generator=g) * 0.1)
    x = torch.randn(3, 5, inp, generator=g)
    return layer, x


def _ref_weight(layer, *, snapped: bool = False) -> torch.Tensor:
    """W_eff = lut[idx] ⊙ (Â diag(g) B̂), Â / B̂ = unit-norm columns / rows (snapped: the baked scales as they are),
    element by element in float64."""
    A, B, g = (p.detach().double() for p in (layer.scale_A, layer.scale_B, layer.scale_g))
    lut, idx = layer.lut.double(), layer.idx.long()
    out, inp, r = A.shape[0], B.shape[1], A.shape[1]
    a_norm = [1.0 if snapped else math.sqrt(sum(A[o, k].item() ** 2 for o in range(out))) for k in range(r)]
    b_norm = [1.0 if snapped else math.sqrt(sum(B[k, i].item() ** 2 for i in range(inp))) for k in range(r)]
    W = torch.empty(out, inp, dtype=F64)
    for o in range(out):
        for i in range(inp):
            s = sum(A[o, k].item() / a_norm[k] * g[k].item() * B[k, i].item() / b_norm[k] for k in range(r))
            W[o, i] = lut[idx[o, i]].item() * s
    return W


def _ref_factored(layer, x: torch.Tensor, *, snapped: bool = False) -> torch.Tensor:
    """y = Σ_k g_k Â_k ⊙ (Q (B̂_k ⊙ x)) + bias, term by term in float64."""
    A, B, g = (p.detach().double() for p in (layer.scale_A, layer.scale_B, layer.scale_g))
    if not snapped:
        A, B = A / A.norm(dim=0), B / B.norm(dim=1, keepdim=True)
    Q = layer.lut.double()[layer.idx.long()]
    x = x.double()
    y = sum(g[k] * A[:, k] * ((B[k] * x) @ Q.T) for k in range(A.shape[1]))
    return y if layer.bias is None else y + layer.bias.detach().double()


def test_materialized_and_factored_forward_equal_the_definition() -> None:
    layer, x = _random_layer(0)
    W = _ref_weight(layer)
    y_ref = x.double() @ W.T + layer.bias.detach().double()
    torch.testing.assert_close(layer.effective_weight().double(), W, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_ref_factored(layer, x), y_ref, rtol=1e-10, atol=1e-12)  # the two definitions agree
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.factored_forward(x).double(), y_ref, rtol=1e-5, atol=1e-6)
        layer.factored = True
        torch.testing.assert_close(layer(x).double(), y_ref, rtol=1e-5, atol=1e-6)


def test_ste_fp16_forward_rounds_ag_b_and_weff() -> None:
    """DESIGN.md: STE-FP16 rounds Â·g, B̂ and W_eff to FP16 in the forward (straight-through gradient)."""
    layer, _ = _random_layer(1, bias=False)
    A, B, g = (p.detach().double() for p in (layer.scale_A, layer.scale_B, layer.scale_g))
    a16 = _fp16(A / A.norm(dim=0) * g)
    b16 = _fp16(B / B.norm(dim=1, keepdim=True))
    W_ref = _fp16(layer.lut.double()[layer.idx.long()] * (a16 @ b16))
    layer.ste_fp16 = True
    W = layer.effective_weight()
    _assert_fp16_rounding_of(W, W_ref, "STE-FP16 W_eff")
    (W * W_ref.float()).sum().backward()  # straight-through: the gradient flows as if nothing were rounded
    ste_grads = [p.grad.clone() for p in (layer.scale_A, layer.scale_B, layer.scale_g)]
    layer.ste_fp16 = False
    for p in (layer.scale_A, layer.scale_B, layer.scale_g):
        p.grad = None
    (layer.effective_weight() * W_ref.float()).sum().backward()
    for ours, plain in zip(ste_grads, (p.grad for p in (layer.scale_A, layer.scale_B, layer.scale_g)), strict=True):
        torch.testing.assert_close(ours, plain, rtol=2e-2, atol=1e-4)  # the same up to FP16-rounded operands


def test_set_trainable_ab_freezes_g_at_its_fp16_value() -> None:
    layer, _ = _random_layer(2)
    g64 = layer.scale_g.detach().double().clone()
    layer.set_trainable("ab")
    assert torch.equal(layer.scale_g.detach().double(), _fp16(g64))
    assert not layer.scale_g.requires_grad and layer.scale_A.requires_grad and layer.scale_B.requires_grad


def test_snap_layer_against_reference() -> None:
    """docs/quant.md "Snap": LUT, Â·g, B̂, bias rounded to FP16; idx = nearest(W_target / S₁₆) with W_target the
    pre-snap W_eff and S₁₆ = (Â·g)₁₆ · B̂₁₆ (ties to the lower entry); g = 1; the snapped forward uses them as is."""
    from lutq.quant.snap import snap_layer_

    layer, x = _random_layer(3, rank=3)
    A, B, g = (p.detach().double().clone() for p in (layer.scale_A, layer.scale_B, layer.scale_g))
    target = _ref_weight(layer)
    bias64 = layer.bias.detach().double().clone()
    lut = layer.lut.double().clone()
    a_ref = A / A.norm(dim=0) * g
    b_ref = B / B.norm(dim=1, keepdim=True)
    stats = snap_layer_(layer)

    assert layer.snapped and torch.equal(layer.scale_g.detach(), torch.ones(3))
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.lut.double(), lut)  # already FP16-exact: unchanged
    _assert_fp16_rounding_of(layer.scale_A, a_ref, "scale_A = (Â·g)₁₆")
    _assert_fp16_rounding_of(layer.scale_B, b_ref, "scale_B = B̂₁₆")
    assert torch.equal(layer.bias.detach().double(), _fp16(bias64))
    # idx: the nearest LUT entry of W_target / S₁₆, against the FP16 scales the layer now holds
    s16 = layer.scale_A.detach().double() @ layer.scale_B.detach().double()
    u = target / s16
    dist = (u[..., None] - lut).abs()  # [out, in, n]
    best = dist.min(-1).values
    got = dist.gather(-1, layer.idx.long()[..., None])[..., 0]
    assert bool((got <= best + 1e-6 * (1 + best)).all())  # optimal up to float32 noise
    assert (layer.idx.long() == dist.argmin(-1)).double().mean() >= 0.995
    assert stats["numel"] == 24 * 40 and stats["idx_changed"] > 0
    # the snapped layer's forward: W_eff = lut[idx] ⊙ (scale_A @ scale_B) + bias, no normalization
    y_ref = x.double() @ _ref_weight(layer, snapped=True).T + layer.bias.detach().double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.factored_forward(x).double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_ref_factored(layer, x, snapped=True), y_ref, rtol=1e-10, atol=1e-12)
    # snapping again changes no bit
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    snap_layer_(layer)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_snap_model_report_is_the_probe_logit_error() -> None:
    from lutq.quant import quantize, snap_model

    model = tiny_model("llama", seed=3)
    quantize(model, "q4a4", progress=False)
    probe = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(probe).logits.double()
        report = snap_model(model, probe)
        after = model(probe).logits.double()
    assert report.max_abs_error == pytest.approx((after - before).abs().max().item(), rel=1e-6)
    assert report.rel_error == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-5)
    assert report.max_abs_error > 0 and report.probe_shape == (2, 12)


def _ref_nearest(u: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """argmin_j |u − lut_j| per element, ties to the lower entry (first minimum of a sorted LUT)."""
    return (u.double()[..., None] - lut.double()).abs().argmin(-1)


def test_init_scale_map_is_the_rank_r_svd_of_the_group_max_map() -> None:
    """docs/quant.md "Initialization": S = the rank-r SVD approximation of the group-max-|W| map M (groups of 32
    inputs) broadcast over the groups; idx = nearest(W / S); the reported error is ‖W_eff − W‖ / ‖W‖."""
    from lutq.quant import LUTLinear
    from lutq.quant.init import init_from_weight_

    out, inp, r = 20, 256, 3
    W = torch.randn(out, inp, generator=torch.Generator().manual_seed(6)) * torch.linspace(0.2, 2.0, out)[:, None]
    layer = LUTLinear(inp, out, 16, r)
    err = init_from_weight_(layer, W)
    M = torch.empty(out, inp // 32, dtype=F64)
    for o in range(out):
        for grp in range(inp // 32):
            M[o, grp] = max(abs(W[o, i].item()) for i in range(32 * grp, 32 * grp + 32))
    U, sig, Vh = torch.linalg.svd(M)
    assert sig[r - 1] > 0.01 * sig[0]  # the g floor is not active here
    Mr = U[:, :r] @ torch.diag(sig[:r]) @ Vh[:r]
    S_ref = Mr.repeat_interleave(32, dim=1)
    torch.testing.assert_close(layer.scale_map().double(), S_ref, rtol=1e-5, atol=1e-6)
    u = W.double() / S_ref
    dist = (u[..., None] - layer.lut.double()).abs()
    got = dist.gather(-1, layer.idx.long()[..., None])[..., 0]
    assert bool((got <= dist.min(-1).values + 1e-5).all())
    assert (layer.idx.long() == _ref_nearest(u, layer.lut)).double().mean() >= 0.995
    W_eff = layer.lut.double()[layer.idx.long()] * layer.scale_map().double()
    assert err == pytest.approx(((W_eff - W.double()).norm() / W.double().norm()).item(), rel=1e-5)


def test_latent_forward_and_straight_through_gradient() -> None:
    """docs/quant.md latent mode: idx = nearest(u) every forward, W_q = lut[idx] ⊙ S, dL/du = dL/dW_q ⊙ S, and the
    scales get no gradient."""
    from lutq.quant import LUTLinear

    layer, x = _random_layer(8, bias=False)
    latent = LUTLinear(layer.in_features, layer.out_features, 16, layer.rank, mode="latent")
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name in ("scale_A", "scale_B", "scale_g"):
            getattr(latent, name).copy_(getattr(layer, name))
        latent.latent.copy_(torch.randn(latent.latent.shape, generator=g) * 0.7)
    S = _ref_weight(layer) / layer.lut.double()[layer.idx.long()]  # the scale map, element by element
    idx = _ref_nearest(latent.latent.detach(), latent.lut)
    W_ref = latent.lut.double()[idx] * S
    up = torch.randn((*x.shape[:-1], latent.out_features), generator=g)
    (latent(x) * up).sum().backward()
    assert torch.equal(latent.idx.long(), idx)
    torch.testing.assert_close(latent.effective_weight().detach().double(), W_ref, rtol=1e-5, atol=1e-7)
    dW = torch.einsum("...o,...i->oi", up.double(), x.double())  # dL/dW_q of y = x W_qᵀ
    torch.testing.assert_close(latent.latent.grad.double(), dW * S, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in (latent.scale_A, latent.scale_B, latent.scale_g))


def test_perplexity_of_documents_renders_chats_and_joins_with_a_blank_line() -> None:
    """docs/evaluate.md: chat documents are rendered with the tokenizer's chat template first, then every document
    is joined with "\\n\\n" and tokenized once."""
    from lutq.assets.corpora import Document
    from lutq.evaluate.perplexity import perplexity

    model, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    chat = [{"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": "Hello."}]
    docs = [Document("a", text=PPL_DOCS[0]), Document("b", messages=chat), Document("c", text=PPL_DOCS[2])]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered.startswith("<|im_start|>user\nHi there?<|im_end|>")
    ids = tok("\n\n".join([PPL_DOCS[0], rendered, PPL_DOCS[2]]))["input_ids"]
    nll_sum, preds, wins = _ref_perplexity(model, ids, 32, 12)
    got = perplexity(model, tok, docs, max_length=32, stride=12, batch_size=2, show_progress=False)
    assert (got.text_tokens, got.tokens, got.windows) == (len(ids), preds, wins)
    assert got.nll_sum == pytest.approx(nll_sum, rel=1e-5)
