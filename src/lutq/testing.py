"""Tiny random-weight models of the real architectures (Qwen3, Llama, Gemma 3) and a byte-level
tokenizer with a Qwen3-style chat template, for fast tests that need no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_ARCHITECTURES = ("qwen3", "llama", "gemma3")

# ChatML like Qwen3: `enable_thinking=False` pre-fills an empty think block after the generation prompt,
# and assistant turns may carry a <think> block.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false -%}<think>\n\n</think>\n\n{%- endif -%}"
    "{%- endif -%}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (256 byte tokens, no merges, 3 special tokens), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_config(
    arch: str = "qwen3",
    *,
    vocab_size: int = 320,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
) -> Any:
    """Config of a tiny model of `arch`; dimensions are multiples of 32 so group-32 scale init applies."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>") + 256,
        pad_token_id=256,
    )
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, architectures=["Qwen3ForCausalLM"])
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, sliding_window=64, architectures=["Gemma3ForCausalLM"])
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")


def tiny_model(arch: str = "qwen3", seed: int = 0, **config_kw: Any) -> torch.nn.Module:
    """A tiny random-init causal LM of `arch` in eval mode (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kw), dtype=torch.float32)
    return model.eval()


def sharp_tiny_teacher() -> torch.nn.Module:
    """A tiny random Llama whose next-token distributions are peaked but not trivial (entropy ~2 nats),
    so KD has something to learn: larger layer weights and a scaled final norm."""
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(24.0)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.mul_(3.0)
    return model


WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jolly",
    "bakers",
    "and",
    "bright",
    "vixens",
    "climb",
    "past",
    "eight",
    "humble",
)


def write_teacher_and_docs(root: Path, num_docs: int = 60, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Write `root/teacher` (the sharp tiny teacher with the tiny tokenizer, an HF directory) and
    `root/docs.jsonl` (`num_docs` plain texts of 10-40 random words), the inputs of a tiny KD cache;
    returns the (teacher, tokenizer) written."""
    import json
    import random

    model, tok = sharp_tiny_teacher(), tiny_tokenizer()
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    rng = random.Random(seed)
    with (root / "docs.jsonl").open("w") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))}) + "\n")
    return model, tok


# A tiny `lutq pretrain` run (PretrainConfig fields): a 2-layer d32 model, 6 steps of 2 x 2 x 16 tokens on the CPU.
TINY_PRETRAIN: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 64,
    "seq_len": 16,
    "micro_batch": 2,
    "grad_accum": 2,
    "steps": 6,
    "warmup": 2,
    "lr": 1e-2,
    "eval_every": 3,
    "eval_iters": 2,
    "log_every": 1,
    "save_every": 0,
    "sample_tokens": 0,
    "seed": 7,
    "device": "cpu",
    "compile": False,
}


def tiny_cache_config(root: Path, **settings: Any) -> Any:
    """The CacheConfig of a tiny KD cache `root/cache` of `root/teacher` over `root/docs.jsonl` (see
    `write_teacher_and_docs`): plain text, L=32, K=8, 48 sequences, 10 % held out, on the CPU; `settings`
    override any field."""
    from lutq.kd import CacheConfig

    base: dict[str, Any] = {
        "model": str(root / "teacher"),
        "source": str(root / "docs.jsonl"),
        "thinking": "none",
        "seq_len": 32,
        "top_k": 8,
        "num_sequences": 48,
        "val_fraction": 0.1,
        "batch_size": 8,
        "device": "cpu",
        "out": root / "cache",
    }
    return CacheConfig(**{**base, **settings})


def tiny_cache(
    root: Path, *, num_docs: int = 60, teacher: tuple[torch.nn.Module, Any] | None = None, **settings: Any
) -> Path:
    """Build the tiny KD cache of `tiny_cache_config(root, **settings)`; writes the teacher and documents first
    (`write_teacher_and_docs(root, num_docs)`) unless `root/teacher` exists. Returns the cache directory."""
    from lutq.kd import build_cache

    if not (root / "teacher").is_dir():
        teacher = write_teacher_and_docs(root, num_docs)
    return build_cache(tiny_cache_config(root, **settings), teacher=teacher)


def require_asset(name: str) -> None:
    """In tests: skip (naming the command to run) when an asset has not been fetched."""
    import pytest

    from lutq.assets import is_fetched

    if not is_fetched(name):
        pytest.skip(f"asset {name!r} not fetched; run `lutq assets fetch {name}` (make test does)")


def dead_pid() -> int:
    """The id of a process that has exited and been reaped (to fake what a killed lutq process left)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # no process has it now (pids are not reused this quickly)
