"""The training loop in process on a tiny model: logs, checkpoints, modes, accumulation, NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lutq.core.errors import LutqError
from lutq.kd import KDCache
from lutq.models import load_checkpoint, load_trainer_state
from lutq.quant import set_trainable
from lutq.train import RunDir, build_student, train
from lutq.train.run_dir import read_csv


def test_train_learns_logs_and_checkpoints(kd, tmp_path):
    cfg = kd.config(tmp_path / "run", steps=20, eval_every=10, eval_batches=2, save_every=5, log_every=2)
    res = train(cfg)
    run = RunDir(res.run_dir)
    assert res.step == 20 and res.tokens == 20 * 4 * 32
    # training beats the init on the held-out split
    assert res.final_eval["eval_loss"] < 0.8 * res.initial_eval["eval_loss"]
    assert res.final_eval["eval_kl"] < res.initial_eval["eval_kl"]
    assert res.final_eval["eval_top1_agree"] > res.initial_eval["eval_top1_agree"]
    # one row per logged step: 0 (initial eval), 2, 4, ..., 20; eval columns at 0, 10, 20
    rows = read_csv(run.csv)
    assert [int(r["step"]) for r in rows] == [0, *range(2, 21, 2)]
    header = list(rows[0])
    assert header[:2] == ["step", "tokens"]
    for col in (
        "loss",
        "kd",
        "kl",
        "ce",
        "top1_agree",
        "eval_loss",
        "eval_kd",
        "eval_kl",
        "eval_top1_agree",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed",
    ):
        assert col in header
    by_step = {int(r["step"]): r for r in rows}
    assert all(by_step[s]["eval_kd"] for s in (0, 10, 20)) and not by_step[4]["eval_kd"]
    assert all(float(by_step[s]["loss"]) > 0 and float(by_step[s]["tokens_per_s"]) > 0 for s in range(2, 21, 2))
    assert int(by_step[20]["tokens"]) == res.tokens and float(by_step[20]["elapsed"]) > 0
    lrs = [float(by_step[s]["lr"]) for s in range(2, 21, 2)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < lrs[0]  # cosine decay after 1 warmup step
    # checkpoints: last/ with trainer state at the final step, best/ at the best eval
    state = load_trainer_state(run.last)
    assert state["step"] == 20 and set(state) >= {"optimizer", "scheduler", "rng", "tokens", "elapsed"}
    _, _, info = load_checkpoint(run.best, load_tokenizer=False)
    assert info.extra["train"]["step"] == res.best_step == 20 and info.quant
    assert res.best_eval_loss == pytest.approx(res.final_eval["eval_loss"])
    summary = run.summary.read_text()
    assert "status: completed" in summary and "top1_agree" in summary
    assert json.loads((run.path / "run.json").read_text())["config"]["steps"] == 20
    # a second run into the same directory is refused unless resumed or overwritten
    with pytest.raises(LutqError, match="--resume"):
        train(cfg)
    # --overwrite starts over and leaves nothing stale behind (no eval this time: no best/)
    again = train(cfg.replace(steps=2, eval_batches=0, log_every=1), overwrite=True)
    assert not again.best.exists() and again.checkpoint == again.last
    assert [r["step"] for r in run.rows()] == [1, 2]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("mlp-only", {("mlp", "scale_A"), ("mlp", "scale_B"), ("mlp", "scale_g")}),
        ("attn-only", {("self_attn", "scale_A"), ("self_attn", "scale_B"), ("self_attn", "scale_g")}),
        ("g-only", {("mlp", "scale_g"), ("self_attn", "scale_g")}),
        ("freeze-g", {("mlp", "scale_A"), ("mlp", "scale_B"), ("self_attn", "scale_A"), ("self_attn", "scale_B")}),
        ("lut", {("mlp", "lut"), ("self_attn", "lut")}),
        (
            "mlp-only+lut",
            {("mlp", "scale_A"), ("mlp", "scale_B"), ("mlp", "scale_g"), ("mlp", "lut"), ("self_attn", "lut")},
        ),
    ],
)
def test_modes_change_only_their_parameters(kd, tmp_path, mode, expected):
    mode, _, lut = mode.partition("+")
    cfg = kd.config(tmp_path / mode, mode=mode, train_lut=bool(lut), steps=2, lr=3e-2, warmup=0)
    before, _ = build_student(cfg, KDCache(kd.cache), verbose=False)
    set_trainable(before, mode, lut=bool(lut))  # what set_trainable does (freeze-g rounds g to FP16) is not training
    train(cfg)
    after, _, _ = load_checkpoint(cfg.out / "last", load_tokenizer=False)
    b, a = before.state_dict(), after.state_dict()
    assert set(a) == set(b)
    changed = {name for name in a if not torch.equal(a[name], b[name])}
    kinds = {
        (("mlp" if ".mlp." in n else "self_attn" if ".self_attn." in n else "other"), n.rsplit(".", 1)[1])
        for n in changed
    }
    assert kinds == expected, f"{mode}: changed {sorted(changed)}"
    # every tensor of the selected kinds moved (e.g. each of the 6 MLP scale_A of mlp-only)
    for group, leaf in expected:
        names = [n for n in a if f".{group}." in n and n.endswith("." + leaf)]
        assert names and set(names) <= changed
    if mode == "freeze-g":  # the frozen g sits at its FP16 value
        assert all(torch.equal(v, v.half().float()) for n, v in a.items() if n.endswith("scale_g"))


def test_grad_accumulation_matches_a_larger_batch(kd, tmp_path):
    big = train(kd.config(tmp_path / "b4", steps=3))
    acc = train(kd.config(tmp_path / "b2x2", steps=3, batch_size=2, grad_accum=2))
    rows_big, rows_acc = RunDir(big.run_dir).rows(), RunDir(acc.run_dir).rows()
    assert [r["loss"] for r in rows_acc] == pytest.approx([r["loss"] for r in rows_big], rel=1e-5)
    assert [r["grad_norm"] for r in rows_acc] == pytest.approx([r["grad_norm"] for r in rows_big], rel=1e-4)
    assert acc.tokens == big.tokens


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        ("loss", r"diverged at step 5: loss is nan"),
        ("grad", r"diverged at step 5: gradient norm is nan"),
        ("param", r"diverged at step 6: (loss is nan|parameter .* is not finite)"),
    ],
)
def test_nan_stops_and_keeps_last_good_checkpoint(kd, tmp_path, monkeypatch, poison, message):
    import lutq.kd.loss as loss_module
    import lutq.train.trainer as trainer

    real_loss, real_project, calls = loss_module.kd_loss, trainer.project_luts_, {"loss": 0, "step": 0}

    def poisoned_loss(hidden, *args, **kwargs):
        out = real_loss(hidden, *args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation (also kd_loss's caller) runs without gradients
            return out
        calls["loss"] += 1
        if calls["loss"] == 5 and poison == "loss":  # the 5th training forward: step 5
            out.loss = out.loss * float("nan")
            out.metrics["loss"] = float("nan")
        if calls["loss"] == 5 and poison == "grad":  # finite value, NaN gradient (d sqrt(x)/dx at 0)
            out.loss = out.loss + torch.sqrt((hidden - hidden.detach()).pow(2).sum())
        return out

    def poisoned_step(model):  # runs right after optimizer.step()
        calls["step"] += 1
        if calls["step"] == 5 and poison == "param":
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))
        return real_project(model)

    monkeypatch.setattr(loss_module, "kd_loss", poisoned_loss)  # KDStudent's loss
    monkeypatch.setattr(trainer, "project_luts_", poisoned_step)
    cfg = kd.config(tmp_path / "run", steps=10, save_every=2, eval_every=2, eval_batches=3, eval_batch_size=2)
    with pytest.raises(LutqError, match=message + r".*last good checkpoint is .*last \(step 4\)"):
        train(cfg)
    run = RunDir(cfg.out)
    assert load_trainer_state(run.last)["step"] == 4
    assert max(r["step"] for r in run.rows()) <= 5
    assert all(math.isfinite(r["loss"]) for r in run.rows() if "loss" in r)
    summary = run.summary.read_text()
    assert "status: stopped: training diverged at step" in summary
    # the final column is the last evaluation (step 4), paired with step 0's
    assert run.eval_units()["latest"]["step"] == 4
    loss_row = next(line for line in summary.splitlines() if line.startswith("| loss |"))
    assert "[" in loss_row.split("|")[4], loss_row
    model, _, _ = load_checkpoint(run.last, load_tokenizer=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_runtime_options_keep_the_numbers(kd, tmp_path, monkeypatch):
    def losses(name, **changes):
        res = train(kd.config(tmp_path / name, steps=3, **changes))
        return [r["loss"] for r in RunDir(res.run_dir).rows()]

    from lutq.quant import LUTLinear

    calls = {"n": 0}
    real_forward = LUTLinear.forward

    def counting_forward(self, x):
        calls["n"] += 1
        return real_forward(self, x)

    monkeypatch.setattr(LUTLinear, "forward", counting_forward)
    ref = losses("fp32")
    plain_calls, calls["n"] = calls["n"], 0
    assert losses("checkpointing", grad_checkpointing=True) == pytest.approx(ref, rel=1e-6)
    assert calls["n"] == 2 * plain_calls  # every decoder layer is recomputed in backward
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kw):  # the inductor backend takes minutes on CPU; the wiring is the same
        compiled.append(type(getattr(fn, "__self__", fn)).__name__)  # Module.compile() passes its bound _call_impl
        return real_compile(fn, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    assert losses("compiled", compile=True) == pytest.approx(ref, rel=1e-5)
    assert compiled[0] == "function"  # the one-op probe that torch.compile works here
    assert len(compiled) > 1 and set(compiled[1:]) == {"LlamaDecoderLayer"}  # then every decoder layer, regionally

    def broken_compile(fn, **kw):  # e.g. inductor on a CPU without a C++ compiler
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    from lutq.models.runtime import compile_unavailable

    assert "InvalidCxxCompiler" in compile_unavailable("cpu")
    assert losses("compile-fallback", compile=True) == ref  # a note, then the eager run, to the bit
    bf16 = losses("bf16", precision="bf16")  # autocast on CPU when forced; 'auto' is fp32 on CPU
    assert bf16 != ref and bf16 == pytest.approx(ref, rel=5e-2)
    # 'fast' is bf16 exactly when the device has native bf16 matmuls, else fp32; run.json says which it was
    import lutq.models.runtime as runtime

    for native, expected, resolved in ((True, bf16, "bf16"), (False, ref, "fp32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert losses(f"fast-{native}", precision="fast") == expected
        assert RunDir(tmp_path / f"fast-{native}").read_config()["precision"] == resolved
    assert RunDir(tmp_path / "fp32").read_config()["precision"] == "fp32"  # 'auto' on CPU


def _with_heldout_text(kd, tmp_path, **changes):
    """(a small held-out text file, a config that scores its perplexity (window 64) at every evaluation)."""
    text = tmp_path / "held.txt"
    text.write_text("a jolly wizard bakes seven brown loaves while the lazy fox sleeps over the quartz\n" * 6)
    cfg = kd.config(tmp_path / "run", ppl_texts=[str(text)], ppl_max_tokens=300, ppl_max_length=64, **changes)
    return text, cfg


def test_heldout_perplexity_at_eval(kd, tmp_path):
    from lutq.data import load_documents
    from lutq.evaluate.perplexity import perplexity

    text, cfg = _with_heldout_text(kd, tmp_path, steps=2, eval_every=2, eval_batches=1)
    res = train(cfg)
    assert "eval_ppl_held" in RunDir(res.run_dir).columns()
    rows = RunDir(res.run_dir).rows()
    assert [r["step"] for r in rows if "eval_ppl_held" in r] == [0, 2]
    model, tok, _ = load_checkpoint(res.last)
    direct = perplexity(
        model, tok, load_documents(str(text)), max_length=64, stride=32, max_tokens=300, show_progress=False
    )
    assert rows[-1]["eval_ppl_held"] == pytest.approx(direct.ppl, rel=1e-5)
    assert rows[0]["eval_ppl_held"] != rows[-1]["eval_ppl_held"]


def test_summary_pairs_the_final_eval_against_step_0(kd, tmp_path):
    """eval_units.json keeps the per-unit sums of the step-0 and latest evaluations (the records `lutq eval
    compare` makes), and the run's change from step 0 comes with a paired interval, in the result and summary.md."""
    from lutq.evaluate.compare import CompareConfig, evaluate_model
    from lutq.evaluate.uncertainty import format_change

    # the tiny cache's whole val split (10 sequences), one per batch
    text, cfg = _with_heldout_text(kd, tmp_path, steps=12, eval_every=6, eval_batches=10, eval_batch_size=1)
    res = train(cfg)
    run = RunDir(res.run_dir)
    units = run.eval_units()
    assert units["initial"]["step"] == 0 and units["latest"]["step"] == 12
    docs = KDCache(kd.cache).document_units("val")
    assert (
        len(units["latest"]["kd_units"]["n"]) == len(set(docs.tolist())) >= 2
        and units["latest"]["kd_unit"] == "document"
    )
    assert len(units["latest"]["ppl_segments"]["held"]["nll"]) > 1

    # the final record is the one `lutq eval compare` makes of last/ on the same batches and windows
    model, tok, _ = load_checkpoint(res.last)
    row = evaluate_model(
        model,
        tok,
        {"held": [text.read_text()]},
        CompareConfig(max_length=64, stride=32, max_tokens=300, kd_batch_size=1, kd_max_batches=10),
        cache=KDCache(kd.cache),
    )
    for k, col in row["kd_units"].items():
        assert units["latest"]["kd_units"][k] == pytest.approx(col, rel=1e-5), k
    assert units["latest"]["ppl_segments"]["held"]["ids_sha256"] == row["ppl_segments"]["held"]["ids_sha256"]

    change = res.eval_change["eval_loss"]
    assert change["diff"] == pytest.approx(res.final_eval["eval_loss"] - res.initial_eval["eval_loss"])
    assert change["low"] < change["diff"] < change["high"] < 0  # training clearly lowered the KD loss
    ppl = res.eval_change["eval_ppl_held"]
    assert ppl["ratio"] == pytest.approx(res.final_eval["eval_ppl_held"] / res.initial_eval["eval_ppl_held"])
    assert ppl["low"] < ppl["ratio"] < ppl["high"]
    summary = run.summary.read_text()
    assert "change (95% CI, paired)" in summary
    assert "| ppl_held |" in summary and format_change(ppl["ratio"], ppl["low"], ppl["high"]) in summary

    # a resume that evaluates other batches cannot pair: no interval, and the summary says why
    longer = train(cfg.replace(steps=14, eval_batches=8), resume=True)
    assert "eval_loss" not in longer.eval_change and "eval_ppl_held" in longer.eval_change
    assert "did not score the same units" not in run.summary.read_text()  # the perplexity still pairs
    # --overwrite starts over: the old units go with the old run
    train(cfg.replace(steps=1, eval_batches=0, ppl_texts=[]), overwrite=True)
    assert run.eval_units() == {}


