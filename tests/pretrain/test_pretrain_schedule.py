"""Token-budget arithmetic: counts, the sequence-length schedule, target-token solving, the plan."""

from __future__ import annotations

import pytest

from lutq.core.errors import LutqError
from lutq.pretrain.config import GPU_MEM_PRESETS, PretrainConfig, make_plan
from lutq.pretrain.schedule import (
    max_seq_len,
    parse_count,
    parse_seq_schedule,
    planned_tokens,
    seq_len_for_step,
    steps_for_tokens,
)

SEED_DEFAULT = parse_seq_schedule("1024@0,2048@10000")


@pytest.mark.parametrize(
    ("text", "value"),
    [("100M", 10**8), ("1.5B", 1_500_000_000), ("2000", 2000), ("10k", 10_000), (" 3 b ", 3 * 10**9), (".5M", 500_000)],
)
def test_parse_count(text: str, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "-5M", "1.2.3", "10X", "M", "0"])
def test_parse_count_refuses_garbage(text: str) -> None:
    with pytest.raises(LutqError):
        parse_count(text)


def test_schedule_parsing_and_lookup() -> None:
    s = parse_seq_schedule(" 1024@2000, 512@0 ")
    assert s == [(512, 0), (1024, 2000)]
    assert [seq_len_for_step(i, s, 256) for i in (0, 1999, 2000, 10**6)] == [512, 512, 1024, 1024]
    late = parse_seq_schedule("1024@100")
    assert seq_len_for_step(99, late, 256) == 256  # before the first entry the default applies
    assert max_seq_len(late, 256, steps=50) == 256 and max_seq_len(late, 256) == 1024
    assert parse_seq_schedule("") == [] and parse_seq_schedule(None) == []


@pytest.mark.parametrize("text", ["512", "512@", "abc@0", "512@0,,1024@5", "512@0;1024@5", "1@0", "512@0,1024@0"])
def test_malformed_schedule_is_an_error_not_skipped(text: str) -> None:
    with pytest.raises(LutqError, match="seq schedule"):
        parse_seq_schedule(text)


def test_seed_reference_numbers() -> None:
    """Global batch 16 with "1024@0,2048@10000" (the seed launcher's defaults)."""
    assert planned_tokens(20_000, 16, SEED_DEFAULT, 1024) == 491_520_000  # 0.4915B
    assert steps_for_tokens(10**9, 16, SEED_DEFAULT, 1024) == 35_518
    assert steps_for_tokens(10 * 10**9, 16, SEED_DEFAULT, 1024) == 310_176
    assert steps_for_tokens(20 * 10**9, 16, SEED_DEFAULT, 1024) == 615_352
    first = parse_seq_schedule("512@0,1024@2000,2048@12000")
    assert planned_tokens(20_000, 16, first, 1024) == 442_368_000


@pytest.mark.parametrize("target", [1, 16_384, 16_385, 163_840_000, 163_840_001, 10**9 + 7])
def test_solved_steps_are_the_smallest_that_reach_the_target(target: int) -> None:
    steps = steps_for_tokens(target, 16, SEED_DEFAULT, 1024)
    assert planned_tokens(steps, 16, SEED_DEFAULT, 1024) >= target
    assert planned_tokens(steps - 1, 16, SEED_DEFAULT, 1024) < target


def test_plan_with_gpu_mem_preset_target_tokens_and_epoch_warning() -> None:
    cfg = PretrainConfig(size="1b", variant="gqa", gpu_mem=40, target_tokens="1B").resolve()
    preset = GPU_MEM_PRESETS[40]
    assert (cfg.seq_len, cfg.seq_schedule, cfg.grad_accum, cfg.micro_batch) == (
        preset["seq_len"],
        preset["seq_schedule"],
        preset["grad_accum"],
        preset["micro_batch"],
    )
    plan = make_plan(cfg, n_tokens=100_000_000, vocab_size=50257)
    assert plan.global_batch == 16
    assert plan.planned_tokens >= 10**9 > planned_tokens(plan.steps - 1, 16, plan.schedule, cfg.seq_len)
    assert plan.model.block_size == 2048 and plan.eval_seq_len == 2048
    assert round(plan.params / 1e6) == 1095
    assert plan.epochs > 10 and any("epochs > 1" in n for n in plan.notes)
    rows = dict(plan.rows())
    assert "1.000B" in rows["planned tokens"] and "FLOPs" in rows["estimated compute"]
    # an explicit flag wins over the preset
    assert PretrainConfig(gpu_mem=40, grad_accum=3).resolve().grad_accum == 3


def test_block_size_covers_the_schedule_of_the_solved_steps() -> None:
    cfg = PretrainConfig(
        size="tiny", seq_len=128, seq_schedule="128@0,512@5000", micro_batch=1, grad_accum=1, target_tokens="10M"
    ).resolve()
    plan = make_plan(cfg, n_tokens=10**6, vocab_size=100)
    assert plan.steps > 5000 and plan.model.block_size == plan.eval_seq_len == 512


def test_plan_refuses_impossible_settings() -> None:
    with pytest.raises(LutqError, match="--gpu-mem 12"):
        PretrainConfig(gpu_mem=12).resolve()
    with pytest.raises(LutqError, match="exceeds block_size 512"):
        make_plan(PretrainConfig(seq_len=1024, block_size=512).resolve(), 10**6, 100)
    with pytest.raises(LutqError, match="held-out tail"):
        make_plan(PretrainConfig(seq_len=256).resolve(), 3000, 100)
