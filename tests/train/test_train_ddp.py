"""DDP on CPU: `torchrun --nproc_per_node 2 lutq train` (gloo) follows the same loss trajectory as one
process with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lutq.models import load_checkpoint, load_trainer_state
from lutq.train import RunDir, TrainConfig, train

STEPS = 8


def test_ddp_two_ranks_match_one_process(kd, tmp_path):
    ddp_dir = tmp_path / "ddp"
    flags = [
        "--cache",
        str(kd.cache),
        "--model",
        str(kd.teacher),
        "--preset",
        "q2a4",
        "--steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--eval-batches",
        "1",
        "--save-every",
        "4",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lutq.cli",
            "train",
            *flags,
            "--out",
            str(ddp_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert RunDir(ddp_dir).read_config()["world_size"] == 2

    cfg = TrainConfig.from_dict({**RunDir(ddp_dir).read_config()["config"], "out": str(tmp_path / "single")})
    train(cfg)
    ddp_rows, rows = RunDir(ddp_dir).rows(), RunDir(cfg.out).rows()
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in rows] == list(range(STEPS + 1))
    for key, rel in (("loss", 1e-5), ("kd", 1e-5), ("grad_norm", 1e-4), ("eval_loss", 1e-5), ("tokens", 0)):
        assert [key in r for r in ddp_rows] == [key in r for r in rows], key
        got = [r[key] for r in ddp_rows if key in r]
        assert got == pytest.approx([r[key] for r in rows if key in r], rel=rel), key
    assert ddp_rows[-1]["tokens"] == STEPS * 2 * 4 * 32
    # rank 0 saved the same model (up to float reduction order) and the full trainer state
    a, _, _ = load_checkpoint(ddp_dir / "last", load_tokenizer=False)
    b, _, _ = load_checkpoint(cfg.out / "last", load_tokenizer=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-4), name
    assert load_trainer_state(ddp_dir / "last")["world_size"] == 2
