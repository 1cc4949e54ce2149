"""µP (model.parametrization=mup): the coordinate check, and what µP must leave unchanged."""

import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.model.transformer import Transformer

WIDTHS = (32, 64, 128, 256)


def model(width: int, parametrization: str, **extra) -> Transformer:
    over = {"model.dim": width, "model.n_layers": 2, "model.n_heads": width // 16, "model.vocab_size": 256,
            "model.max_seq_len": 32, "model.parametrization": parametrization, "model.mup_base_dim": 32, **extra}
    torch.manual_seed(0)
    return Transformer(load_config("tiny", [f"{k}={v}" for k, v in over.items()]))


def block_outputs(m: Transformer, x: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: out.append(o.detach())) for b in m.blocks]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return out


def coordinate_check(parametrization: str, steps: int = 4, lr: float = 1e-2) -> dict[int, float]:
    """Mean |change| of the residual-stream coordinates after a few Adam steps, per width (Yang et al.'s check:
    under µP it stays flat as the model widens, under the standard parametrization it grows)."""
    x = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    result = {}
    for width in WIDTHS:
        m = model(width, parametrization)
        opt = m.configure_optimizers(0.0, lr)
        before = block_outputs(m, x)
        for _ in range(steps):
            m(x, labels=x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        after = block_outputs(m, x)
        result[width] = max((b - a).abs().mean().item() for a, b in zip(before, after, strict=True))
    return result


def test_coordinate_check_mup_is_flat_and_sp_is_not():
    mup, sp = coordinate_check("mup"), coordinate_check("sp")
    assert max(mup.values()) / min(mup.values()) < 2.0, mup
    assert sp[WIDTHS[-1]] / sp[WIDTHS[0]] > 10.0, sp  # the check can tell the two apart


def test_mup_optimizer_groups_scale_hidden_learning_rates():
    m = model(128, "mup")
    opt = m.configure_optimizers(0.1, 1e-3)
    embeddings = {id(m.token_embed.weight), id(m.pos_embed.weight)}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & embeddings or all(p.dim() < 2 for p in group["params"]):
            assert group["lr"] == pytest.approx(1e-3)  # embeddings, norms and biases: width-independent
        else:
            assert group["lr"] == pytest.approx(1e-3 * 32 / 128) and group["lr_scale"] == pytest.approx(0.25)
    assert m.blocks[0].attn.scale == pytest.approx(1 / 16)


def test_mup_keeps_causality_and_the_cache():
    m = model(64, "mup").eval()
    x = torch.randint(0, 256, (2, 24))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :12], m(y)[:, :12])
        assert torch.equal(m.generate(x[:, :8], 12, temperature=0), m.generate(x[:, :8], 12, temperature=0,
                                                                                 use_cache=False))