def test_trainer_feeds_the_requested_tracker(kd, tmp_path, monkeypatch):
    import sys

    logged = []

    class FakeWandb:
        @staticmethod
        def init(**kw):
            return FakeWandb()

        def log(self, metrics, step):
            logged.append((step, metrics))

        def finish(self):
            logged.append(("finished", {}))

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    train(kd.config(tmp_path / "run", steps=2, eval_every=2, eval_batches=1, loggers=["wandb"]))
    assert [s for s, _ in logged] == [0, 1, 2, "finished"]
    assert "eval/loss" in logged[0][1] and "train/loss" in logged[1][1] and "eval/kd" in logged[2][1]


def test_latent_training_starts_at_w_eff_and_moves_the_indices(kd, tmp_path):
    from lutq.quant import convert_q4_to_q2, lut_layers, unfreeze_latent

    cfg = kd.config(tmp_path / "latent", latent=True, steps=3, lr=1e-1, warmup=0, preset="q4a4")
    frozen, _ = build_student(cfg, KDCache(kd.cache), verbose=False)
    latent, _ = build_student(cfg, KDCache(kd.cache), verbose=False)
    unfreeze_latent(latent)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the latent copy computes exactly what the frozen one does
        assert torch.equal(frozen(input_ids=ids).logits, latent(input_ids=ids).logits)
    train(cfg)
    after, _, _ = load_checkpoint(cfg.out / "last", load_tokenizer=False)
    with torch.no_grad():
        after(input_ids=ids)  # a latent forward re-picks idx from the trained weights
    layers = dict(lut_layers(after))
    assert {layer.mode for layer in layers.values()} == {"latent"}
    moved = sum(int((layers[n].idx != layer.idx).sum()) for n, layer in lut_layers(frozen))
    assert moved > 0
    assert all(torch.equal(layers[n].scale_A, layer.scale_A) for n, layer in lut_layers(frozen))  # scales fixed
    convert_q4_to_q2(after)  # conversion freezes latent layers first
    assert {layer.mode for _, layer in lut_layers(after)} == {"frozen"}


