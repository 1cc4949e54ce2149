"""The fast paths (fused head + loss, CPU matmul attention) against PyTorch's reference ops."""

import pytest
import torch
import torch.nn.functional as F

from nanogpt4.model import losses, transformer
from nanogpt4.model.losses import linear_cross_entropy
from nanogpt4.model.transformer import attention_mask_4d, matmul_attention


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("chunk", [1 << 20, 97 * 7])  # one chunk, and several uneven chunks
def test_linear_cross_entropy_matches_reference(chunk, keep, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(losses, "keeps_logits", lambda dtype, device_type: keep)
    torch.manual_seed(0)
    h = torch.randn(3, 40, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    y = torch.randint(0, 97, (3, 40))
    y[0, :9] = -100
    ours = linear_cross_entropy(h, w, y)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten(), ignore_index=-100)
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast():
    torch.manual_seed(0)
    h = torch.randn(256, 64, requires_grad=True)
    w = (torch.randn(500, 64) * 0.1).requires_grad_()
    y = torch.randint(0, 500, (256,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, y)
        ref = F.cross_entropy((h @ w.t()).float(), y)
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) < 1e-3
    (g_ours,) = torch.autograd.grad(ours, w)
    (g_ref,) = torch.autograd.grad(ref, w)
    assert g_ours.dtype == torch.float32
    assert (g_ours - g_ref).abs().max() < 0.02 * g_ref.abs().max()


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])  # recomputed: CUDA's bf16 path
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("chunk", [1 << 20, 200 * 7])
def test_bf16_logit_gradient_is_rounded_once(chunk, sign, keep, monkeypatch):
    """With h = identity, grad W^T is exactly the bf16 gradient of the logits, so it can be checked entry by
    entry against (softmax - onehot) / N computed in float64 from the same bf16 logits: every entry, including
    the label entries of a confident model where softmax and onehot nearly cancel, within one bf16 rounding."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(losses, "keeps_logits", lambda dtype, device_type: keep)
    torch.manual_seed(0)
    n, vocab = 64, 200
    h = torch.eye(n, requires_grad=True)
    w = (torch.randn(vocab, n) * 3).requires_grad_()
    logits = w.detach().t().to(torch.bfloat16).double()  # what the bf16 head computes for h = I
    y = logits.argmax(1)  # mostly confident and right: softmax at the label is close to 1
    y[::5] = torch.randint(0, vocab, (len(y[::5]),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sign * linear_cross_entropy(h, w, y)
    loss.backward()
    ref_loss = F.cross_entropy(logits, y)
    assert abs(loss.item() - sign * ref_loss.item()) < 1e-5
    ref = sign * (logits.softmax(1) - F.one_hot(y, vocab).double()) / n
    ours = w.grad.t().double()
    assert ((ours - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-30).all(), (ours - ref).abs().max()


def test_all_ignored_labels_give_zero_loss_and_grad():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def reference_attention(q, k, v, **kwargs):
    """SDPA with each kv head repeated across its query group (``enable_gqa`` needs torch 2.5)."""
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("native", [True, False], ids=["native-gqa", "repeated-kv"])
def test_sdpa_grouped_query_attention_on_every_torch(native, monkeypatch):
    if native and not transformer.SDPA_HAS_GQA:
        pytest.skip("enable_gqa needs torch >= 2.5")
    monkeypatch.setattr(transformer, "SDPA_HAS_GQA", native)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.rand(2, 1, 10, 10) > 0.3
    mask[..., 0] = True  # every query sees a key
    for kwargs in ({"is_causal": True}, {"mask": mask}):
        ref = reference_attention(q, k, v, is_causal=kwargs.get("is_causal", False), attn_mask=kwargs.get("mask"))
        assert torch.allclose(transformer.sdpa(q, k, v, **kwargs), ref, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matmul_attention_matches_sdpa(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8)
    k, v = torch.randn(2, kv_heads, 10, 8), torch.randn(2, kv_heads, 10, 8)
    ref = reference_attention(q, k, v, is_causal=True)
    assert torch.allclose(matmul_attention(q, k, v, is_causal=True), ref, atol=1e-5)
    # cached decoding: 3 new queries against 10 keys, and a left-padding mask
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    m4 = attention_mask_4d(mask, 3, 7)
    ref = reference_attention(q[:, :, -3:], k, v, attn_mask=m4)
    assert torch.allclose(matmul_attention(q[:, :, -3:], k, v, mask=m4), ref, atol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = reference_attention(qb.float(), kb.float(), vb.float(), is_causal=True)
    assert (matmul_attention(qb, kb, vb, is_causal=True).float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("case", ["causal", "no-mask", "padding-mask"])
def test_matmul_attention_gradients_match_sdpa(case):
    # the scale and the mask ride inside one baddbmm (no backward of their own): the gradients must still be SDPA's
    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, 10, 8, requires_grad=True) for _ in range(3)]
    kwargs = {"scale": 0.3}  # a non-default scale (muP's 1/d_head) has to reach the scores
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "padding-mask":
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, :3] = 0
        kwargs["attn_mask"] = attention_mask_4d(mask, 10, 0)
    grad = torch.randn(2, 4, 10, 8)
    outs, grads = [], []
    for fn in (lambda q, k, v: reference_attention(q, k, v, **kwargs),
               lambda q, k, v: matmul_attention(q, k, v, mask=kwargs.get("attn_mask"),
                                                is_causal=kwargs.get("is_causal", False), scale=0.3)):
        out = fn(*leaves)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, leaves, grad))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for ref, mine in zip(*grads, strict=True):
        assert torch.allclose(ref, mine, atol=1e-5)


def test_bf16_cpu_model_matches_fp32_model():
    from nanogpt4.config import load_config
    from nanogpt4.model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(load_config("tiny", ["model.dim=64", "model.n_heads=4", "model.n_layers=2",
                                         "model.vocab_size=101", "model.max_seq_len=32"])).eval()
    x = torch.randint(0, 101, (2, 32))
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # takes the matmul-attention path
        fast = m(x)
    assert (fast.float() - ref).abs().max() < 0.05 * ref.abs().max()
