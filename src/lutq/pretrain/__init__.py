"""Pretraining: a GPT-style decoder with attention variants, the token-budget planner, the trainer
(`pretrain(cfg)`), throughput benchmark and HF export. Token files come from `lutq.data.tokens`."""

from lutq.pretrain.bench import bench_pretrain
from lutq.pretrain.config import GPU_MEM_PRESETS, Plan, PretrainConfig, make_plan
from lutq.pretrain.export import export_hf
from lutq.pretrain.model import GPT, SIZES, VARIANTS, ModelConfig, count_params, flops_per_token, params_of
from lutq.pretrain.schedule import parse_count, parse_seq_schedule, planned_tokens, seq_len_for_step, steps_for_tokens
from lutq.pretrain.train import load_run_config, pretrain

__all__ = [
    "GPT",
    "GPU_MEM_PRESETS",
    "SIZES",
    "VARIANTS",
    "ModelConfig",
    "Plan",
    "PretrainConfig",
    "bench_pretrain",
    "count_params",
    "export_hf",
    "flops_per_token",
    "load_run_config",
    "make_plan",
    "params_of",
    "parse_count",
    "parse_seq_schedule",
    "planned_tokens",
    "pretrain",
    "seq_len_for_step",
    "steps_for_tokens",
]
