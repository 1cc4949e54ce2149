import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.model.hf_export import export_hf, to_hf
from nanogpt4.model.transformer import Transformer

pytest.importorskip("transformers")

ARCHS = {
    "gpt2": [],
    "gpt2-nobias": ["model.bias=false"],
    "gpt2-tanh": ["model.mlp=gelu_tanh"],
    "gpt2-narrow-mlp": ["model.mlp_hidden=96"],  # GPT2Config's n_inner, not 4 x n_embd
    "llama": ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"],
    "llama-gqa-bias": ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_heads=2"],
    "llama-untied": ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
                     "model.tie_embeddings=false"],
    # µP's 1/d_head attention and logit multiplier folded into the weights (width 64 over a base of 32)
    "gpt2-mup": ["model.parametrization=mup", "model.mup_base_dim=32"],
    "llama-mup-gqa": ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_heads=2",
                      "model.parametrization=mup", "model.mup_base_dim=16"],
}


def trained_like(overrides):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=300",
                               "model.max_seq_len=40", *overrides])
    m = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, as after training, and MLP inputs of order 1, where
        for name, p in m.named_parameters():  # the GELUs' exact and tanh forms part
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("ff.fc.weight", "ff.proj.weight")):
                p.mul_(30)
    return m


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_logits_equal_ours(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    m = trained_like(ARCHS[arch])
    export_hf(m, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "GPT2LMHeadModel" if arch.startswith("gpt2") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, m(x), atol=1e-5)  # (exact and tanh GELU part by ~4e-5 here)
        greedy = hf.generate(x[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, m.generate(x[:, :5], 10, temperature=0))


def test_mixed_layouts_are_refused():
    m = trained_like(["model.pos_embedding=rope"])
    with pytest.raises(UserError, match="export-hf supports"):
        to_hf(m)
