"""KD data sources: files, directories, record formats, hf: datasets, the held-out split."""

from __future__ import annotations

import json
import sys
import types

import pytest

from lutq.core import LutqError
from lutq.data import document_splits, load_documents, source_name
from lutq.testing import require_asset


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha\n")
    (tmp_path / "d" / "sub" / "b.txt").write_text("beta")
    (tmp_path / "d" / "skip.md").write_text("not text")
    docs = load_documents(str(tmp_path / "d"))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "alpha\n"), ("sub/b.txt", "beta")]
    one = load_documents(str(tmp_path / "d" / "a.txt"))
    assert len(one) == 1 and one[0].text == "alpha\n" and not one[0].messages


def test_record_formats_detected_per_record(tmp_path):
    path = _jsonl(
        tmp_path / "mix.jsonl",
        [
            {"id": "sg", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            {"instruction": "Add", "input": "2+2", "output": "4"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"text": "plain words"},
            {"conversations": [{"from": "human", "value": "unanswered"}]},  # normalizes to nothing: skipped
        ],
    )
    docs = load_documents(str(path))
    assert [d.id for d in docs] == ["sg", "mix.jsonl:1", "mix.jsonl:2", "mix.jsonl:3", "mix.jsonl:4"]
    assert docs[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [m["role"] for m in docs[1].messages] == ["system", "user", "assistant"]
    assert docs[2].messages == [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert docs[3].messages[0] == {"role": "user", "content": "Say hi"}
    assert docs[4].text == "plain words" and not docs[4].messages


def test_json_array_and_wrapped_array(tmp_path):
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.json").write_text(json.dumps({"data": recs}))
    a, b = load_documents(str(tmp_path / "a.json")), load_documents(str(tmp_path / "b.json"))
    assert [d.messages for d in a] == [d.messages for d in b]
    assert a[2].messages[1]["content"] == "a2"


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"foo": 1}\n')
    with pytest.raises(LutqError, match=r"bad\.jsonl:2: unrecognized record with keys \['foo'\]"):
        load_documents(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LutqError, match=r"broken\.jsonl:2: not valid JSON"):
        load_documents(str(broken))
    with pytest.raises(LutqError, match="unknown data source 'nope-nothing'"):
        load_documents("nope-nothing")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LutqError, match="unsupported file type '.csv'"):
        load_documents(str(tmp_path / "x.csv"))


def test_file_split_suffix_is_whole_document_split(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"id": f"doc{i}", "text": f"text {i}"} for i in range(60)])
    train = load_documents(f"{path}:train", val_fraction=0.2)
    val = load_documents(f"{path}:val", val_fraction=0.2)
    assert {d.id for d in train} | {d.id for d in val} == {f"doc{i}" for i in range(60)}
    assert not {d.id for d in train} & {d.id for d in val}
    assert 3 <= len(val) <= 25
    splits = document_splits(str(path), 0.2)
    assert [d.id for d in splits["val"]] == [d.id for d in val]


def test_a_single_book_file_is_held_out_by_sections(tmp_path):
    # one .txt file is one document: before, its val split was empty (a KD cache warned, eval had nothing)
    book = tmp_path / "book.txt"
    text = "\n\n".join(f"Chapter {i}. " + "The quick brown fox jumps. " * 40 for i in range(120))
    book.write_text(text)
    split = document_splits(str(book), 0.1)
    assert split["val"] and split["train"]
    ids = [d.id for d in split["train"] + split["val"]]
    assert len(set(ids)) == len(ids) and all(i.startswith("book.txt#") for i in ids)
    pieces = sorted(split["train"] + split["val"], key=lambda d: d.id)
    assert "\n\n".join(d.text for d in pieces) == text  # sections of the book, nothing lost or repeated
    assert [d.text for d in load_documents(f"{book}:val", val_fraction=0.1)] == [d.text for d in split["val"]]
    assert len(load_documents(str(book))) == 1  # the whole file is still one document


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(LutqError, match=r"'hf:org/thing' needs the `datasets` package"):
        load_documents("hf:org/thing")


def test_hf_source_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [
            {"instruction": "q", "input": "", "output": "a"},
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        ]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = load_documents("hf:tatsu-lab/alpaca:test")
    assert calls == [("tatsu-lab/alpaca", "test")]
    assert [d.messages[-1]["content"] for d in docs] == ["a", "y"]
    load_documents("hf:tatsu-lab/alpaca")
    assert calls[-1] == ("tatsu-lab/alpaca", "train")


def test_source_name():
    assert source_name("sharegpt") == "sharegpt"
    assert source_name("/data/my notes.jsonl") == "my-notes"
    assert source_name("hf:tatsu-lab/alpaca:train") == "alpaca"
    assert source_name("/corpus/dir") == "dir"


@pytest.mark.slow
def test_asset_source_uses_the_asset_split():
    require_asset("shakespeare")
    splits = document_splits("shakespeare")
    assert splits["val"] and splits["train"]
    assert [d.id for d in splits["val"]] == [d.id for d in load_documents("shakespeare:val")]
