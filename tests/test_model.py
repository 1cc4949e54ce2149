import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from nanogpt4.config import load_config
from nanogpt4.model.transformer import Transformer, sample_next

VARIANTS = {
    "gpt2": [],
    "gpt2-tanh": ["model.mlp=gelu_tanh"],  # GPT-2's own GELU, for its imported weights
    "llama": ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"],
    "gqa": ["model.pos_embedding=rope", "model.n_kv_heads=2"],
    "untied": ["model.tie_embeddings=false", "model.mlp=swiglu"],
}


def make(variant="gpt2", seed=0, **kw):
    ov = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=101", "model.max_seq_len=24"]
    ov += VARIANTS[variant] + [f"model.{k}={v}" for k, v in kw.items()]
    torch.manual_seed(seed)
    return Transformer(load_config("tiny", ov)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_do_not_change_past_logits(variant):
    m = make(variant)
    x = torch.randint(0, 101, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 101, (2, 8))
    lx, ly = m(x), m(y)
    assert torch.allclose(lx[:, :12], ly[:, :12], atol=1e-6)
    assert (lx[:, 12:] - ly[:, 12:]).abs().max() > 1e-3  # and the future really is used


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_uncached_including_sliding_window(variant):
    m = make(variant)
    x = torch.randint(0, 101, (3, 7))
    a = m.generate(x, 30, temperature=0, use_cache=True)  # 7 + 30 > max_seq_len 24: the window slides
    b = m.generate(x, 30, temperature=0, use_cache=False)
    assert a.shape == (3, 37) and torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_logits_match_full_forward(variant):
    from nanogpt4.model.transformer import KVCache

    m = make(variant)
    x = torch.randint(0, 101, (2, 16))
    full = m(x)
    cache = KVCache.allocate(m.cfg, 2, 16, "cpu", torch.float32)
    parts = [m(x[:, :9], kv_cache=cache)] + [m(x[:, i:i + 1], kv_cache=cache) for i in range(9, 16)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


@pytest.mark.parametrize("layout", [None, "onednn", "blocked", "mkl"])
@pytest.mark.parametrize("variant", [*VARIANTS, "mup"])
def test_decode_step_logits_match_full_forward(variant, layout, monkeypatch):
    from nanogpt4.model import decoding
    from nanogpt4.model.transformer import KVCache

    # the one-token step that eager and compiled decoding run (the blocks' math without their modules' calls),
    # with the linear layers' weights as they are or laid out for decoding (AMD: oneDNN's blocks for 2 rows,
    # blocks of output columns for one fp32 row; Intel: packed for MKL for 2 rows)
    monkeypatch.setattr(decoding, "cpu_vendor", lambda: "intel" if layout == "mkl" else "amd")
    m = make("gpt2", **{"parametrization": "mup", "mup_base_dim": 32}) if variant == "mup" else make(variant)
    with torch.no_grad():  # biases and norms start at 0 and 1: a step that dropped them must show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B = 1 if layout == "blocked" else 2
    weights = m.packed_decode_weights(B, 16) if layout else None
    if layout and weights is None:
        pytest.skip("decoding layouts are used on x86 CPUs only (oneDNN's also needs oneDNN, (in, out) MKL)")
    assert weights is None or weights.layout == layout
    x = torch.randint(0, 101, (B, 16))
    full = m(x)
    cache = KVCache.allocate(m.cfg, B, 16, "cpu", torch.float32)
    m(x[:, :9], kv_cache=cache)
    for i in range(9, 16):
        logits = m.decode_step(x[:, i], torch.full((B,), i), None, cache, weights)
        cache.length += 1
        torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)
    # a key mask hides slots: row 0 may not see its first 4 tokens, as if they were padding
    mask = torch.ones(B, 16, dtype=torch.long)
    mask[0, :4] = 0
    cache = KVCache.allocate(m.cfg, B, 16, "cpu", torch.float32)
    m(x[:, :15], kv_cache=cache, attention_mask=mask[:, :15])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, 15]
    logits = m.decode_step(x[:, 15], positions, mask.bool(), cache, weights)
    torch.testing.assert_close(logits, m(x, attention_mask=mask)[:, 15], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], m(x[:1, 4:])[0, -1], atol=1e-5, rtol=1e-5)


