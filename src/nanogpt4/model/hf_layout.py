"""Where our Transformer's weights live in a GPT-2 or Llama ``transformers`` checkpoint.

One table per architecture, read by ``export-hf`` and ``import-hf`` alike, so the two directions cannot drift
apart. An entry is (our name, the ``transformers`` names it is made of, transposed): Llama keeps the fused
q/k/v and gate/up weights as separate matrices (ours stacks them along the output dimension), and GPT-2's
``Conv1D`` stores a linear's weight as (in, out).
"""

from __future__ import annotations

import torch

Entry = tuple[str, tuple[str, ...], bool]

GPT2_NORMS = (("ln1", "ln_1"), ("ln2", "ln_2"))
GPT2_LINEARS = (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("ff.fc", "mlp.c_fc"),
                ("ff.proj", "mlp.c_proj"))
LLAMA_NORMS = (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"))
LLAMA_LINEARS = (("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("attn.proj", ("self_attn.o_proj",)), ("ff.fc", ("mlp.gate_proj", "mlp.up_proj")),
                 ("ff.proj", ("mlp.down_proj",)))


def gpt2_layout(n_layers: int) -> list[Entry]:
    """GPT-2 always has biases: an export of a model without them writes zeros."""
    out: list[Entry] = [("token_embed.weight", ("transformer.wte.weight",), False),
                        ("pos_embed.weight", ("transformer.wpe.weight",), False),
                        ("ln_f.weight", ("transformer.ln_f.weight",), False),
                        ("ln_f.bias", ("transformer.ln_f.bias",), False),
                        ("head.weight", ("lm_head.weight",), False)]
    for i in range(n_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in GPT2_NORMS:
            out += [(f"{p}{ours}.{s}", (f"{h}{theirs}.{s}",), False) for s in ("weight", "bias")]
        for ours, theirs in GPT2_LINEARS:
            out += [(f"{p}{ours}.weight", (f"{h}{theirs}.weight",), True),
                    (f"{p}{ours}.bias", (f"{h}{theirs}.bias",), False)]
    return out


def llama_layout(n_layers: int, bias: bool) -> list[Entry]:
    out: list[Entry] = [("token_embed.weight", ("model.embed_tokens.weight",), False),
                        ("ln_f.weight", ("model.norm.weight",), False),
                        ("head.weight", ("lm_head.weight",), False)]
    for i in range(n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out += [(f"{p}{ours}.weight", (f"{h}{theirs}.weight",), False) for ours, theirs in LLAMA_NORMS]
        for ours, theirs in LLAMA_LINEARS:
            for s in ("weight", "bias") if bias else ("weight",):
                out.append((f"{p}{ours}.{s}", tuple(f"{h}{t}.{s}" for t in theirs), False))
    return out


def hf_layout(arch: str, n_layers: int, bias: bool) -> list[Entry]:
    return gpt2_layout(n_layers) if arch == "gpt2" else llama_layout(n_layers, bias)


def to_hf_tensors(ours: dict[str, torch.Tensor], layout: list[Entry],
                  hf_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our state dict in ``transformers`` names; ``hf_shapes`` (the target model's) says where fused weights
    split and what shape a bias we do not have takes."""
    out = {}
    for name, parts, transposed in layout:
        t = ours.get(name)
        if t is None:  # a bias our model goes without
            t = torch.zeros(sum(hf_shapes[p][0] for p in parts))
        sizes = [hf_shapes[p][-1 if transposed else 0] for p in parts]
        for part, piece in zip(parts, t.split(sizes), strict=True):
            out[part] = (piece.t() if transposed else piece).contiguous()
    return out


def from_hf_tensors(theirs: dict[str, torch.Tensor], layout: list[Entry]) -> dict[str, torch.Tensor]:
    """A ``transformers`` state dict in our names. A name whose parts are absent is left out (a tied
    ``lm_head``), for the loader's missing-key check to judge."""
    out = {}
    for name, parts, transposed in layout:
        if all(p in theirs for p in parts):
            out[name] = torch.cat([theirs[p].t() if transposed else theirs[p] for p in parts]).contiguous()
    return out
