"""Import a Hugging Face ``transformers`` causal LM (GPT-2 or Llama layout) as a nanogpt4 checkpoint.

The inverse of ``hf_export``: a ``GPT2LMHeadModel`` (GPT-2's own weights included: their tanh GELU is
``model.mlp=gelu_tanh``) or a ``LlamaForCausalLM`` becomes a checkpoint directory (``model.safetensors``,
``config.yaml``, ``tokenizer.json``) that every stage reads: ``sample``, ``sft``/``rlhf``/``dpo
--pretrained``, ``multimodal --pretrained``, ``export-hf``. Only a local directory, or a model already in the
Hugging Face cache, is read: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from nanogpt4.config import to_yaml, with_weights_model
from nanogpt4.errors import UserError
from nanogpt4.model.hf_layout import from_hf_tensors, hf_layout
from nanogpt4.model.transformer import Transformer

GPT2_GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _refuse(what: str) -> UserError:
    return UserError(f"import-hf cannot hold this model: {what}; nanogpt4 imports GPT-2 and Llama layouts")


def model_settings(hf_cfg) -> dict:
    """Our ``model.*`` for a ``transformers`` config, refusing what our Transformer would compute otherwise."""
    kind = getattr(hf_cfg, "model_type", None)
    if kind == "gpt2":
        act = hf_cfg.activation_function
        if act not in GPT2_GELUS:
            raise _refuse(f"activation_function={act!r}")
        if not hf_cfg.scale_attn_weights or hf_cfg.scale_attn_by_inverse_layer_idx:
            raise _refuse("attention scores not scaled by 1/sqrt(head_dim) alone")
        return {"dim": hf_cfg.n_embd, "n_layers": hf_cfg.n_layer, "n_heads": hf_cfg.n_head, "n_kv_heads": None,
                "vocab_size": hf_cfg.vocab_size, "max_seq_len": hf_cfg.n_positions, "bias": True,
                "pos_embedding": "learned", "norm": "layernorm", "mlp": GPT2_GELUS[act],
                "mlp_hidden": hf_cfg.n_inner or 4 * hf_cfg.n_embd, "norm_eps": hf_cfg.layer_norm_epsilon,
                "tie_embeddings": bool(hf_cfg.tie_word_embeddings), "parametrization": "sp"}
    if kind == "llama":
        if hf_cfg.hidden_act != "silu":
            raise _refuse(f"hidden_act={hf_cfg.hidden_act!r}")
        rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        if head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
            raise _refuse(f"head_dim {head_dim} x {hf_cfg.num_attention_heads} heads != hidden_size "
                          f"{hf_cfg.hidden_size}")
        if bool(hf_cfg.attention_bias) != bool(getattr(hf_cfg, "mlp_bias", False)):
            raise _refuse("biases in attention but not in the MLP (or the reverse)")
        theta = getattr(hf_cfg, "rope_theta", None) or rope.get("rope_theta", 10000.0)
        return {"dim": hf_cfg.hidden_size, "n_layers": hf_cfg.num_hidden_layers,
                "n_heads": hf_cfg.num_attention_heads, "n_kv_heads": hf_cfg.num_key_value_heads,
                "vocab_size": hf_cfg.vocab_size, "max_seq_len": hf_cfg.max_position_embeddings,
                "bias": bool(hf_cfg.attention_bias), "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                "mlp_hidden": hf_cfg.intermediate_size, "rope_theta": float(theta),
                "norm_eps": hf_cfg.rms_norm_eps, "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
                "parametrization": "sp"}
    raise _refuse(f"model_type {kind!r}")


def from_hf(hf_model, cfg: DictConfig) -> tuple[Transformer, DictConfig]:
    """Our Transformer holding ``hf_model``'s weights, and ``cfg`` with its ``model`` section set to match
    (``model.dropout`` kept: weights do not fix it). The logits are checked against the model's own."""
    settings = model_settings(hf_model.config)
    new_cfg = with_weights_model(cfg, settings)
    model = Transformer(new_cfg).eval()
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    arch = "gpt2" if settings["pos_embedding"] == "learned" else "llama"
    state = from_hf_tensors(sd, hf_layout(arch, settings["n_layers"], settings["bias"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and new_cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF import mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    check_logits(hf_model, model)
    return model, new_cfg


def check_logits(hf_model, model: Transformer, atol: float = 1e-3) -> float:
    """The largest logit difference on a few random tokens, which must stay within ``atol`` (fp32)."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, min(16, model.cfg.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))
    hf_model = hf_model.float().eval()
    with torch.no_grad():
        diff = (hf_model(ids).logits - model(ids)).abs().max().item()
    if not diff <= atol:
        raise UserError(f"the imported model's logits differ from the transformers model's by {diff:.3g} (over "
                        f"{atol:g}): its layout has a feature nanogpt4 does not compute; nothing was written")
    return diff


def load_hf(source: str | Path):
    """(transformers model, its tokenizer or None) from a local directory or the Hugging Face cache."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("import-hf needs transformers: pip install 'nanogpt4[hf]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar, for a load that takes a second
    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"'{source}' has no config.json: give a transformers model directory (what "
                        f"save_pretrained or export-hf writes)")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as e:
        if not path.exists():
            raise UserError(f"'{source}' is neither a directory nor a model in the Hugging Face cache (nothing is "
                            f"downloaded; fetch it where there is internet: huggingface-cli download "
                            f"{source})") from None
        raise UserError(f"'{source}' could not be loaded by transformers: {str(e).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, TypeError):
        tok = None
    return hf_model, tok


def import_hf(source: str | Path, cfg: DictConfig, out_dir: str | Path) -> dict:
    """Write ``source`` (a transformers model directory or cached name) as a nanogpt4 checkpoint directory."""
    from nanogpt4.train.checkpoint import save_weights
    from nanogpt4.utils import atomic_dir, out_dir_entries

    out = Path(out_dir)
    if out_dir_entries(out):  # (a file there is refused by it)
        raise UserError(f"--out '{out_dir}' is not a new or empty directory; give one (nothing was changed)")
    hf_model, tok = load_hf(source)
    model, new_cfg = from_hf(hf_model, cfg)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.get_vocab_size(with_added_tokens=False) == 0:
        backend = None  # transformers 5 makes an empty GPT-2 tokenizer for a directory without tokenizer files
    with atomic_dir(out.resolve()) as tmp:
        save_weights(model, tmp / "model.safetensors", metadata={"imported_from": str(source)})
        (tmp / "config.yaml").write_text(to_yaml(new_cfg), encoding="utf-8")
        if backend is not None:
            backend.save(str(tmp / "tokenizer.json"))
    c = new_cfg.model
    return {"out": str(out), "source": str(source), "architecture": type(hf_model).__name__,
            "params": model.num_parameters(), "layout": f"{c.pos_embedding}/{c.norm}/{c.mlp}",
            "tokenizer": backend is not None}