def test_blocked_weights_pad_to_whole_blocks():
    from nanogpt4.model.decoding import DECODE_BLOCK, DecodeWeights, blocked_bias, blocked_weight, decode_linear

    # widths that are not a multiple of the block: the padding's columns are cut off, the real ones exact
    for out in (1, DECODE_BLOCK - 1, DECODE_BLOCK, 3 * DECODE_BLOCK + 5):
        layer = torch.nn.Linear(24, out)
        x = torch.randn(1, 24)
        packed = DecodeWeights("blocked", {layer: blocked_weight(layer.weight)}, {layer: blocked_bias(layer.bias)})
        assert packed.weights[layer].shape == (-(-out // DECODE_BLOCK), 24, DECODE_BLOCK)
        torch.testing.assert_close(decode_linear(layer, x, packed), layer(x), atol=1e-6, rtol=1e-6)
        no_bias = torch.nn.Linear(24, out, bias=False)
        packed = DecodeWeights("blocked", {no_bias: blocked_weight(no_bias.weight)})
        torch.testing.assert_close(decode_linear(no_bias, x, packed), no_bias(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", [None, "onednn", "blocked", "mkl", "transposed"])
def test_decode_linear_applies_gelu_or_residual_in_every_layout(layout):
    from nanogpt4.model.decoding import DecodeWeights, blocked_bias, blocked_weight, decode_linear

    # oneDNN's layout applies them inside the GEMM (post-ops), the others after it: the same values either way
    if layout == "onednn" and not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        pytest.skip("oneDNN's layout needs torch's oneDNN")
    if layout == "mkl" and not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        pytest.skip("MKL's layout needs torch's MKL")
    torch.manual_seed(0)
    layer, rows = torch.nn.Linear(24, 40), 1 if layout == "blocked" else 3
    x, residual = torch.randn(rows, 24), torch.randn(rows, 40)
    weight = layer.weight.detach()
    packed = None
    if layout == "onednn":
        packed = DecodeWeights("onednn", {layer: torch.ops.mkldnn._reorder_linear_weight(weight, rows)})
    elif layout == "blocked":
        packed = DecodeWeights("blocked", {layer: blocked_weight(weight)}, {layer: blocked_bias(layer.bias.detach())})
    elif layout == "mkl":
        packed = DecodeWeights("mkl", {layer: torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)}, rows=rows)
    elif layout == "transposed":
        packed = DecodeWeights("transposed", {layer: weight.t().contiguous()})
    with torch.no_grad():
        torch.testing.assert_close(decode_linear(layer, x, packed), layer(x), atol=1e-6, rtol=1e-6)
        for form in ("none", "tanh"):  # the exact GELU, and GPT-2's tanh approximation (model.mlp=gelu_tanh)
            torch.testing.assert_close(decode_linear(layer, x, packed, gelu=form),
                                       F.gelu(layer(x), approximate=form), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(decode_linear(layer, x, packed, residual=residual), residual + layer(x),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch 2.13 says so on flags()
def test_decode_gelu_takes_pytorchs_own_kernel_for_a_few_rows():
    from nanogpt4.model.decoding import NATIVE_GELU_MAX_ELEMENTS, decode_gelu

    # F.gelu hands contiguous fp32 tensors to oneDNN (a costly call at a few rows); with oneDNN off it is PyTorch's
    # own kernel, which decode_gelu must give bit for bit, as a contiguous tensor of the input's shape
    torch.manual_seed(0)
    for shape in [(1, 768), (3, 40), (8, 768), (2, NATIVE_GELU_MAX_ELEMENTS // 2)]:
        y = torch.randn(shape) * 3
        for form in ("none", "tanh"):
            with torch.backends.mkldnn.flags(enabled=False):
                native = F.gelu(y, approximate=form)
            got = decode_gelu(y, form)
            assert got.shape == y.shape and got.is_contiguous()
            assert torch.equal(got, native), (shape, form)
    # past the limit oneDNN's threads win, and one row of odd width has no transposed view: F.gelu as it is
    for y in (torch.randn(64, 1536), torch.randn(1, 7)):
        assert torch.equal(decode_gelu(y, "none"), F.gelu(y))


def test_compiled_decoding_takes_plain_gelu(monkeypatch):
    from nanogpt4.model.decoding import decode_gelu

    # inductor writes its own GELU kernel: the transposed views would only cost it
    seen, gelu = [], F.gelu
    monkeypatch.setattr(F, "gelu", lambda t, approximate: seen.append((t.shape, t.is_contiguous())) or gelu(t))
    y = torch.randn(8, 768)
    decode_gelu(y, "none")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    decode_gelu(y, "none")
    assert seen == [((768, 8), False), ((8, 768), True)]


@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_generate_decodes_through_laid_out_weights_where_it_pays(vendor, monkeypatch):
    from nanogpt4.model import decoding
    from nanogpt4.model.decoding import PACK_MIN_NEW_TOKENS

    monkeypatch.setattr(decoding, "cpu_vendor", lambda: vendor)
    m = make()
    if m.packed_decode_weights(4, PACK_MIN_NEW_TOKENS) is None:
        pytest.skip("decoding layouts need an x86 CPU with oneDNN")
    x = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    made = []
    pack = Transformer.packed_decode_weights
    monkeypatch.setattr(Transformer, "packed_decode_weights", lambda self, *a: made.append(pack(self, *a)) or made[-1])
    n = PACK_MIN_NEW_TOKENS + 4
    runs = [(x, {}), (x, {"attention_mask": mask}), (x[1:2], {})]
    got = [m.generate(rows, n, temperature=0, **kw) for rows, kw in runs]
    # every linear of the blocks and the head: on AMD for oneDNN (4 rows), or in blocks of output columns for one
    # row; on Intel packed for MKL (4 rows), as they are for one row
    expected = ([("onednn", 4 * 2 + 1)] * 2 + [("blocked", 9)] if vendor == "amd"
                else [("mkl", 4 * 2 + 1)] * 2 + [None])
    assert [w and (w.layout, len(w.weights)) for w in made] == expected
    monkeypatch.setattr(Transformer, "packed_decode_weights", lambda self, *a: None)
    assert all(torch.equal(g, m.generate(rows, n, temperature=0, **kw))
               for g, (rows, kw) in zip(got, runs, strict=True))
    # a short generation or another dtype gets nothing
    assert pack(m, 4, PACK_MIN_NEW_TOKENS - 1) is None
    # on Intel, weights past the caches: oneDNN's layout; one row never gets blocks there
    monkeypatch.setattr(decoding, "MKL_DECODE_MAX_BYTES", 0)
    assert pack(m, 4, 100).layout == "onednn" and (pack(m, 1, 100) is None) == (vendor == "intel")
    assert pack(m.to(torch.float16), 4, 100) is None


@pytest.mark.parametrize("vendor", ["amd", "intel"])
@pytest.mark.parametrize("variant", ["gpt2", "gpt2-tanh", "llama"])
def test_bf16_decodes_through_onednn_where_onednn_takes_bf16(variant, vendor, monkeypatch):
    from nanogpt4.model import decoding
    from nanogpt4.model.decoding import PACK_MIN_NEW_TOKENS, onednn_takes_bf16
    from nanogpt4.model.transformer import KVCache

    monkeypatch.setattr(decoding, "cpu_vendor", lambda: vendor)
    m = make(variant)
    if m.packed_decode_weights(3, PACK_MIN_NEW_TOKENS) is None:
        pytest.skip("decoding layouts need an x86 CPU with oneDNN")
    with torch.no_grad():  # biases and norms start at 0 and 1: a step that dropped them must show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = m.to(torch.bfloat16)
    weights = [m.packed_decode_weights(b, PACK_MIN_NEW_TOKENS) for b in (1, 3)]
    if not onednn_takes_bf16():  # AVX2-only CPUs: torch computes bf16 without oneDNN, and nothing is laid out
        assert weights == [None, None]
        return
    # one row too (AMD: no (in, out) copies in bf16); on Intel one row of a small model: fp32 (in, out) copies
    assert [w.layout for w in weights] == ["transposed" if vendor == "intel" else "onednn", "onednn"]
    # the step's logits through either layout match the plain step's (bf16: the same GEMMs, blocked otherwise;
    # fp32 copies: the same products, summed in fp32 and rounded once)
    x = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(1))
    for rows, laid_out_weights in ((x, weights[1]), (x[:1], weights[0])):
        B = rows.size(0)
        caches = [KVCache.allocate(m.cfg, B, 16, "cpu", torch.bfloat16) for _ in range(2)]
        for cache in caches:
            m(rows[:, :9], kv_cache=cache)
        for i in range(9, 16):
            plain, laid_out = (m.decode_step(rows[:, i], torch.full((B,), i), None, cache, w)
                               for cache, w in zip(caches, (None, laid_out_weights), strict=True))
            for cache in caches:
                cache.length += 1
            assert laid_out.dtype == torch.bfloat16
            torch.testing.assert_close(laid_out.float(), plain.float(), atol=2e-2, rtol=2e-2)
    made = []
    pack = Transformer.packed_decode_weights
    monkeypatch.setattr(Transformer, "packed_decode_weights", lambda self, *a: made.append(pack(self, *a)) or made[-1])
    m.generate(x[:, :4], PACK_MIN_NEW_TOKENS, temperature=0)
    assert [w.layout for w in made] == ["onednn"]
    # weights past the caches once widened keep oneDNN's layout for one row on Intel too
    monkeypatch.setattr(decoding, "MKL_DECODE_MAX_BYTES", 0)
    assert pack(m, 1, PACK_MIN_NEW_TOKENS).layout == "onednn"


def test_bf16_decodes_on_cpu_through_an_fp32_cache(monkeypatch):
    from nanogpt4.model import decoding
    from nanogpt4.model.decoding import eager_cache_dtype
    from nanogpt4.model.transformer import KVCache

    monkeypatch.setattr(decoding, "cpu_has_amx", lambda: False)
    m = make("gqa")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = m.to(torch.bfloat16)
    x = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(2))
    full = m(x)
    # the prefill through an fp32 cache is the plain forward, bit for bit: bf16 keys widen and narrow exactly
    cache = KVCache.allocate(m.cfg, 3, 16, "cpu", torch.float32)
    assert torch.equal(m(x[:, :9], kv_cache=cache), full[:, :9])
    assert cache.k[0].dtype == torch.float32 and cache.k[0][:, :, :9].abs().sum() > 0
    # one-token steps attend in fp32 over the same values, and come back in bf16
    for i in range(9, 16):
        logits = m.decode_step(x[:, i], torch.full((3,), i), None, cache)
        cache.length += 1
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), full[:, i].float(), atol=2e-2, rtol=2e-2)
    # generate allocates it so for a bf16 model on CPU; elsewhere the cache keeps the model's dtype
    made = []
    allocate = KVCache.allocate
    monkeypatch.setattr(KVCache, "allocate", classmethod(lambda cls, *a: made.append(a[-1]) or allocate(*a)))
    m.generate(x[:, :4], 5, temperature=0)
    assert made == [torch.float32]
    # except on CPUs with AMX, whose bf16 attention kernel is the faster: there the cache keeps bf16
    monkeypatch.setattr(decoding, "cpu_has_amx", lambda: True)
    m.generate(x[:, :4], 5, temperature=0)
    assert made == [torch.float32, torch.bfloat16]
    assert eager_cache_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert eager_cache_dtype(torch.float16, torch.device("cpu")) == torch.float16


def test_a_hooked_model_decodes_through_its_hooks():
    # decode_step bypasses module calls; FSDP gathers its shards in forward hooks, so a hooked model must not
    m = make()
    x = torch.randint(0, 101, (2, 5))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    plain = [m.generate(x, 8, temperature=0, **kw) for kw in ({}, {"attention_mask": mask})]
    calls = []
    handle = m.blocks[1].register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    try:
        hooked = [m.generate(x, 8, temperature=0, **kw) for kw in ({}, {"attention_mask": mask})]
        assert calls == [5, *[1] * 7] * 2  # the prompt, then every decoded token
        assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))
        with pytest.raises(ValueError, match="compile=False"):
            m.generate(x, 8, temperature=0, compile=True)
    finally:
        handle.remove()


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_left_padded_batch_equals_unpadded_rows(variant):
    m = make(variant)
    rows = [torch.randint(0, 101, (n,)) for n in (9, 5, 2)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    batched = m.generate(ids, 10, temperature=0, attention_mask=mask)
    for i, r in enumerate(rows):
        single = m.generate(r[None], 10, temperature=0)
        assert torch.equal(batched[i, T:], single[0, len(r):])
    # padded-position logits of the real tokens are unchanged too
    logits = m(ids, attention_mask=mask)
    assert torch.allclose(logits[1, T - 5:], m(rows[1][None])[0], atol=1e-5)


def test_stop_tokens_pad_finished_rows():
    m = make()
    x = torch.randint(0, 101, (2, 4))
    free = m.generate(x, 12, temperature=0)
    stop = int(free[0, 6])  # the third generated token of row 0
    out = m.generate(x, 12, temperature=0, stop_tokens=[stop], pad_token_id=100)
    row = out[0, 4:].tolist()
    first = row.index(stop)
    assert all(t == 100 for t in row[first + 1:])
    # on_token sees every step's tokens as they are chosen, the padding of finished rows included
    seen = []
    streamed = m.generate(x, 12, temperature=0, stop_tokens=[stop], pad_token_id=100,
                          on_token=lambda t: seen.append(t.tolist()))
    assert torch.equal(streamed, out) and torch.tensor(seen).t().tolist() == out[:, 4:].tolist()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {3, 4}
    p = torch.softmax(logits[0], -1)  # top two carry 0.64 + 0.24 = 0.87 of the mass
    picks = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(picks.tolist()) == {3, 4} and p[3:].sum() > 0.8
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {4}
    assert sample_next(logits[:1], 0).item() == 4
    # greedy picks the first of equal maxima, in bf16 too (read without widening), as a long index
    tied = torch.tensor([[1.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.bfloat16)
    greedy = sample_next(tied, 0)
    assert greedy.tolist() == [1, 0] and greedy.dtype == torch.long
    # temperature sharpens: at T=0.25 the top token dominates
    hot = sample_next(logits, 0.25, generator=g)
    assert (hot == 4).float().mean() > 0.95


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0},
                                 {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": -1}])
def test_generate_refuses_settings_that_would_sample_garbage(bad):
    # top_p=0 masked every token (NaN probabilities) and a negative temperature inverted the distribution,
    # both silently
    m = make("gpt2")
    kwargs = {"max_new_tokens": 3, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        m.generate(torch.randint(0, 101, (1, 4)), **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts(variant):
    m = make(variant)
    unique = {id(p): p for p in m.parameters()}
    assert m.num_parameters() == sum(p.numel() for p in unique.values())
    emb = m.token_embed.weight.numel() + (m.pos_embed.weight.numel() if m.pos_embed is not None else 0)
    head = 0 if m.cfg.tie_embeddings else m.head.weight.numel()
    assert m.num_parameters(non_embedding=True) == m.num_parameters() - emb - head


def test_gpt2_small_counts_and_flops_by_hand():
    cfg = load_config("configs/base.yaml")
    m = Transformer(cfg)
    d, L, V, T = 768, 12, 50257, 128
    per_layer = 4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d  # attn w+b, mlp w+b, two LayerNorms
    assert m.num_parameters() == V * d + T * d + L * per_layer + 2 * d
    assert m.num_parameters() == 124_439_808 - (1024 - 128) * d  # GPT-2 small has 1024 positions
    matmul = L * 12 * d * d + V * d  # weights that multiply activations, incl. the LM head
    attn = 2 * L * d * T  # QK^T + AV, causal average
    assert m.flops_per_token(T, training=False) == 2 * matmul + attn
    assert m.flops_per_token(T) == 3 * (2 * matmul + attn)


def test_gpt2_init_and_weight_tying():
    m = make(n_layers=4, dim=128)
    assert m.head.weight is m.token_embed.weight
    std = 0.02 / math.sqrt(2 * 4)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(m.blocks[0].attn.qkv.bias == 0)


def test_configure_optimizers_decays_matrices_only():
    m = make()
    opt = m.configure_optimizers(0.1, 1e-3)
    hidden, embed, no_decay = opt.param_groups  # hidden matrices apart: µP scales their learning rate
    assert hidden["weight_decay"] == embed["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in hidden["params"] + embed["params"]) and all(p.dim() < 2 for p in
                                                                                 no_decay["params"])
    assert embed["params"] == [m.token_embed.weight, m.pos_embed.weight]  # the tied head is the token table
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)  # standard parametrization: one learning rate


def test_return_hidden_and_seed_call_shape():
    m = make()
    x = torch.randint(0, 101, (2, 5))
    h = m(x, return_hidden=True)
    assert h.shape == (2, 5, 64)
    assert torch.allclose(m.head(h), m(x))


def test_too_long_input_is_refused():
    m = make()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_dropout_is_active_only_in_training():
    m = make(dropout=0.5)
    x = torch.randint(0, 101, (2, 10))
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_training_reduces_loss_on_a_repeating_sequence():
    m = make()
    m.train()
    opt = m.configure_optimizers(0.0, 3e-3)
    x = torch.arange(24).remainder(7)[None].repeat(4, 1)
    for _ in range(60):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_generation_from_an_embedding_prefix_cached_equals_uncached():
    m = make()
    x = torch.randint(0, 101, (2, 6))
    prefix = m.token_embed(x) + 0.5 * torch.randn(2, 6, 64)  # e.g. projected image tokens
    a = m.generate(x, 25, temperature=0, inputs_embeds=prefix)  # 6 + 25 > 24: slides past the prefix
    b = m.generate(x, 25, temperature=0, inputs_embeds=prefix, use_cache=False)
    plain = m.generate(x, 25, temperature=0)
    assert torch.equal(a, b) and not torch.equal(a, plain)


def test_generated_ids_can_enter_autograd():
    m = make()
    out = m.generate(torch.randint(0, 101, (1, 4)), 5, temperature=0)
    m.train()
    loss = m(out[:, :-1], labels=out[:, 1:])
    loss.backward()  # would fail on inference-mode tensors
    assert m.token_embed.weight.grad is not None


@pytest.mark.parametrize("variant", [*VARIANTS, "mup"])
def test_static_cache_decoding_equals_cached_generation(variant, monkeypatch):
    # compile=True's step run eagerly (no compiler): the static cache, its slot mask and write index, left
    # padding and the sliding window must reproduce the normal cached path exactly
    monkeypatch.setattr(Transformer, "compiled_decode_step", lambda self: self.decode_step)
    m = make("gpt2", **{"parametrization": "mup", "mup_base_dim": 32}) if variant == "mup" else make(variant)
    x = torch.randint(0, 101, (3, 7))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    for kw in ({}, {"attention_mask": mask}):
        static = m.generate(x, 30, temperature=0, compile=True, **kw)  # 7 + 30 > 24: slides as well
        assert torch.equal(static, m.generate(x, 30, temperature=0, **kw))


def test_static_cache_is_reused_clean(monkeypatch):
    # a CUDA graph writes its cache at fixed addresses, so calls of one shape share a cache: the second call
    # must not see the first call's keys and values
    monkeypatch.setattr(Transformer, "compiled_decode_step", lambda self: self.decode_step)
    m = make()
    x, y = torch.randint(0, 101, (2, 5)), torch.randint(0, 101, (2, 5))
    m.generate(x, 10, temperature=0, compile=True)
    with torch.inference_mode():  # generate made the cache there
        first = m.static_cache(2, 15, "cpu", torch.float32)
        first.k[0].fill_(float("nan"))  # what a stale cache would leak into masked slots
    out = m.generate(y, 10, temperature=0, compile=True)
    with torch.inference_mode():
        assert m.static_cache(2, 15, "cpu", torch.float32) is first
    assert torch.equal(out, m.generate(y, 10, temperature=0))


def test_kv_cache_starts_zeroed():
    from nanogpt4.model.transformer import KVCache

    # static decoding weights unfilled slots by zero; uninitialised memory could hold NaN, and 0 * NaN = NaN
    cache = KVCache.allocate(make().cfg, 2, 8, "cpu", torch.bfloat16)
    assert all(bool((t == 0).all()) for t in cache.k + cache.v)


def test_compiled_decoding_of_many_rows_skips_the_gemm_templates_where_they_lose(monkeypatch):
    import nanogpt4.model.decoding as decoding

    shipped = decoding.DECODE_COMPILE_OPTIONS
    monkeypatch.setattr(decoding, "cpu_has_bf16_instructions", lambda: True)
    monkeypatch.setattr(decoding, "cpu_vendor", lambda: "amd")
    onednn = decoding.decode_compile_options(torch.bfloat16, 8)
    assert onednn == {**shipped, "max_autotune": False}  # frozen weights, prepacked for oneDNN's linears
    assert decoding.decode_compile_options(torch.bfloat16, 32) == onednn
    # fewer rows, fp32, or a CPU that widens bf16 to fp32: the shipped options (C++ GEMM templates)
    assert decoding.decode_compile_options(torch.bfloat16, 6) == shipped
    assert decoding.decode_compile_options(torch.float32, 8) == shipped
    monkeypatch.setattr(decoding, "cpu_has_bf16_instructions", lambda: False)
    assert decoding.decode_compile_options(torch.bfloat16, 8) == shipped
    # on Intel (MKL) fp32 from 8 rows too: the frozen weights packed for MKL's GEMMs
    monkeypatch.setattr(decoding, "cpu_vendor", lambda: "intel")
    if torch.backends.mkl.is_available():
        assert decoding.decode_compile_options(torch.float32, 8) == onednn
        assert decoding.decode_compile_options(torch.float32, 4) == shipped
    assert decoding.decode_compile_options(torch.bfloat16, 8) == shipped
    # generate patches inductor's config with its own dtype and batch while it runs
    import torch._inductor.config as inductor_config

    seen = []
    monkeypatch.setattr(decoding, "cpu_has_bf16_instructions", lambda: True)
    monkeypatch.setattr(decoding, "cpu_vendor", lambda: "amd")
    monkeypatch.setattr(Transformer, "_generate",
                        lambda self, *a: seen.append(inductor_config.max_autotune) or a[0])
    m = make().to(torch.bfloat16)
    m.generate(torch.zeros(8, 3, dtype=torch.long), 4, compile=True)
    m.generate(torch.zeros(2, 3, dtype=torch.long), 4, compile=True)
    assert seen == [False, shipped["max_autotune"]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoding_under_the_shipped_inductor_options():
    # the options generate(compile=True) ships with (on torch >= 2.13 the C++ GEMM templates alone, which have
    # no fallback for a matmul they cannot take; from 8 bf16 rows on a CPU with bf16 instructions, oneDNN's
    # linears): every matmul of a bf16 GQA step, one row, three and eight, must find a kernel, and the tokens
    # must be eager's
    m = make("gqa", n_layers=1).to(torch.bfloat16)
    for rows in (1, 3, 8):
        x = torch.randint(0, 101, (rows, 5), generator=torch.Generator().manual_seed(rows))
        assert torch.equal(m.generate(x, 6, temperature=0, compile=True), m.generate(x, 6, temperature=0))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("variant", ["gpt2", "gqa"])
def test_compiled_decoding_equals_eager_and_follows_weight_updates(variant, monkeypatch):
    import nanogpt4.model.decoding as decoding

    # freezing alone already prepacks the weights (what can go stale) at this width; max-autotune would add
    # ~20 s of kernel benchmarking per compile
    monkeypatch.setattr(decoding, "DECODE_COMPILE_OPTIONS", {"freezing": True})
    m = make(variant, dim=128)
    x = torch.randint(0, 101, (3, 6))
    mask = torch.ones_like(x)
    mask[1, :2] = mask[2, :5] = 0  # left padding
    kw = dict(temperature=0, attention_mask=mask, stop_tokens=[7])
    compiled = m.generate(x, 25, compile=True, **kw)  # 6 + 25 > max_seq_len 24: the window slides too
    assert torch.equal(compiled, m.generate(x, 25, **kw))
    if variant == "gpt2":  # an embedding prefix (image tokens): prefilled eagerly, then decoded compiled
        prefix = m.token_embed(x).detach() + 0.5 * torch.randn(3, 6, 128)
        with_prefix = m.generate(x, 12, temperature=0, inputs_embeds=prefix, compile=True)
        assert torch.equal(with_prefix, m.generate(x, 12, temperature=0, inputs_embeds=prefix))
        assert not torch.equal(with_prefix, m.generate(x, 12, temperature=0))
    # an optimizer step changes the weights in place: the compiled step (weights frozen in) must not go stale
    opt = torch.optim.SGD(m.parameters(), lr=5.0)
    m(x, labels=x).backward()
    opt.step()
    after = m.generate(x, 25, compile=True, **kw)
    assert torch.equal(after, m.generate(x, 25, **kw)) and not torch.equal(after, compiled)
