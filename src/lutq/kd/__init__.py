"""Knowledge distillation from a cached teacher: the top-K cache (writer, reader, verify, bench) and the
KD loss with its metrics."""

from lutq.core.lazy import lazy_exports

_EXPORTS = {
    "bench_cache": "lutq.kd.bench",
    "CacheConfig": "lutq.kd.cache",
    "build_cache": "lutq.kd.cache",
    "cache_name": "lutq.kd.cache",
    "finalize_cache": "lutq.kd.cache",
    "teacher_targets": "lutq.kd.cache",
    "write_shards": "lutq.kd.cache",
    "KDLossConfig": "lutq.kd.loss",
    "KDLossOutput": "lutq.kd.loss",
    "KDStudent": "lutq.kd.loss",
    "evaluate_kd": "lutq.kd.loss",
    "kd_loss": "lutq.kd.loss",
    "student_hidden": "lutq.kd.loss",
    "KDCache": "lutq.kd.reader",
    "verify_cache": "lutq.kd.verify",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
