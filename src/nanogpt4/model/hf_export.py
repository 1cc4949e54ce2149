"""Export a nanogpt4 checkpoint as a Hugging Face ``transformers`` model directory.

GPT-2-shaped models (learned positions, LayerNorm, GELU) become ``GPT2LMHeadModel``; Llama-shaped ones
(RoPE, RMSNorm, SwiGLU) become ``LlamaForCausalLM``. Other mixtures have no ``transformers`` twin and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanogpt4.data.tokenizer import CHAT_TEMPLATE, END, BPETokenizer, Tokenizer
from nanogpt4.errors import UserError
from nanogpt4.model.hf_layout import hf_layout, to_hf_tensors
from nanogpt4.model.transformer import Transformer
from nanogpt4.utils import atomic_dir, some_names


def hf_architecture(model: Transformer) -> str:
    c = model.cfg
    if c.pos_embedding == "learned" and c.norm == "layernorm" and c.mlp in ("gelu", "gelu_tanh") and \
            (c.n_kv_heads or c.n_heads) == c.n_heads:
        return "gpt2"
    if c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu":
        return "llama"
    raise UserError(f"export-hf supports GPT-2 (learned/layernorm/gelu or gelu_tanh, no GQA) and Llama "
                    f"(rope/rmsnorm/swiglu) layouts; this model is {c.pos_embedding}/{c.norm}/{c.mlp}")


def exported_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights with µP's two forward-pass differences folded in, which no ``transformers`` config
    field holds: attention scores scaled by 1/d_head (the queries' weights and biases times d_head**-0.5, on top
    of the standard 1/sqrt(d_head)) and the logits' 1/width_mult (the final norm's weight and bias times it)."""
    sd = dict(model.state_dict())
    if model.cfg.parametrization != "mup":
        return sd
    c, attn = model.cfg, model.blocks[0].attn
    queries = attn.n_heads * attn.head_dim
    for i in range(c.n_layers):
        for suffix in ("weight", "bias"):
            name = f"blocks.{i}.attn.qkv.{suffix}"
            if name in sd:
                folded = sd[name].clone()
                folded[:queries] *= attn.head_dim ** -0.5
                sd[name] = folded
    for suffix in ("weight", "bias"):
        if f"ln_f.{suffix}" in sd:
            sd[f"ln_f.{suffix}"] = sd[f"ln_f.{suffix}"] / model.width_mult
    return sd


def _gpt2_model(c, special: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.dim, n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=c.mlp_hidden,  # None: GPT-2's 4 x n_embd
        layer_norm_epsilon=c.norm_eps, activation_function="gelu_pytorch_tanh" if c.mlp == "gelu_tanh" else "gelu",
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_embeddings,
        **special))


def _llama_model(model: Transformer, special: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=model.blocks[0].ff.proj.in_features,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads or c.n_heads,
        head_dim=c.dim // c.n_heads, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, attention_bias=c.bias, mlp_bias=c.bias, hidden_act="silu",
        tie_word_embeddings=c.tie_embeddings, attention_dropout=c.dropout, **special))


def to_hf(model: Transformer, tokenizer: Tokenizer | None = None):
    """An equivalent ``transformers`` model (in memory)."""
    arch = hf_architecture(model)  # first: a model no architecture can hold is refused whatever is installed
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("export-hf needs transformers: pip install 'nanogpt4[hf]'") from None
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.doc_start_id, "eos_token_id": tokenizer.eot_id,
                   "pad_token_id": tokenizer.pad_id}
    hf_model = _gpt2_model(model.cfg, special) if arch == "gpt2" else _llama_model(model, special)
    hf_shapes = {k: v.shape for k, v in hf_model.state_dict().items()}
    tensors = to_hf_tensors(exported_state_dict(model), hf_layout(arch, model.cfg.n_layers, model.cfg.bias),
                            hf_shapes)
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"HF export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files to ``out_dir`` atomically."""
    out = Path(out_dir)
    hf_model = to_hf(model, tokenizer)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out_dir}' is a file; give a directory for the model")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():  # not an earlier export
        _refuse_to_replace(out_dir, sorted(p.name for p in out.iterdir()))
    # resolved: '.' has no name to put a temp directory beside, and a link to an earlier export stays a link to it
    end_id = tokenizer.token_id(END) if tokenizer is not None else None
    if end_id is not None:  # generate() ends a chat reply at its <|end|>, as `nanogpt4 sample --chat` does
        hf_model.generation_config.eos_token_id = [tokenizer.eot_id, end_id]
    with atomic_dir(out.resolve()) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(tokenizer, BPETokenizer):
            from transformers import PreTrainedTokenizerFast

            # its own special tokens by id: an imported Llama's are <s>, </s>, and </s> for padding; naming ours
            # (<|endoftext|>, <|pad|>) there added them as new tokens the model never saw
            name = tokenizer.tok.id_to_token
            fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, bos_token=name(tokenizer.doc_start_id),
                                           eos_token=name(tokenizer.eot_id), pad_token=name(tokenizer.pad_id),
                                           model_max_length=model.cfg.max_seq_len)
            fast.chat_template = CHAT_TEMPLATE  # apply_chat_template writes what `sft --data` trained on
            fast.save_pretrained(tmp)
        # the new directory replaces the old one whole: only an earlier export may be replaced, never a folder
        # holding anything this export does not write again
        other = sorted({p.name for p in out.iterdir()} - {p.name for p in tmp.iterdir()}) if out.is_dir() else []
        if other:
            _refuse_to_replace(out_dir, other)
    return out


def _refuse_to_replace(out_dir, other: list[str]) -> None:
    raise UserError(f"--out '{out_dir}' already holds files an export does not write "
                    f"({some_names(other)}); give a new or empty directory "
                    f"(nothing in it was changed)")
