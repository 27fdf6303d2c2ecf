"""`lutq data prepare` / lutq.data.tokens: flat token files with EOS between documents and a checked meta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lutq.cli import app
from lutq.core.errors import LutqError
from lutq.data import document_splits
from lutq.data.tokens import TokenData, load_tokenizer, meta_path, prepare_tokens
from lutq.testing import require_asset, tiny_tokenizer

TEXTS = ["First document, with a comma.", "Second one\nhas two lines.", "third: ünïcode ✓"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    out = []
    for i, text in enumerate(TEXTS):
        f = tmp_path / f"doc{i}.txt"
        f.write_text(text)
        out.append(str(f))
    return out


def _split_at(tokens: np.ndarray, eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in tokens.tolist():
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []  # the file ends with EOS
    return docs


def test_eos_between_documents_and_meta(tok_dir: Path, files: list[str], tmp_path: Path) -> None:
    data = prepare_tokens(str(tok_dir), files, tmp_path / "data.npy", workers=1)
    tok, _ = load_tokenizer(tok_dir)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert data.eos_id == eos and data.tokens.dtype == np.uint16
    # every source's training documents first, then the held-out ones (here doc1.txt hashes into val)
    held_out = [bool(document_splits(f)["val"]) for f in files]
    order = [t for t, h in zip(TEXTS, held_out, strict=True) if not h] + [
        t for t, h in zip(TEXTS, held_out, strict=True) if h
    ]
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in order]
    assert _split_at(np.asarray(data.tokens), eos) == expected
    m = json.loads(meta_path(tmp_path / "data.npy").read_text())
    assert m["format"] == "lutq-tokens" and m["format_version"] == 1
    assert m["tokens"] == sum(len(e) + 1 for e in expected) and m["documents"] == 3
    assert m["vocab_size"] == len(tok) and m["dtype"] == "uint16" and m["sources"] == files
    assert m["tokenizer"] == str(tok_dir.resolve()) and len(m["tokenizer_fingerprint"]) == 64
    assert data.load_tokenizer().convert_ids_to_tokens(eos) == "<|endoftext|>"
    assert not list(tmp_path.glob(".data.npy*"))  # no temporary left behind


def test_heldout_documents_form_the_tail_and_workers_agree(tok_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"d{i:02d}.txt").write_text(f"document number {i} " * (i % 5 + 1))
    one = prepare_tokens(str(tok_dir), [str(corpus)], tmp_path / "one.npy", workers=1)
    two = prepare_tokens(str(tok_dir), [str(corpus)], tmp_path / "two.npy", workers=2)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(two.tokens))
    tok, _ = load_tokenizer(tok_dir)
    val = document_splits(str(corpus))["val"]
    assert val
    tail = sum(len(tok(d.text, add_special_tokens=False)["input_ids"]) + 1 for d in val)
    assert one.meta["heldout_tail_tokens"] == tail
    docs = _split_at(np.asarray(one.tokens[-tail:]), one.eos_id)
    assert [tok.decode(d) for d in docs] == [d.text for d in val]


def test_max_tokens_cuts_exactly(tok_dir: Path, files: list[str], tmp_path: Path) -> None:
    data = prepare_tokens(str(tok_dir), files, tmp_path / "cut.npy", max_tokens=40, workers=1)
    assert len(data) == 40 and data.meta["truncated"] is True and data.meta["tokens"] == 40


def test_uint32_for_large_vocabularies(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<|endoftext|>": 70_001}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(
        tmp_path / "big"
    )
    (tmp_path / "a.txt").write_text("w1 w69999 w5")
    data = prepare_tokens(str(tmp_path / "big"), [str(tmp_path / "a.txt")], tmp_path / "big.npy", workers=1)
    assert data.tokens.dtype == np.uint32
    assert data.tokens.tolist() == [1, 69_999, 5, 70_001]


def test_meta_mismatches_are_refused(tok_dir: Path, files: list[str], tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    prepare_tokens(str(tok_dir), files, path, workers=1)
    tokens = np.load(path)
    meta = meta_path(path)
    good = meta.read_text()

    np.save(path, tokens[:-3])
    with pytest.raises(LutqError, match=r"tokens, but d\.npy\.meta\.json says .*truncated"):
        TokenData.open(path)
    np.save(path, tokens.astype(np.uint32))
    with pytest.raises(LutqError, match="dtype uint32, but d.npy.meta.json says uint16"):
        TokenData.open(path)
    np.save(path, tokens)
    meta.write_text(good.replace('"lutq-tokens"', '"other"'))
    with pytest.raises(LutqError, match="not a lutq token meta"):
        TokenData.open(path)
    meta.write_text("{not json")
    with pytest.raises(LutqError, match="invalid JSON"):
        TokenData.open(path)
    meta.unlink()
    with pytest.raises(LutqError, match="missing; a token file needs its meta"):
        TokenData.open(path)
    meta.write_text(good)
    assert len(TokenData.open(path)) == len(tokens)


def test_bad_inputs_are_clear_errors(tok_dir: Path, files: list[str], tmp_path: Path) -> None:
    with pytest.raises(LutqError, match="must end in .npy"):
        prepare_tokens(str(tok_dir), files, tmp_path / "x.bin")
    with pytest.raises(LutqError, match="not 'gpt2', not a model asset"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(LutqError, match="is a text corpus, not a model"):
        load_tokenizer("bible")
    with pytest.raises(LutqError, match="unknown data source"):
        prepare_tokens(str(tok_dir), ["no-such-corpus"], tmp_path / "x.npy")


def test_cli_data_prepare(tok_dir: Path, files: list[str], tmp_path: Path) -> None:
    out = tmp_path / "cli.npy"
    res = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            "--tokenizer",
            str(tok_dir),
            "--source",
            files[0],
            "--source",
            f"{files[1]}",
            "--tokens",
            "0.02K",
            "--out",
            str(out),
            "--workers",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    data = TokenData.open(out)
    assert len(data) == 20 and data.meta["sources"] == files[:2]


@pytest.mark.slow
def test_gpt2_tokenizer_is_built_offline_and_matches_tiktoken(tmp_path: Path) -> None:
    """Builds $LUTQ_HOME/tokenizers/gpt2 from the pinned openai-whisper sdist on first use."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    from lutq.data.tokens import GPT2_TIKTOKEN_SHA256, gpt2_tokenizer_dir

    tok, name = load_tokenizer("gpt2")
    assert name == "gpt2" and len(tok) == 50257
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        special_tokens={"<|endoftext|>": 50256},
        mergeable_ranks=load_tiktoken_bpe(
            str(gpt2_tokenizer_dir() / "gpt2.tiktoken"), expected_hash=GPT2_TIKTOKEN_SHA256
        ),
    )
    text = "To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind — 1603"
    assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text)
    (tmp_path / "a.txt").write_text(text)
    data = prepare_tokens("gpt2", [str(tmp_path / "a.txt")], tmp_path / "g.npy", workers=1)
    assert data.tokens.tolist() == [*enc.encode_ordinary(text), 50256] and data.tokens.dtype == np.uint16


@pytest.mark.slow
def test_smollm2_tokenizer_separates_with_endoftext(tmp_path: Path) -> None:
    require_asset("smollm2-135m-instruct")
    (tmp_path / "a.txt").write_text("Hello there.")
    data = prepare_tokens("smollm2-135m-instruct", [str(tmp_path / "a.txt")], tmp_path / "s.npy", workers=1)
    assert data.meta["eos_token"] == "<|endoftext|>" and data.tokens[-1] == data.eos_id
    assert data.meta["vocab_size"] == 49152 and data.meta["tokenizer"] == "smollm2-135m-instruct"
