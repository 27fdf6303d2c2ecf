"""`lutq pretrain export RUN --format hf OUT`: a pretrained decoder as a transformers directory.

`baseline` and `gqa` models with RMSNorm, no null slot and no tied Q/K are exactly a Llama: the learned
per-head temperature is folded into the query projection (RoPE is a rotation per head, so scaling q
before or after it is the same), and the 1/√head_dim scaling is Llama's own. Other variants have no
transformers architecture and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lutq.core.atomic import atomic_dir
from lutq.core.console import console
from lutq.core.errors import LutqError
from lutq.pretrain.checkpoint import load_pretrain_checkpoint
from lutq.pretrain.model import GPT, ModelConfig

FORMATS = ("hf",)


def find_checkpoint(path: str | os.PathLike[str], which: str = "best") -> Path:
    """A checkpoint directory from a run directory (`best/`, falling back to `last/`) or a checkpoint itself."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if which not in ("best", "last"):
        raise LutqError(f"--checkpoint {which!r}: choose best or last")
    for name in (which, "last"):
        if (path / name / "config.json").is_file():
            return path / name
    raise LutqError(f"{path}: no checkpoint here (neither a checkpoint directory nor a run with best/ or last/)")


def exportable(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be written as a Llama model, or None when it can."""
    if cfg.variant not in ("baseline", "gqa"):
        return (
            f"variant {cfg.variant!r} has no transformers architecture (only baseline and gqa map onto "
            "LlamaForCausalLM)"
        )
    if cfg.norm != "rmsnorm":
        return f"norm {cfg.norm!r}: Llama uses RMSNorm"
    if cfg.null_attn:
        return "null_attn: Llama attention has no null key/value slot"
    if cfg.tie_qk:
        return "tie_qk: Llama has separate query and key projections"
    return None


def llama_config(cfg: ModelConfig, eos_id: int | None = None, bos_id: int | None = None) -> Any:
    from transformers import LlamaConfig

    head_dim = cfg.attn_dim // cfg.n_heads
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        architectures=["LlamaForCausalLM"],
    )


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our tensors under Llama names, with the per-head temperature folded into q_proj."""
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        a, pre = layer.attn, f"model.layers.{i}."
        q = a.q_proj.weight
        if a.logit_scale is not None:
            q = q * a.logit_scale.exp().repeat_interleave(a.head_dim)[:, None]
        out |= {
            pre + "self_attn.q_proj.weight": q,
            pre + "self_attn.k_proj.weight": a.k_proj.weight,
            pre + "self_attn.v_proj.weight": a.v_proj.weight,
            pre + "self_attn.o_proj.weight": a.o_proj.weight,
            pre + "mlp.gate_proj.weight": layer.mlp.gate_proj.weight,
            pre + "mlp.up_proj.weight": layer.mlp.up_proj.weight,
            pre + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
            pre + "input_layernorm.weight": layer.attn_norm.weight,
            pre + "post_attention_layernorm.weight": layer.mlp_norm.weight,
        }
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def export_hf(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a transformers-loadable LlamaForCausalLM directory (+ tokenizer) for a pretraining run or
    checkpoint. The tokenizer comes from the checkpoint, or from `tokenizer` (gpt2, an asset, a directory)."""
    from transformers import LlamaForCausalLM

    ckpt = find_checkpoint(run, checkpoint)
    model, info = load_pretrain_checkpoint(ckpt)
    reason = exportable(model.config)
    if reason:
        raise LutqError(f"{ckpt}: cannot export to HF format: {reason}")
    tok = _tokenizer(ckpt, tokenizer)
    if len(tok) > model.config.vocab_size:
        raise LutqError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is {model.config.vocab_size}")
    config = llama_config(model.config, eos_id=tok.eos_token_id, bos_id=tok.bos_token_id)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(llama_state_dict(model), strict=False, assign=True)
    hf.tie_weights()
    missing = [k for k, v in hf.state_dict().items() if v.is_meta]
    if missing:
        raise LutqError(f"internal: HF export left tensors unset: {missing[:5]}")
    hf = hf.to(dtype).eval()
    out = Path(out)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    console.print(
        f"[green]exported[/] {ckpt} (step {info.get('extra', {}).get('step', '?')}) -> {out} (LlamaForCausalLM)"
    )
    return out


def _tokenizer(ckpt: Path, spec: str | None) -> Any:
    from lutq.data.tokens import load_tokenizer

    if spec:
        return load_tokenizer(spec)[0]
    if not (ckpt / "tokenizer.json").is_file():
        raise LutqError(f"{ckpt} holds no tokenizer; pass one with --tokenizer (gpt2, an asset or a directory)")
    return load_tokenizer(ckpt)[0]