def test_default_lr_of_a_latent_run_is_recorded(kd, tmp_path):
    train(kd.config(tmp_path / "run", latent=True, lr=None, steps=1, preset="q4a4"))
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["lr"] == 2e-3 and config["latent"]


def test_default_init_is_calibrated_and_beats_the_plain_one(kd, tmp_path):
    from lutq.train.config import TrainConfig

    cache = KDCache(kd.cache)
    plain = kd.config(tmp_path / "plain", eval_batches=2)
    default = plain.replace(
        init_lut=TrainConfig.init_lut,
        init_tighten=TrainConfig.init_tighten,
        init_calib_sequences=TrainConfig.init_calib_sequences,
    )
    assert (default.init_lut, default.init_tighten, default.init_calib_sequences) == ("kmeans", 4, 256)
    from lutq.kd import evaluate_kd

    losses = {}
    for name, cfg in (("plain", plain), ("default", default)):
        model, _ = build_student(cfg, cache, verbose=False)
        with torch.no_grad():
            losses[name] = evaluate_kd(model, cache, split="val", batch_size=4, max_batches=2, cfg=cfg.kd)["kd"]
    assert losses["default"] < 0.5 * losses["plain"]
    with pytest.raises(LutqError, match="init_lut"):
        plain.replace(init_lut="nope").validate()


def test_native_bf16_probe(monkeypatch):
    from lutq.models.runtime import native_bf16

    assert native_bf16("meta") is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16("cpu") is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16(torch.device("cpu")) is False
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the private probes
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native_bf16("cpu") is False


def test_small_batch_note_only_for_small_gpu_micro_batches():
    from lutq.train.trainer import GPU_MIN_MICRO_TOKENS, small_batch_note

    assert "1,024 tokens per micro-batch" in small_batch_note(torch.device("cuda"), 8 * 128)
    assert small_batch_note(torch.device("cuda"), GPU_MIN_MICRO_TOKENS) is None
    assert small_batch_note(torch.device("cpu"), 8 * 64) is None
