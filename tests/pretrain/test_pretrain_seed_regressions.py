"""Regressions for pitfalls of the seed launcher (/work/shared/reference/seed-pretrain-launcher.md) that lutq fixed
but no other test pinned down: a --seq-len the schedule hides, constant lr without warmup, weight decay on every
parameter, noisy random eval windows, and a token file cut short by an interrupted prepare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lutq.data.tokens as tokens_mod
import lutq.pretrain.train as train_mod
from lutq.data.tokens import TokenData, meta_path, prepare_tokens
from lutq.pretrain import PretrainConfig, pretrain
from lutq.pretrain.config import make_plan, unused_seq_len_note
from lutq.pretrain.model import GPT, ModelConfig
from lutq.testing import TINY_PRETRAIN, tiny_tokenizer
from lutq.train.schedule import lr_factor
from lutq.train.state import DistContext

SMALL = {**TINY_PRETRAIN, "eval_iters": 3}
WORDS = ["the", "king", "and", "queen", "rode", "to", "the", "sea", "where", "ships", "sailed", "at", "night"]


def _corpus(root: Path, docs: int) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(docs):
        (corpus / f"{i:03d}.txt").write_text(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)))
    return corpus


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tiny_tokenizer().save_pretrained(root / "tok")
    return prepare_tokens(str(root / "tok"), [str(_corpus(root, 30))], root / "data.npy", workers=1).path


def _cfg(token_file: Path, out: Path, **kw) -> PretrainConfig:
    return PretrainConfig(data=str(token_file), out=str(out), **(SMALL | kw))


# --- seed §2: "--train-seq-len is ignored" when the schedule starts at step 0 -----------------------------------


def test_explicit_seq_len_hidden_by_the_schedule_is_noted(token_file: Path, tmp_path: Path, capsys) -> None:
    note = unused_seq_len_note(2048, "1024@0,2048@10000")  # the seed doc's "80GB" recipe
    assert note is not None and "--seq-len 2048 is not used" in note and "starts at 1024" in note
    assert unused_seq_len_note(None, "1024@0,2048@10000") is None  # not given: the default is not the user's
    assert unused_seq_len_note(1024, "1024@0,2048@10000") is None  # the same length: nothing hidden
    assert unused_seq_len_note(512, "1024@100") is None  # applies before the first entry
    assert unused_seq_len_note(512, "") is None and unused_seq_len_note(512, None) is None
    # the dry run's plan prints it; a preset schedule hides an explicit --seq-len the same way
    pretrain(_cfg(token_file, tmp_path / "a", seq_len=24, seq_schedule="16@0,32@4"), run=False)
    assert "--seq-len 24 is not used" in " ".join(capsys.readouterr().err.split())
    pretrain(_cfg(token_file, tmp_path / "b", seq_len=16, seq_schedule="16@0,32@4"), run=False)
    assert "is not used" not in capsys.readouterr().err


# --- seed §5: "a 1B launcher run uses a constant 2e-4 with no warmup" -------------------------------------------


def test_lr_warms_up_then_decays(token_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(token_file, tmp_path / "run").resolve()
    opt = train_mod.make_optimizer(
        GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64)), cfg, torch.device("cpu")
    )
    lrs = [train_mod.set_lr(opt, cfg, 6, s) for s in range(6)]
    assert lrs == pytest.approx(
        [
            5e-3,
            1e-2,
            1e-2 * lr_factor(2, total=6, warmup=2, min_ratio=0.1),
            1e-2 * lr_factor(3, total=6, warmup=2, min_ratio=0.1),
            1e-2 * lr_factor(4, total=6, warmup=2, min_ratio=0.1),
            1e-3,
        ]
    )
    assert all(g["lr"] == lrs[-1] for g in opt.param_groups)
    # and the loop uses it: the logged lr of a real run follows the same curve
    pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx(lrs)


# --- seed §5: "wd = 0.1 applied to all parameters (no no-decay groups)" ----------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_weight_decay_spares_norms_temperatures_and_null_slots(optimizer: str) -> None:
    model = GPT(
        ModelConfig(
            vocab_size=50,
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_ff=64,
            variant="decoupled",
            sem_dim=8,
            geo_dim=8,
            null_attn=True,
            norm="layernorm",
        )
    )
    cfg = PretrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5).resolve()
    opt = train_mod.make_optimizer(model, cfg, torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    small = {n for n in names if n.endswith(("norm.weight", "norm.bias", "logit_scale", "k_null", "v_null"))}
    assert len(small) == 2 * 7 + 2  # per layer: 2 norms x (weight, bias), temperature, 2 null slots; final norm
    with torch.no_grad():  # something to decay in every parameter (norm gains start at 1, null slots at 0)
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)  # no gradient: only the decoupled weight decay moves a parameter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if n in small:
            assert torch.equal(p, before[n]), f"{n} was decayed"
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


# --- seed §5: eval "averages eval_iters random micro-batches" (about 10-20k tokens: noisy) ---------------------


def test_eval_windows_are_fixed_and_held_out_and_training_never_reads_the_tail(
    token_file: Path, tmp_path: Path, monkeypatch
) -> None:
    data = TokenData.open(token_file)
    cfg = _cfg(token_file, tmp_path / "run", seq_schedule="8@0,16@2").resolve()
    plan = make_plan(cfg, len(data), data.vocab_size)
    seen: list[tuple[np.ndarray, int]] = []
    real = train_mod.data_windows

    def recording(data, starts, seq_len):
        seen.append((np.asarray(starts).copy(), seq_len))
        return real(data, starts, seq_len)

    monkeypatch.setattr(train_mod, "data_windows", recording)
    cpu = torch.device("cpu")
    first = train_mod.eval_batches(data, plan, cfg, cpu)
    evals, seen[:] = list(seen), []
    second = train_mod.eval_batches(data, plan, cfg, cpu)
    assert len(first) == cfg.eval_iters and all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    starts = np.concatenate([s for s, _ in evals])
    assert len(np.unique(starts)) == cfg.eval_iters * cfg.micro_batch  # spread over the tail, not one window
    assert starts.min() >= plan.train_tokens and starts.max() + plan.eval_seq_len + 1 <= len(data)
    assert {seq for _, seq in evals} == {plan.eval_seq_len} == {16}  # at the run's longest length
    seen[:] = []
    dist = DistContext(rank=0, world_size=1, local_rank=0, device=cpu)
    for step in range(plan.steps):
        train_mod.step_batches(data, plan, cfg, step, dist)
    assert all(int(s.max()) + seq + 1 <= plan.train_tokens for s, seq in seen)  # never the held-out tail


# --- seed §3: "an interrupted run is truncated to what was collected" --------------------------------------------


def test_interrupted_prepare_leaves_the_previous_file_or_nothing(tmp_path: Path, monkeypatch) -> None:
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    corpus = str(_corpus(tmp_path, 40))
    monkeypatch.setattr(tokens_mod, "CHUNK_DOCS", 8)
    real = tokens_mod._encoded

    def interrupted(*args, **kwargs):
        chunks = real(*args, **kwargs)
        yield next(chunks)  # one chunk is written, then the run is killed
        raise KeyboardInterrupt

    out = tmp_path / "out" / "data.npy"
    monkeypatch.setattr(tokens_mod, "_encoded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(str(tmp_path / "tok"), [corpus], out, workers=1)
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no partial file, no temporaries
    monkeypatch.setattr(tokens_mod, "_encoded", real)
    good = prepare_tokens(str(tmp_path / "tok"), [corpus], out, workers=1)
    saved = out.read_bytes(), meta_path(out).read_bytes()
    monkeypatch.setattr(tokens_mod, "_encoded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(str(tmp_path / "tok"), [corpus], out, workers=1)
    assert (out.read_bytes(), meta_path(out).read_bytes()) == saved  # the previous file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, meta_path(out).name])
    assert len(TokenData.open(out)) == len(good)
