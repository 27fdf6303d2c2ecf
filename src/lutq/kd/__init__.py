"""Knowledge distillation from a cached teacher: the top-K cache (writer, reader, verify, bench) and the
KD loss with its metrics."""

from lutq.kd.bench import bench_cache
from lutq.kd.cache import CacheConfig, build_cache, cache_name, finalize_cache, teacher_targets, write_shards
from lutq.kd.loss import KDLossConfig, KDLossOutput, KDStudent, evaluate_kd, kd_loss, student_hidden
from lutq.kd.reader import KDCache
from lutq.kd.verify import verify_cache

__all__ = [
    "CacheConfig",
    "KDCache",
    "KDLossConfig",
    "KDLossOutput",
    "KDStudent",
    "bench_cache",
    "build_cache",
    "cache_name",
    "evaluate_kd",
    "finalize_cache",
    "kd_loss",
    "student_hidden",
    "teacher_targets",
    "verify_cache",
    "write_shards",
]
