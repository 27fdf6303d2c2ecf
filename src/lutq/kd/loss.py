"""The KD loss against a cached teacher, and KD evaluation.

    loss = w_kd · T² · KL(p_T ‖ q_T)  over the candidates C = top-K (+ cached negatives)
         + w_top1 · CE(student over the full vocabulary, teacher top-1)
         + w_label · CE(student over the full vocabulary, the text's own next token)
         + w_full · KL_1(teacher ‖ student over the full vocabulary, the ids outside top-K as one bucket)
         + w_sampled · CE(student over C, teacher top-1)

p_T = softmax(teacher logits / T) and q_T = softmax(student logits / T), both over C only. Student
logits for C are dot products with gathered lm_head rows, never the full vocabulary, and the gathered
rows are recomputed in backward instead of being kept (memory O(N·|C|), not O(N·|C|·H)). The full-
vocabulary terms share one pass over the logits, computed in chunks of positions with their gradient formed
chunk by chunk in the forward pass, so memory is bounded by `ce_chunk_size × vocab` whatever the batch and
the second target costs nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lutq.core import ConfigBase, LutqError
from lutq.core.digest import spaced_indices
from lutq.models.runtime import decoder_body


@dataclass
class KDLossConfig(ConfigBase):
    """Weights of the KD loss terms (see the module doc)."""

    temperature: float = 2.0
    kd_weight: float = 1.0  # weight of the T²·KL over the candidates (the `kd` metric is always unweighted)
    hard_top1_weight: float = 0.2
    label_ce_weight: float = 0.0  # CE on the cached text's next token (its `input_ids`), full vocabulary
    full_kl_weight: float = 0.0  # tail-bucket KL at T=1 over the full vocabulary (needs the cache's teacher_lse)
    sampled_ce_weight: float = 0.0
    ce_chunk_size: int = 1024  # positions per chunk for the full-vocab CE and the candidate gather
    use_negatives: bool = True


@dataclass
class KDLossOutput:
    """`loss` to backprop; `metrics` (floats): loss, kd (T²·KL_T), kl (KL at T=1 over the candidates), ce
    (full-vocab CE on the teacher's top-1), top1_agree (student full-vocab argmax == teacher top-1),
    label_ce (full-vocab CE on the text's next token, when the batch has input_ids), full_kl (the tail-bucket
    KL at T=1 over the full vocabulary, when the batch has teacher_lse and the term is weighted or no gradient
    is taken, i.e. in evaluation) and sampled_ce when its weight is set."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    sequence_sums: dict[str, torch.Tensor] | None = None  # metric -> [B] sums over each sequence's positions


def student_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm) of positions 0..L-2, [B, L-1, H]; Qwen3, Llama, Gemma 3."""
    return decoder_body(model)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output head's weight [V, H]: `lm_head.weight`, or W_eff of a LUT lm_head (`quantize_lm_head`)."""
    head = model.get_output_embeddings()
    return head.effective_weight() if getattr(head, "lutq_quantized", False) else head.weight


