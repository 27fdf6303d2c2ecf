"""KD fixtures: a tiny teacher saved as an HF directory, a small chat source, and a cache built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lutq.kd import CacheConfig, build_cache
from lutq.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def kd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 teacher in kd_dir/'teacher' and a ShareGPT-style source kd_dir/'chat.jsonl'."""
    root = tmp_path_factory.mktemp("kd")
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    with open(root / "chat.jsonl", "w") as f:
        for i in range(40):
            f.write(
                json.dumps(
                    {
                        "id": f"conv{i}",
                        "conversations": [
                            {"from": "human", "value": f"question {i}: " + "why? " * (i % 5 + 1)},
                            {"from": "gpt", "value": f"<think>thinking about {i}</think>answer {i} " * 3},
                        ],
                    }
                )
                + "\n"
            )
    return root


@pytest.fixture(scope="session")
def kd_cfg(kd_dir: Path) -> CacheConfig:
    """L=32, K=8, R=4, 20 sequences (19 train + 1 val) in shards of 6."""
    return CacheConfig(
        model=str(kd_dir / "teacher"),
        source=str(kd_dir / "chat.jsonl"),
        seq_len=32,
        top_k=8,
        negatives=4,
        num_sequences=20,
        batch_size=4,
        shard_size=6,
        val_fraction=0.05,
        out=kd_dir / "cache",
    )


@pytest.fixture(scope="session")
def kd_teacher(kd_dir: Path):
    """(model, tokenizer) of the tiny teacher, as loaded from its directory."""
    from lutq.models import load_model

    return load_model(kd_dir / "teacher")


@pytest.fixture(scope="session")
def kd_cache(kd_cfg: CacheConfig, kd_teacher) -> Path:
    """The finished reference cache (treat as read-only)."""
    return build_cache(kd_cfg, kd_teacher)
