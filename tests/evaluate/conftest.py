"""Evaluate fixtures: tiny FP and q2a4 checkpoints of the same model, and a small text file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lutq.testing import tiny_model, tiny_tokenizer

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(30))


@pytest.fixture(scope="session")
def text() -> str:
    """About 2,000 characters of plain text."""
    return TEXT


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """eval_dir/fp (tiny Qwen3), eval_dir/q2 (the same model, q2a4), eval_dir/text.txt."""
    from lutq.models import save_checkpoint
    from lutq.quant import quantize

    root = tmp_path_factory.mktemp("evaluate")
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    save_checkpoint(root / "fp", model, tok)
    quantize(model, "q2a4", progress=False)
    save_checkpoint(root / "q2", model, tok)
    (root / "text.txt").write_text(TEXT[:600])
    return root


@pytest.fixture(scope="session")
def eval_cache(eval_dir: Path) -> Path:
    """A KD cache (L=32, K=8) of the FP model over 36 small text documents, with a validation split of 6 sequences
    from fewer documents."""
    import json

    from lutq.kd import CacheConfig, build_cache

    with open(eval_dir / "docs.jsonl", "w") as f:
        for i in range(36):  # 50 characters (tokens): a document spans one or two sequences
            f.write(json.dumps({"id": f"doc{i}", "text": TEXT[i * 50 : i * 50 + 50]}) + "\n")
    cfg = CacheConfig(
        model=str(eval_dir / "fp"),
        source=str(eval_dir / "docs.jsonl"),
        thinking="none",
        seq_len=32,
        top_k=8,
        num_sequences=24,
        batch_size=4,
        val_fraction=0.25,
        out=eval_dir / "cache",
    )
    return build_cache(cfg)