class KDStudent(torch.nn.Module):
    """The student plus the KD loss, as one module so that DDP wraps the whole step (forward + loss)."""

    def __init__(self, model: torch.nn.Module, loss_cfg: KDLossConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = student_hidden(self.model, batch["input_ids"])
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        out = kd_loss(hidden, head_weight(self.model), batch, self.loss_cfg, logit_softcap=softcap)
        return out.loss, out.metrics


def kd_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    batch: dict[str, torch.Tensor],
    cfg: KDLossConfig | None = None,
    logit_softcap: float | None = None,
    sequence_sums: bool = False,
) -> KDLossOutput:
    """KD loss for `hidden` [B, L-1, H] against a cache batch (see the module doc); with `sequence_sums`, also
    each metric summed over each sequence's positions (`KDLossOutput.sequence_sums`, for per-document intervals)."""
    cfg = cfg or KDLossConfig()
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    cand_ids, t = batch["topk_ids"], batch["topk_logits"]
    if cfg.use_negatives and "neg_ids" in batch:
        cand_ids = torch.cat([cand_ids, batch["neg_ids"]], dim=-1)
        t = torch.cat([t, batch["neg_logits"]], dim=-1)
    C = cand_ids.shape[-1]
    cand_ids = cand_ids.reshape(-1, C).to(h.device)
    t = t.reshape(-1, C).to(h.device, torch.float32)
    target = cand_ids[:, 0]  # the teacher's top-1

    s = candidate_logits(h, lm_head_weight, cand_ids, cfg.ce_chunk_size)
    if logit_softcap:
        s = logit_softcap * torch.tanh(s / logit_softcap)
    T = cfg.temperature
    log_p = F.log_softmax(t / T, dim=-1)
    kd_rows = T * T * (log_p.exp() * (log_p - F.log_softmax(s / T, dim=-1))).sum(-1)
    loss = cfg.kd_weight * kd_rows.mean()
    rows: dict[str, torch.Tensor] = {"kd": kd_rows}  # every metric per position [N], summed or averaged below

    with torch.no_grad():
        log_p1 = F.log_softmax(t, dim=-1)
        rows["kl"] = (log_p1.exp() * (log_p1 - F.log_softmax(s.detach(), dim=-1))).sum(-1)
    targets, coeffs = [target], [cfg.hard_top1_weight]
    if "input_ids" in batch:  # the text's own next tokens, aligned with the student's positions 0..L-2
        targets.append(batch["input_ids"][:, 1:].reshape(-1).to(h.device))
        coeffs.append(cfg.label_ce_weight)
    elif cfg.label_ce_weight:
        raise LutqError("kd_loss: label_ce_weight > 0 needs the batch's input_ids (a KD cache batch)")
    soft = None
    # the teacher's true log-probabilities on its top-K; as a metric only, measured in evaluation (no grad)
    if "teacher_lse" in batch and (cfg.full_kl_weight or not torch.is_grad_enabled()):
        K = batch["topk_ids"].shape[-1]
        topk_ids = batch["topk_ids"].reshape(-1, K).to(h.device)
        logp = batch["topk_logits"].reshape(-1, K).to(h.device, torch.float32) - batch["teacher_lse"].reshape(-1, 1).to(
            h.device, torch.float32
        )
        soft = (topk_ids, logp, cfg.full_kl_weight)
    elif cfg.full_kl_weight:
        raise LutqError(
            "kd_loss: full_kl_weight > 0 needs the teacher's log-sum-exp (teacher_lse), which this "
            "KD cache lacks: it was built before lutq stored it; rebuild it with `lutq cache`"
        )
    weighted = any(coeffs) or bool(cfg.full_kl_weight)  # a full-vocabulary term is part of the loss
    use_grad = weighted and torch.is_grad_enabled()
    full, ce_rows, agree_rows, kl_rows = chunked_ce(
        h if use_grad else h.detach(),
        lm_head_weight if use_grad else lm_head_weight.detach(),
        torch.stack(targets, dim=1),
        tuple(coeffs),
        cfg.ce_chunk_size,
        logit_softcap,
        soft,
    )
    n = len(target)
    if weighted:
        loss = loss + full / n
    rows["ce"], rows["top1_agree"] = ce_rows[:, 0], agree_rows[:, 0].float()
    if len(targets) > 1:
        rows["label_ce"] = ce_rows[:, 1]
    if soft is not None:
        rows["full_kl"] = kl_rows
    if cfg.sampled_ce_weight:
        sampled_rows = -F.log_softmax(s, dim=-1)[:, 0]
        loss = loss + cfg.sampled_ce_weight * sampled_rows.mean()
        rows["sampled_ce"] = sampled_rows
    with torch.no_grad():  # the loss position by position: the same weighted sum (Python floats: no host copy)
        per_position = cfg.kd_weight * kd_rows.detach() + cfg.full_kl_weight * kl_rows
        for k, c in enumerate(coeffs):
            if c:
                per_position = per_position + c * ce_rows[:, k]
        if cfg.sampled_ce_weight:
            per_position = per_position + cfg.sampled_ce_weight * rows["sampled_ce"].detach()
        rows["loss"] = per_position
        table = torch.stack([v.detach().float() for v in rows.values()])  # [metrics, N]
    metrics = dict(zip(rows, table.mean(1).tolist(), strict=True))  # one device sync
    per_sequence = None
    if sequence_sums:
        sums = table.reshape(len(rows), batch["topk_ids"].shape[0], -1).sum(-1).cpu()  # [metrics, B], one copy
        per_sequence = dict(zip(rows, sums, strict=True))
    return KDLossOutput(loss, metrics, per_sequence)


