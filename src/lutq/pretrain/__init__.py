"""Pretraining: a GPT-style decoder with attention variants, the token-budget planner, the trainer
(`pretrain(cfg)`), throughput benchmark and HF export. Token files come from `lutq.data.tokens`."""

from lutq.core.lazy import lazy_exports

_EXPORTS = {
    "bench_pretrain": "lutq.pretrain.bench",
    "GPU_MEM_PRESETS": "lutq.pretrain.config",
    "Plan": "lutq.pretrain.config",
    "PretrainConfig": "lutq.pretrain.config",
    "make_plan": "lutq.pretrain.config",
    "export_hf": "lutq.pretrain.export",
    "GPT": "lutq.pretrain.model",
    "SIZES": "lutq.pretrain.model",
    "VARIANTS": "lutq.pretrain.model",
    "ModelConfig": "lutq.pretrain.model",
    "count_params": "lutq.pretrain.model",
    "flops_per_token": "lutq.pretrain.model",
    "params_of": "lutq.pretrain.model",
    "parse_count": "lutq.pretrain.schedule",
    "parse_seq_schedule": "lutq.pretrain.schedule",
    "planned_tokens": "lutq.pretrain.schedule",
    "seq_len_for_step": "lutq.pretrain.schedule",
    "steps_for_tokens": "lutq.pretrain.schedule",
    "load_run_config": "lutq.pretrain.train",
    "pretrain": "lutq.pretrain.train",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
