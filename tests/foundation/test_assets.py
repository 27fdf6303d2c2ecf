"""Assets: registry, stable document split, tolerant ShareGPT reader, fetched-asset checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lutq.assets import ASSETS, get_asset, load_documents, parse_corpus_spec, verify
from lutq.assets.corpora import (
    Document,
    is_validation,
    normalize_conversation,
    sharegpt_conversations,
    split_documents,
)
from lutq.core import LutqError
from lutq.testing import require_asset


def test_registry_pins_checksums() -> None:
    for asset in ASSETS.values():
        if asset.source.registry != "apt":  # apt verifies .debs against the signed index itself
            assert asset.source.sha256 and len(asset.source.sha256) == 64
    with pytest.raises(LutqError, match="unknown asset"):
        get_asset("nope")


def test_split_is_stable_and_by_whole_document() -> None:
    docs = [Document(id=f"doc{i}", text="x" * i) for i in range(200)]
    a = split_documents(docs, 0.1)
    b = split_documents(list(reversed(docs)), 0.1)
    assert {d.id for d in a["val"]} == {d.id for d in b["val"]}
    assert 5 < len(a["val"]) < 40
    assert not {d.id for d in a["val"]} & {d.id for d in a["train"]}
    assert all(is_validation(d.id, 0.1) for d in a["val"])


def test_split_always_holds_out_one_document() -> None:
    docs = [Document(id="a", text="1"), Document(id="b", text="2")]
    assert len(split_documents(docs, 1e-9)["val"]) == 1


def test_sharegpt_reader_tolerates_truncation(tmp_path: Path) -> None:
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(3)
    ]
    text = json.dumps(records)
    truncated = text[: text.rindex("{") + 10]  # cut inside the last record
    (tmp_path / "s.json").write_text(truncated)
    got = list(sharegpt_conversations(tmp_path / "s.json"))
    assert [r["id"] for r in got] == ["0", "1"]


def test_normalize_conversation() -> None:
    turns = [
        {"from": "system", "value": "be nice"},
        {"from": "gpt", "value": "hi"},  # assistant before user: dropped
        {"from": "human", "value": "q"},
        {"from": "gpt", "value": "a"},
        {"from": "human", "value": "dangling"},
    ]
    assert normalize_conversation(turns) == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}, "and answer"],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": None},
    ]
    assert normalize_conversation(parts) == [  # OpenAI-style parts: the text kept, images left out
        {"role": "user", "content": "look\nand answer"},
        {"role": "assistant", "content": "a cat"},
    ]


def test_corpus_spec() -> None:
    assert parse_corpus_spec("bible:val") == ("bible", "val")
    assert parse_corpus_spec("bible") == ("bible", None)
    with pytest.raises(LutqError):
        parse_corpus_spec("bible:test")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shakespeare", "bible", "python-docs", "sharegpt"])
def test_fetched_corpora(name: str) -> None:
    require_asset(name)
    assert verify(name) == []
    train, val = load_documents(name, "train"), load_documents(f"{name}:val")
    assert train and val
    assert not {d.id for d in train} & {d.id for d in val}
    if get_asset(name).kind == "chat":
        assert all(d.messages and d.messages[-1]["role"] == "assistant" for d in val)
    else:
        assert all(d.text for d in val)


@pytest.mark.slow
def test_teacher_asset_checksums() -> None:
    require_asset("smollm2-135m-instruct")
    assert verify("smollm2-135m-instruct") == []


def test_verify_detects_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUTQ_HOME", str(tmp_path))
    from lutq.assets.fetch import MANIFEST, asset_path
    from lutq.core.atomic import sha256_file

    root = asset_path("bible", must_exist=False)
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text('{"id": "a", "text": "x"}\n')
    (root / MANIFEST).write_text(json.dumps({"files": {"train.jsonl": sha256_file(root / "train.jsonl")}}))
    assert verify("bible") == []
    (root / "train.jsonl").write_text('{"id": "a", "text": "y"}\n')
    assert "sha256 mismatch" in verify("bible")[0]
    from typer.testing import CliRunner

    from lutq.cli import app
    from lutq.core.errors import LutqError

    result = CliRunner().invoke(app, ["assets", "verify"])  # the error names the asset to fetch again
    assert isinstance(result.exception, LutqError)
    assert "1 file(s) failed verification in bible; re-run: lutq assets fetch --force bible" in str(result.exception)


def test_missing_asset_error_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUTQ_HOME", str(tmp_path))
    with pytest.raises(LutqError, match="lutq assets fetch bible"):
        load_documents("bible")