# --- student logits for the candidates only --------------------------------------------------------


def candidate_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """fp32 logits [N, C] of `hidden` [N, H] for vocabulary rows `ids` [N, C] of `weight` [V, H]."""
    return _CandidateLogits.apply(hidden, weight, ids, chunk)


class _CandidateLogits(torch.autograd.Function):
    """s[n, c] = hidden[n] · weight[ids[n, c]], in fp32, chunked; backward re-gathers the rows."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, ids)
        ctx.chunk = chunk
        out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, len(ids), chunk):
                rows = weight[ids[a : a + chunk]].float()  # [n, C, H]
                out[a : a + chunk] = torch.bmm(rows, hidden[a : a + chunk].float().unsqueeze(-1)).squeeze(-1)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, ids = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, len(ids), ctx.chunk):
                g, i = grad[a : a + ctx.chunk].float(), ids[a : a + ctx.chunk]
                if grad_h is not None:
                    grad_h[a : a + ctx.chunk] = torch.bmm(g.unsqueeze(1), weight[i].float()).squeeze(1)
                if grad_w is not None:
                    contrib = g.unsqueeze(-1) * hidden[a : a + ctx.chunk].float().unsqueeze(1)
                    grad_w.index_add_(0, i.reshape(-1), contrib.reshape(-1, hidden.shape[-1]))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


# --- full-vocabulary terms (teacher top-1 CE, the text's next token, the tail-bucket KL), in chunks ------


def chunked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coeffs: tuple[float, ...],
    chunk: int = 1024,
    logit_softcap: float | None = None,
    soft: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE of the logits hidden @ weightᵀ [N, V] against m targets per position (`targets` [N, m]), `chunk`
    positions at a time, never holding more than [chunk, V] logits.

    `soft` = (ids [N, K], teacher log-probabilities there [N, K], coefficient) adds the tail-bucket KL: the
    KL at T = 1 between the teacher and the student over the full vocabulary with every id outside `ids`
    merged into one bucket (exact for the head, a lower bound of the full KL, and it stops the student from
    moving probability mass into the tail the way a KL over the candidates alone lets it).

    Returns (Σ_k coeffs[k] · CE sum of target k + soft coefficient · KL sum, differentiable in hidden and
    weight; then per position, without gradient: the CE of each target [N, m], whether argmax == target k
    [N, m] and the KL [N] (0 without `soft`), so callers can sum them per sequence). Every term shares one
    logits pass.
    """
    if targets.dim() != 2 or targets.shape[1] != len(coeffs):
        raise ValueError(f"chunked_ce: targets {tuple(targets.shape)} do not match {len(coeffs)} coefficients")
    soft_ids, soft_logp, soft_coeff = soft if soft is not None else (None, None, 0.0)
    return _ChunkedCE.apply(
        hidden, weight, targets, coeffs, chunk, logit_softcap, soft_ids, soft_logp, float(soft_coeff)
    )


