"""import-hf: transformers GPT-2 and Llama models in, the same logits out; export then import is the identity."""

import json

import numpy as np
import pytest
import torch

from nanogpt4.cli import main
from nanogpt4.model.hf_export import export_hf
from nanogpt4.train.checkpoint import load_model

from .conftest import tokenizer_with
from .test_cli import assert_one_line_error, cli
from .test_export import ARCHS, trained_like

transformers = pytest.importorskip("transformers")


def save_tokenizer(d, specials):
    """``tokenizer_with(specials)`` as transformers saves it (the last special token its end of text)."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer_with(specials).tok,
                                         eos_token=specials[-1]).save_pretrained(d)


def gpt2_dir(tmp_path, tokenizer=True, **kw):
    """A GPT-2 as transformers makes it (tanh GELU, dropout 0.1), with a byte-level BPE holding <|endoftext|>."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=40, **kw)
    d = tmp_path / "gpt2"
    m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # MLP inputs of order 1, where the GELUs' exact and tanh forms part
        for block in m.transformer.h:
            block.mlp.c_fc.weight.mul_(30)
            block.mlp.c_proj.weight.mul_(30)
    m.save_pretrained(d)
    if tokenizer:
        save_tokenizer(d, ["<|endoftext|>"])
    return d


def llama_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, max_position_embeddings=40,
                                   rope_theta=5000.0, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, as after training
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / "llama"
    m.save_pretrained(d)
    save_tokenizer(d, ["<s>", "</s>"])  # Llama 2's: no <|endoftext|>, no pad token
    return d


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_imported_logits_and_greedy_tokens_equal_the_transformers_model(kind, tmp_path, capsys):
    src = gpt2_dir(tmp_path) if kind == "gpt2" else llama_dir(tmp_path)
    out = tmp_path / "ckpt"
    code, printed, _ = cli(capsys, "import-hf", "--model", src, "--out", out, "--json")
    assert code == 0
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["layout"] == ("learned/layernorm/gelu_tanh" if kind == "gpt2" else "rope/rmsnorm/swiglu")
    assert summary["tokenizer"]
    ours, cfg, tok = load_model(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5)
        greedy = hf.generate(x[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, ours.generate(x[:, :5], 10, temperature=0))
    assert cfg.model.dropout == 0.0  # the config's, not GPT-2's 0.1: weights do not fix it
    # the imported tokenizer's own end of text ends and pads samples (</s> for Llama 2's), through the CLI
    assert tok is not None and tok.eot_id == tok.pad_id == (0 if kind == "gpt2" else 1)
    # and a prompt starts as its documents did: after <|endoftext|> for GPT-2, with <s> for Llama
    assert tok.prompt_ids("def f(")[0] == (tok.eot_id if kind == "gpt2" else tok.token_id("<s>"))
    code, printed, _ = cli(capsys, "sample", "--run", out, "--prompt", "def f(", "--max-new-tokens", "5")
    assert code == 0 and printed.startswith("def f(")


def test_an_imported_llama_exports_with_its_own_special_tokens(tmp_path, capsys):
    """export-hf named nanogpt4's <|endoftext|> and <|pad|> as the tokenizer's bos/eos/pad: for an imported
    Llama's tokenizer, which has neither, transformers added them as two new tokens the model never saw."""
    src = llama_dir(tmp_path)
    assert main(["import-hf", "--model", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export-hf", "--run", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    before, after = (transformers.AutoTokenizer.from_pretrained(d) for d in (src, tmp_path / "hf"))
    assert len(after) == len(before) and after("def f(x):")["input_ids"] == before("def f(x):")["input_ids"]
    assert (after.bos_token, after.eos_token, after.pad_token) == ("<s>", "</s>", "</s>")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_then_import_gives_the_same_model(arch, tmp_path, capsys):
    m = trained_like(ARCHS[arch])
    export_hf(m, None, tmp_path / "hf")
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, cfg, _ = load_model(tmp_path / "back")
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():  # µP's multipliers come back folded into the weights of a standard model
        assert torch.allclose(back(x), m(x), atol=1e-5)
    if "mup" not in arch and "nobias" not in arch:  # GPT-2 has biases: an unbiased model comes back with zeros
        for k, v in m.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("case,needle", [
    ("relu", "import-hf cannot hold this model: activation_function='relu'"),
    ("layer-scaled", "import-hf cannot hold this model: attention scores not scaled by 1/sqrt(head_dim) alone"),
    ("missing", "is neither a directory nor a model in the Hugging Face cache (nothing is downloaded"),
    ("no-config", "has no config.json: give a transformers model directory"),
    ("taken-out", "is not a new or empty directory"),
    ("model-override", "import-hf takes model.* from the imported model's config (model.dropout aside): drop "
                       "model.dim"),
])
def test_what_cannot_be_imported_is_refused_in_one_line(case, needle, tmp_path, capsys):
    src, out, extra = tmp_path / "nothing-here", tmp_path / "ckpt", []
    if case == "relu":
        src = gpt2_dir(tmp_path, activation_function="relu")
    elif case == "layer-scaled":
        src = gpt2_dir(tmp_path, scale_attn_by_inverse_layer_idx=True)
    elif case == "no-config":
        src.mkdir()
    elif case == "taken-out":
        src = gpt2_dir(tmp_path)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "model-override":
        src, extra = gpt2_dir(tmp_path), ["model.dim=128"]
    capsys.readouterr()  # what making the model printed (transformers' progress bars)
    code, _, err = cli(capsys, "import-hf", "--model", src, "--out", out, *extra)
    assert_one_line_error(code, err, needle)
    assert (out / "notes.txt").read_text() == "mine" if case == "taken-out" else not out.exists()


def one_step_at_a_tiny_lr(tmp_path) -> list[str]:
    """Overrides for one pretraining step at lr 1e-9 on a small corpus: the weights stay the loaded ones."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(2000)))
    return [f"data.source=text:{text}", f"data.dir={tmp_path / 'data'}", "training.batch_size=4",
            "training.learning_rate=1e-9", "training.warmup_steps=1", "training.eval_interval=1",
            "training.eval_iters=1", "training.sample_tokens=0", "training.max_steps=1"]


def test_pretraining_starts_from_an_imported_checkpoint(tmp_path, capsys):
    """training.init_from: the checkpoint's architecture, tokenizer and weights, then training as any run."""
    ckpt = tmp_path / "ckpt"
    assert main(["import-hf", "--model", str(gpt2_dir(tmp_path)), "--out", str(ckpt)]) == 0
    common = one_step_at_a_tiny_lr(tmp_path)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "pretrain", "--out", run, f"training.init_from={ckpt}", *common)
    assert code == 0, err
    trained, cfg, _ = load_model(run)
    start, start_cfg, _ = load_model(ckpt)
    assert cfg.model == start_cfg.model and cfg.model.mlp == "gelu_tanh"
    assert (run / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    for name, weight in start.state_dict().items():  # one step at a learning rate of 1e-9 from those weights
        torch.testing.assert_close(trained.state_dict()[name], weight, atol=1e-6, rtol=0)
    code, printed, err = cli(capsys, "pretrain", "--out", run, "--resume", "training.max_steps=2", "--json")
    assert code == 0 and json.loads(printed.strip().splitlines()[-1])["steps"] == 2, err
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "other", f"training.init_from={run}", "model.dim=32",
                       *common)
    assert_one_line_error(code, err, "training.init_from takes model.* from its checkpoint (model.dropout and "
                                     "model.max_seq_len aside): drop model.dim")


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_pretraining_from_a_checkpoint_at_another_context(layout, tmp_path, capsys):
    """model.max_seq_len under training.init_from (nanoGPT's crop_block_size): a learned position table keeps
    its first rows, and cannot grow (refused, nothing written); RoPE holds any length."""
    ckpt = tmp_path / "ckpt"
    source = gpt2_dir(tmp_path) if layout == "gpt2" else llama_dir(tmp_path)
    assert main(["import-hf", "--model", str(source), "--out", str(ckpt)]) == 0
    context = 16 if layout == "gpt2" else 64  # the checkpoint's: 40
    run = tmp_path / "run"
    code, printed, err = cli(capsys, "pretrain", "--out", run, f"training.init_from={ckpt}",
                             f"model.max_seq_len={context}", *one_step_at_a_tiny_lr(tmp_path))
    assert code == 0, err
    assert f"context 40 -> {context} tokens (model.max_seq_len)" in printed
    trained, cfg, _ = load_model(run)
    start, _, _ = load_model(ckpt)
    assert cfg.model.max_seq_len == context
    for name, weight in start.state_dict().items():
        expected = weight[:context] if name == "pos_embed.weight" else weight
        torch.testing.assert_close(trained.state_dict()[name], expected, atol=1e-6, rtol=0)
    code, printed, err = cli(capsys, "pretrain", "--out", run, "--resume", "training.max_steps=2", "--json")
    assert code == 0 and json.loads(printed.strip().splitlines()[-1])["steps"] == 2, err
    if layout == "llama":  # its tokenizer's documents run <s> ... </s>, as Llama's training data did
        tokens = np.fromfile(next((tmp_path / "data").rglob("train.bin")), dtype=np.uint16).tolist()
        starts = [i for i, t in enumerate(tokens) if t == 0]
        assert starts and starts[0] == 0 and all(tokens[i - 1] == 1 for i in starts[1:])
        assert tokens.count(0) == tokens.count(1)
    if layout == "gpt2":
        longer = tmp_path / "longer"
        code, _, err = cli(capsys, "pretrain", "--out", longer, f"training.init_from={ckpt}", "model.max_seq_len=41",
                           *one_step_at_a_tiny_lr(tmp_path))
        assert_one_line_error(code, err, "model.max_seq_len=41 is longer than training.init_from's learned position "
                                         "table (40 positions); give at most 40")
        assert not longer.exists()


def test_a_model_without_tokenizer_files_is_imported_without_one(tmp_path, capsys):
    """transformers 5 makes an empty GPT-2 tokenizer for such a directory: written, it encoded text as nothing."""
    out = tmp_path / "ckpt"
    src = gpt2_dir(tmp_path, tokenizer=False)
    capsys.readouterr()
    code, printed, err = cli(capsys, "import-hf", "--model", src, "--out", out, "--json")
    assert code == 0 and not json.loads(printed.strip().splitlines()[-1])["tokenizer"]
    assert "has no tokenizer transformers can load" in err and not (out / "tokenizer.json").exists()
