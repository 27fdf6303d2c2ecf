"""The KD loss: equal to a full-softmax reference, chunking changes nothing, negatives, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lutq.core import LutqError
from lutq.kd import KDCache, KDLossConfig, evaluate_kd, kd_loss, student_hidden
from lutq.kd.loss import candidate_logits, chunked_ce
from lutq.testing import tiny_model

B, S, H, V = 2, 5, 16, 40


def _setup(seed=0, K=V, R=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g) * 0.5
    teacher = torch.randn(B, S, V, generator=g) * 3
    vals, ids = teacher.topk(K, dim=-1)
    batch = {"topk_ids": ids, "topk_logits": vals}
    if R:
        neg = torch.randint(0, V, (B, S, R), generator=g)
        batch |= {"neg_ids": neg, "neg_logits": teacher.gather(-1, neg)}
    return hidden, weight, teacher, batch


def _ref_kl(teacher_logits, student_logits, T):
    log_p, log_q = F.log_softmax(teacher_logits / T, -1), F.log_softmax(student_logits / T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def test_equals_full_softmax_reference_when_k_is_vocab():
    hidden, weight, teacher, batch = _setup()
    cfg = KDLossConfig(temperature=2.0, hard_top1_weight=0.3, ce_chunk_size=3)
    out = kd_loss(hidden, weight, batch, cfg)
    student = hidden @ weight.T
    kl_T = _ref_kl(teacher, student, 2.0)
    ce = F.cross_entropy(student.reshape(-1, V), teacher.argmax(-1).reshape(-1))
    ref = 4.0 * kl_T + 0.3 * ce
    torch.testing.assert_close(out.loss, ref)
    assert out.metrics["kd"] == pytest.approx(4.0 * kl_T.item(), rel=1e-5)
    assert out.metrics["kl"] == pytest.approx(_ref_kl(teacher, student, 1.0).item(), rel=1e-5)
    assert out.metrics["ce"] == pytest.approx(ce.item(), rel=1e-5)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    assert out.metrics["top1_agree"] == pytest.approx(agree)
    assert out.metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)
    # gradients too (custom backward of the candidate gather and of the chunked CE)
    (g_out,) = torch.autograd.grad(out.loss, hidden)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g_out, g_ref)


def test_candidate_logits_gradients_match_plain_gather():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (7, 6), generator=g)
    up = torch.randn(7, 6, generator=g)
    ours = candidate_logits(h, w, ids, chunk=2)
    ref = (w[ids] * h[:, None]).sum(-1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(
        torch.autograd.grad((ours * up).sum(), (h, w)), torch.autograd.grad((ref * up).sum(), (h, w))
    )


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_ce_equals_unchunked(softcap):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(23, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (23, 2), generator=g)
    y[:4, 1] = y[:4, 0]  # both targets on the same token: their gradients add up
    logits = h @ w.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    refs = [F.cross_entropy(logits, y[:, k], reduction="sum") for k in range(2)]
    for coeffs in ((0.3, 0.7), (0.0, 0.7), (0.5, -0.5)):  # incl. a zero weight and weights summing to zero
        ref = coeffs[0] * refs[0] + coeffs[1] * refs[1]
        ref_grads = torch.autograd.grad(ref * 0.5, (h, w), retain_graph=True)
        for chunk in (1, 5, 23, 1000):
            loss, ce_rows, agree_rows, _ = chunked_ce(h, w, y, coeffs, chunk, softcap)
            # the zero-sum pair cancels two sums of ~100: compare at the sums' own precision
            torch.testing.assert_close(loss, ref, rtol=1.3e-6, atol=1e-6 * float(sum(r.detach() for r in refs)))
            torch.testing.assert_close(ce_rows.sum(0), torch.stack(refs).detach())
            for k in range(2):  # per position, not only in sum
                torch.testing.assert_close(ce_rows[:, k], F.cross_entropy(logits, y[:, k], reduction="none").detach())
                assert agree_rows[:, k].tolist() == (logits.argmax(-1) == y[:, k]).tolist()
            torch.testing.assert_close(torch.autograd.grad(loss * 0.5, (h, w)), ref_grads)
    with pytest.raises(ValueError, match="coefficients"):
        chunked_ce(h, w, y, (1.0,))


def _ref_tail_bucket_kl(teacher_logits, student_logits, ids):
    """Per-row KL over `ids` + one bucket for the rest, from full-vocabulary log-softmaxes (float64)."""
    log_p, log_q = F.log_softmax(teacher_logits.double(), -1), F.log_softmax(student_logits.double(), -1)
    lp, lq = log_p.gather(-1, ids), log_q.gather(-1, ids)
    p_rest, q_rest = 1 - lp.exp().sum(-1), 1 - lq.exp().sum(-1)
    return (lp.exp() * (lp - lq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_tail_bucket_kl_equals_full_softmax_reference(softcap):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(13, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    teacher = torch.randn(13, V, generator=g) * 3
    vals, ids = teacher.topk(7, dim=-1)
    logp = vals - teacher.logsumexp(-1, keepdim=True)
    y = teacher.argmax(-1, keepdim=True)
    logits = h @ w.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    kl = _ref_tail_bucket_kl(teacher, logits, ids).sum()
    ce = F.cross_entropy(logits.double(), y[:, 0], reduction="sum")
    for c_ce, c_kl in ((0.0, 1.0), (0.3, 0.5), (0.2, 0.0)):
        ref = (c_ce * ce + c_kl * kl).float()
        ref_grads = torch.autograd.grad(ref, (h, w), retain_graph=True)
        for chunk in (1, 4, 1000):
            loss, ce_rows, _, kl_rows = chunked_ce(h, w, y, (c_ce,), chunk, softcap, soft=(ids, logp, c_kl))
            torch.testing.assert_close(kl_rows, _ref_tail_bucket_kl(teacher, logits, ids).float().detach())
            torch.testing.assert_close(kl_rows.sum(), kl.float().detach())
            torch.testing.assert_close(ce_rows.sum(), ce.float().detach())
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(torch.autograd.grad(loss, (h, w)), ref_grads, rtol=1e-4, atol=1e-5)


def test_full_kl_term_in_kd_loss_and_its_cache_requirement():
    hidden, weight, teacher, batch = _setup(K=6)
    cfg = KDLossConfig(hard_top1_weight=0.0, full_kl_weight=0.5)
    with pytest.raises(LutqError, match="teacher_lse"):
        kd_loss(hidden, weight, batch, cfg)
    base = kd_loss(hidden, weight, batch, KDLossConfig(hard_top1_weight=0.0))
    assert "full_kl" not in base.metrics
    batch["teacher_lse"] = teacher.logsumexp(-1)
    out = kd_loss(hidden, weight, batch, cfg)
    ref_kl = _ref_tail_bucket_kl(teacher, hidden @ weight.T, batch["topk_ids"]).mean().float()
    assert out.metrics["full_kl"] == pytest.approx(ref_kl.item(), rel=1e-5)
    ref = base.loss + 0.5 * ref_kl
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, hidden), torch.autograd.grad(ref, hidden), rtol=1e-4, atol=1e-6
    )
    # unweighted, it is an evaluation metric: measured without gradients, skipped in a training step
    assert "full_kl" not in kd_loss(hidden, weight, batch, KDLossConfig()).metrics
    with torch.no_grad():
        assert kd_loss(hidden, weight, batch, KDLossConfig()).metrics["full_kl"] == pytest.approx(
            ref_kl.item(), rel=1e-5
        )
    # the candidates' KL can be weighted down to nothing: the tail-bucket KL alone trains
    alone = kd_loss(hidden, weight, batch, cfg.replace(kd_weight=0.0))
    torch.testing.assert_close(alone.loss, 0.5 * ref_kl)
    assert alone.metrics["kd"] == pytest.approx(out.metrics["kd"])  # the metric stays the unweighted KL
    # a teacher that is its own student has no KL left, bucket included
    same = kd_loss(teacher.clone().requires_grad_(), torch.eye(V), batch, cfg)
    assert same.metrics["full_kl"] == pytest.approx(0.0, abs=1e-5)


def test_label_ce_term_is_the_cross_entropy_on_the_texts_next_token():
    hidden, weight, teacher, batch = _setup(K=6)
    ids = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(3))
    student = hidden @ weight.T
    label_ce = F.cross_entropy(student.reshape(-1, V), ids[:, 1:].reshape(-1))
    top1_ce = F.cross_entropy(student.reshape(-1, V), teacher.argmax(-1).reshape(-1))
    base = kd_loss(hidden, weight, batch, KDLossConfig(hard_top1_weight=0.0))
    assert "label_ce" not in base.metrics  # no input_ids in the batch: no labels
    with pytest.raises(LutqError, match="input_ids"):
        kd_loss(hidden, weight, batch, KDLossConfig(label_ce_weight=0.2))
    batch["input_ids"] = ids
    cfg = KDLossConfig(hard_top1_weight=0.1, label_ce_weight=0.2)
    out = kd_loss(hidden, weight, batch, cfg)
    ref = base.loss + 0.1 * top1_ce + 0.2 * label_ce
    torch.testing.assert_close(out.loss, ref)
    assert out.metrics["label_ce"] == pytest.approx(label_ce.item(), rel=1e-5)
    assert out.metrics["ce"] == pytest.approx(top1_ce.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.loss, hidden), torch.autograd.grad(ref, hidden))


def test_chunk_size_does_not_change_kd_loss():
    hidden, weight, _, batch = _setup(K=6, R=3)
    a = kd_loss(hidden, weight, batch, KDLossConfig(ce_chunk_size=1, sampled_ce_weight=0.1))
    b = kd_loss(hidden, weight, batch, KDLossConfig(ce_chunk_size=4096, sampled_ce_weight=0.1))
    torch.testing.assert_close(a.loss, b.loss)
    assert a.metrics == pytest.approx(b.metrics)


def test_negatives_join_the_candidate_set():
    hidden, weight, teacher, batch = _setup(K=5, R=4)
    student = (hidden @ weight.T).detach()
    cand = torch.cat([batch["topk_ids"], batch["neg_ids"]], -1)
    cfg = KDLossConfig(hard_top1_weight=0.0)
    with_neg = kd_loss(hidden, weight, batch, cfg)
    without = kd_loss(hidden, weight, batch, cfg.replace(use_negatives=False))
    topk_only = {k: v for k, v in batch.items() if not k.startswith("neg")}
    assert without.metrics == pytest.approx(kd_loss(hidden, weight, topk_only, cfg).metrics)
    ref_with = 4.0 * _ref_kl(teacher.gather(-1, cand), student.gather(-1, cand), 2.0)
    ref_without = 4.0 * _ref_kl(batch["topk_logits"], student.gather(-1, batch["topk_ids"]), 2.0)
    torch.testing.assert_close(with_neg.loss.detach(), ref_with)
    torch.testing.assert_close(without.loss.detach(), ref_without)
    assert abs(with_neg.metrics["kd"] - without.metrics["kd"]) > 1e-3


def test_sampled_ce_over_the_candidates():
    hidden, weight, _, batch = _setup(K=5, R=4)
    cand = torch.cat([batch["topk_ids"], batch["neg_ids"]], -1)
    s = (hidden @ weight.T).gather(-1, cand)
    ref = -F.log_softmax(s, -1)[..., 0].mean()
    base = kd_loss(hidden, weight, batch, KDLossConfig(hard_top1_weight=0.0))
    out = kd_loss(hidden, weight, batch, KDLossConfig(hard_top1_weight=0.0, sampled_ce_weight=0.5))
    assert out.metrics["sampled_ce"] == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(out.loss, base.loss + 0.5 * ref)


def test_sequence_sums_equal_each_sequence_scored_alone():
    hidden, weight, teacher, batch = _setup(K=6, R=3)
    batch["teacher_lse"] = teacher.logsumexp(-1)
    batch["input_ids"] = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(5))
    cfg = KDLossConfig(hard_top1_weight=0.1, label_ce_weight=0.2, full_kl_weight=0.3, sampled_ce_weight=0.4)
    out = kd_loss(hidden, weight, batch, cfg, sequence_sums=True)
    assert kd_loss(hidden, weight, batch, cfg).sequence_sums is None  # only when asked
    sums = out.sequence_sums
    assert set(sums) == set(out.metrics) >= {"kd", "kl", "ce", "top1_agree", "label_ce", "full_kl", "sampled_ce"}
    for j in range(B):
        alone = kd_loss(hidden[j : j + 1], weight, {k: v[j : j + 1] for k, v in batch.items()}, cfg).metrics
        assert {k: float(v[j]) for k, v in sums.items()} == pytest.approx({k: v * S for k, v in alone.items()})
    # and the batch means are the sums over every position
    assert out.metrics == pytest.approx({k: float(v.sum()) / (B * S) for k, v in sums.items()})
    assert out.metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-6)


def test_no_grad_for_a_zero_ce_weight_and_bf16_autocast():
    hidden, weight, _, batch = _setup(K=8)
    out = kd_loss(hidden, weight, batch, KDLossConfig(hard_top1_weight=0.0))
    assert out.metrics["ce"] > 0 and out.loss.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = kd_loss(hidden, weight, batch, KDLossConfig())
    high = kd_loss(hidden, weight, batch, KDLossConfig())
    assert low.metrics["loss"] == pytest.approx(high.metrics["loss"], rel=0.05)
    low.loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_student_hidden_gives_the_models_logits(tiny):
    x = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        h = student_hidden(tiny, x)
        logits = tiny(input_ids=x).logits[:, :-1]
    assert h.shape == (2, 11, 64)
    head = h @ tiny.get_output_embeddings().weight.T
    cap = getattr(tiny.config, "final_logit_softcapping", None)
    torch.testing.assert_close(cap * torch.tanh(head / cap) if cap else head, logits, rtol=1e-4, atol=1e-4)


def test_evaluate_kd_on_the_cache(kd_cache, kd_teacher):
    teacher, _ = kd_teacher
    cache = KDCache(kd_cache)
    same = evaluate_kd(teacher, cache, split="train", batch_size=4)
    assert same["tokens"] == 19 * 31 and same["sequences"] == 19
    assert same["top1_agree"] == 1.0 and same["kl"] < 1e-4 and abs(same["kd"]) < 1e-4
    other = tiny_model("qwen3", seed=1)
    other.train()
    res = evaluate_kd(other, kd_cache, batch_size=8)
    assert other.training  # mode restored
    assert res["sequences"] == 1 and res["kd"] > 0.01 and res["top1_agree"] < 1.0
    capped = evaluate_kd(other, cache, split="train", batch_size=4, max_batches=2)
    assert capped["sequences"] == 8