def _tail_bucket_kl(
    z: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL(teacher ‖ student) over `ids` + one tail bucket, from student logits z [n, V] (left as
    they were) and lse [n]. Returns (kl [n], the student's log-probs at ids, the log-sum-exp of its logits
    outside ids, the teacher's tail mass p_r [n])."""
    z_ids = z.gather(1, ids)
    z.scatter_(1, ids, float("-inf"))
    lse_rest = torch.logsumexp(z, dim=-1)  # exact even when the tail mass is below fp32's 1 − ε
    z.scatter_(1, ids, z_ids)
    log_q = z_ids - lse[:, None]
    p = logp.exp()
    p_rest = (1 - p.sum(-1)).clamp_(min=0)
    kl = (p * (logp - log_q)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * (lse_rest - lse)
    return kl, log_q, lse_rest, p_rest


class _ChunkedCE(torch.autograd.Function):
    """Forward computes the losses and, when a gradient is wanted, the gradient of the weighted sum too
    (chunk by chunk); backward only scales it. The matmuls run in the autocast dtype when autocast is on."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        coeffs: tuple[float, ...],
        chunk: int,
        softcap: float | None,
        soft_ids: torch.Tensor | None,
        soft_logp: torch.Tensor | None,
        soft_coeff: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        ce_rows = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        agree_rows = torch.empty(targets.shape, dtype=torch.bool, device=hidden.device)
        kl_rows = torch.zeros(len(targets), dtype=torch.float32, device=hidden.device)
        # d/dz Σ_k c_k CE_k = Σ_k c_k (softmax − onehot_k) = scale · (softmax − Σ_k (c_k / scale) onehot_k) with
        # scale = Σ_k c_k: the [chunk, V] buffer is never multiplied, and scale is applied in backward (one
        # weight-1 target gives exactly softmax − onehot, whatever the weight). The tail-bucket KL adds
        # c_s · (softmax − t) with t = the teacher's p on its ids and p_r · softmax(z outside ids) elsewhere.
        scale = float(sum(coeffs)) + (soft_coeff if soft_ids is not None else 0.0)
        for a in range(0, len(targets), chunk):
            h, y = hidden[a : a + chunk], targets[a : a + chunk]
            z = torch.matmul(h.to(weight.dtype), weight.t()).float()  # [n, V]
            if softcap:
                tanh = torch.tanh(z / softcap)
                z = softcap * tanh
            lse = torch.logsumexp(z, dim=-1)
            ce_rows[a : a + chunk] = lse[:, None] - z.gather(1, y)
            agree_rows[a : a + chunk] = z.argmax(-1)[:, None] == y
            if soft_ids is not None:
                ids, logp = soft_ids[a : a + chunk], soft_logp[a : a + chunk].float()
                kl_rows[a : a + chunk], log_q, lse_rest, p_rest = _tail_bucket_kl(z, lse, ids, logp)
            if need_h or need_w:
                with_soft = soft_ids is not None and bool(soft_coeff)
                g = (z - lse[:, None]).exp_() if scale or with_soft else torch.zeros_like(z)
                rows = torch.arange(len(y), device=g.device)
                if with_soft:
                    alpha = soft_coeff / (scale or 1.0)
                    base = 1.0 if scale else 0.0  # softmax's coefficient: Σ coefficients / scale, 0 if they cancel
                    # off ids: q_j − α p_r q_j / q_r = q_j · (1 − α p_r e^(lse − lse_rest)); on ids: q − α p
                    g *= base - alpha * p_rest[:, None] * (lse - lse_rest).clamp(max=80)[:, None].exp()
                    g.scatter_(1, ids, base * log_q.exp() - alpha * logp.exp())
                for k, c in enumerate(coeffs):
                    if c:
                        g.index_put_((rows, y[:, k]), torch.full_like(lse, -c / (scale or 1.0)), accumulate=True)
                if softcap:
                    g *= 1 - tanh * tanh
                g = g.to(weight.dtype)
                if grad_h is not None:
                    grad_h[a : a + chunk] = torch.matmul(g, weight).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += torch.matmul(g.t(), h.to(weight.dtype)).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.scale = scale or 1.0
        ctx.mark_non_differentiable(ce_rows, agree_rows, kl_rows)
        ce_sums = ce_rows.sum(0)
        loss = soft_coeff * kl_rows.sum()
        for k, c in enumerate(coeffs):  # Python floats: no host-to-device copy in the training step
            loss = loss + c * ce_sums[k]
        return loss, ce_rows, agree_rows, kl_rows

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _grad_ce: Any, _grad_agree: Any, _grad_kl: Any
    ) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * (grad_loss * ctx.scale) if ctx.has[0] else None
        grad_w = saved.pop(0) * (grad_loss * ctx.scale) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None, None, None


# --- evaluation -----------------------------------------------------------------------------------


def kd_unit(cache: Any, split: str = "val") -> str:
    """The unit of `evaluate_kd(per_unit=...)` on `split`: 'document', or 'batch' for a cache without documents."""
    return "batch" if cache.document_units(split) is None else "document"


@torch.no_grad()
def evaluate_kd(
    model: torch.nn.Module,
    cache: Any,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = None,
    cfg: KDLossConfig | None = None,
    per_unit: list[dict[str, float]] | None = None,
    by_source: bool = False,
) -> dict[str, Any]:
    """Token-weighted means of the KD metrics over `split` of a KDCache (or a cache path), in order, with
    `tokens`, `sequences` and `ids_sha256` (of the input ids scored: two evaluations pair only on the same ids).
    `max_batches` caps the sequences scored at that many batches, evenly spaced over the split. With
    `by_source`, a cache built from a mix also gets `by_source`: {source: {metric: mean, tokens}}.

    `per_unit`, when given, receives the metric sums and token count `n` of each independent unit, for intervals:
    each document (conversation) of the split when the cache records them (`KDCache.document_units`: the
    sequences of one conversation are not independent draws), else each batch (`kd_unit` names which)."""
    from lutq.kd.reader import KDCache

    cache = cache if isinstance(cache, KDCache) else KDCache(cache)
    cfg = cfg or KDLossConfig()
    head = head_weight(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = head.device
    was_training = model.training
    docs = cache.document_units(split) if per_unit is not None else None
    doc_sums: dict[int, dict[str, float]] = {}
    ranges = cache.source_ranges(split) if by_source else None
    owner = None if ranges is None else np.full(cache.num_sequences(split), -1, dtype=np.int64)
    for i, (a, b) in enumerate((ranges or {}).values()):
        owner[a:b] = i  # type: ignore[index]
    source_sums: list[dict[str, float]] = [{"tokens": 0} for _ in ranges or ()]
    model.eval()
    totals: dict[str, float] = {}
    tokens = sequences = 0
    ids_digest = hashlib.sha256()
    total = cache.num_sequences(split)
    # a capped evaluation scores sequences spread over the whole split, not its first batches (a mixed cache lays
    # its sources out one after the other, so the first batches would be one source)
    count = total if max_batches is None else min(total, max_batches * batch_size)
    order = np.arange(total) if count == total else spaced_indices(total, count)
    if total and not count:
        raise LutqError(f"evaluate_kd: max_batches={max_batches} scores nothing")
    try:
        for start in range(0, count, batch_size):
            chunk = order[start : start + batch_size]
            batch = cache.read(split, chunk)
            ids_digest.update(batch["input_ids"].to(torch.int32).cpu().numpy().tobytes())
            hidden = student_hidden(model, batch["input_ids"].to(device))
            want_rows = docs is not None or owner is not None
            out = kd_loss(hidden, head, batch, cfg, logit_softcap=softcap, sequence_sums=want_rows)
            rows, positions = batch["topk_ids"].shape[:2]
            n = rows * positions
            sums = {k: v * n for k, v in out.metrics.items()}
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
            per_seq = {k: v.tolist() for k, v in out.sequence_sums.items()} if out.sequence_sums else {}
            if per_unit is not None and docs is None:
                per_unit.append({"n": n, **sums})
            elif per_unit is not None:
                for j, doc in enumerate(int(d) for d in docs[chunk]):
                    unit = doc_sums.setdefault(doc, {"n": 0})
                    unit["n"] += positions
                    for k, v in per_seq.items():
                        unit[k] = unit.get(k, 0.0) + v[j]
            if owner is not None:
                for j, src in enumerate(int(o) for o in owner[chunk]):
                    sums_of = source_sums[src]
                    sums_of["tokens"] += positions
                    for k, v in per_seq.items():
                        sums_of[k] = sums_of.get(k, 0.0) + v[j]
            tokens += n
            sequences += rows
    finally:
        model.train(was_training)
    if per_unit is not None and docs is not None:
        per_unit.extend(doc_sums.values())
    result = {k: v / tokens for k, v in totals.items()} if tokens else {}
    if ranges is not None:
        result["by_source"] = {
            name: {**{k: v / sums["tokens"] for k, v in sums.items() if k != "tokens"}, "tokens": sums["tokens"]}
            for name, sums in zip(ranges, source_sums, strict=True)
            if sums["tokens"]
        }
    return {**result, "tokens": tokens, "sequences": sequences, "ids_sha256": ids_digest.hexdigest()}
