"""Fixtures of the train tests: a tiny Llama teacher (saved as an HF directory) and a KD cache built
from it with `lutq.kd.build_cache` on a few short generated texts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lutq.testing import tiny_cache


@dataclass
class KDFixture:
    root: Path
    teacher: Path  # HF directory of the tiny teacher (the student is it, quantized)
    cache: Path

    def config(self, out: Path, **changes: Any) -> Any:
        """A TrainConfig for a short run on the tiny cache (no eval unless asked, log every step). The init is
        the plain one (uniform LUTs, nearest rounding) so that short runs have a clear gap to close."""
        from lutq.train.config import TrainConfig

        base = dict(
            cache=self.cache,
            out=out,
            model=str(self.teacher),
            preset="q2a4",
            steps=6,
            batch_size=4,
            lr=1e-2,
            warmup=1,
            log_every=1,
            eval_every=1000,
            eval_batches=0,
            save_every=1000,
            device="cpu",
            init_lut="uniform",
            init_tighten=0,
            init_calib_sequences=0,
        )
        return TrainConfig.from_dict({**base, **changes})


@pytest.fixture(scope="session")
def kd(tmp_path_factory: pytest.TempPathFactory) -> KDFixture:
    root = tmp_path_factory.mktemp("kd")
    cache = tiny_cache(root, num_docs=60, negatives=4, num_sequences=96, batch_size=32)
    return KDFixture(root=root, teacher=root / "teacher", cache=cache)
