import pytest

from nanogpt4.config import load_config
from nanogpt4.errors import UserError


def test_presets_load_with_seed_values():
    base = load_config("configs/base.yaml")
    assert (base.model.dim, base.model.n_layers, base.model.n_heads) == (768, 12, 12)
    assert (base.model.vocab_size, base.model.max_seq_len) == (50257, 128)
    assert base.training.batch_size == 32 and base.training.learning_rate == pytest.approx(6e-5)
    assert base["rlhf"]["clip_epsilon"] == 0.2 and base.rlhf.ppo_epochs == 4
    assert base.multimodal.encoder == "vit"
    tiny = load_config("tiny")
    assert tiny.model.dim == 192 and tiny.data.source == "stdlib"


def test_overrides_and_access():
    cfg = load_config("tiny", ["training.max_steps=7", "model.pos_embedding=rope", "data.source=text:x.txt"])
    assert cfg.training.max_steps == 7 and cfg["training"]["max_steps"] == 7
    assert cfg.model.pos_embedding == "rope" and cfg.data.source == "text:x.txt"


@pytest.mark.parametrize("override,meant", [
    ("training.lr=1e-3", "'training.learning_rate'"),  # other trainers' names, in the section given
    ("model.n_embd=64", "'model.dim'"),
    ("model.block_size=64", "'model.max_seq_len'"),
    ("training.max_iters=9", "'training.max_steps'"),
    ("data.data_dir=runs/x", "'data.dir'"),
    ("data.dataset=shakespeare", "'data.source'"),
    ("lr=1e-3", "'training.learning_rate'"),  # no section: the first one that has it
    ("training.n_layer=2", "'model.n_layers'"),  # the wrong section: never one of its own keys
    ("rlhf.kl=1", "one of 'rlhf.kl_coef', 'rlhf.target_kl', 'rlhf.kl_horizon'"),
    ("rlhf.lr=1", "one of 'rlhf.sft_learning_rate', 'rlhf.reward_model_lr', 'rlhf.dpo_learning_rate', "
                  "'rlhf.ppo_learning_rate'"),
])
def test_unknown_keys_suggest_what_they_mean(override, meant):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert str(e.value).endswith(f"did you mean {meant}?")


@pytest.mark.parametrize("override,ending", [
    # nothing close in a known section: its keys, not a pointer to a file the user may not have
    ("data.path=x", "; data has source, tokenizer, dir, val_fraction, max_bytes, text_field, cache_dir"),
    ("foo.bar=1", "; the top-level keys are model, data, training, rlhf, multimodal, seed, device"),
])
def test_unknown_keys_with_nothing_close_list_what_there_is(override, ending):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert str(e.value).endswith(ending)


@pytest.mark.parametrize("override,needle", [
    ("training.max_stpes=3", "did you mean 'training.max_steps'"),
    ("model.dimm=3", "did you mean 'model.dim'"),
    ("model.dim=100", "divisible by model.n_heads"),
    ("training.learning_rate=-1", "learning_rate must be positive"),
    ("model.dim=abc", "bad value for 'model.dim'"),
    ("model.mlp=relu", "not one of gelu, gelu_tanh, swiglu"),
    ("model.n_kv_heads=4", "multiple of model.n_kv_heads"),
    ("training.dtype=fp8", "not one of auto"),
    ("max_steps", "must look like section.key=value"),
    ("training.batch_size=0", "must be positive"),
    ("rlhf.dpo_learning_rate=0", "rlhf.dpo_learning_rate must be positive"),
    ("rlhf.ppo_learning_rate=-1e-5", "rlhf.ppo_learning_rate must be positive"),
    ("multimodal.token_merge=3", "token_merge=3 must divide the patch grid"),
    # these reached torch's own errors (a traceback) or trained with nonsense
    ("model.n_kv_heads=0", "model.n_kv_heads must be positive (or null: model.n_heads), got 0"),
    ("training.max_tokens=0", "training.max_tokens must be positive (or null: no limit), got 0"),
    ("training.max_time_s=-5", "training.max_time_s must be positive (or null: no limit), got -5.0"),
    ("training.lr_decay_steps=-3", "training.lr_decay_steps must be positive (or null: max_steps), got -3"),
    ("training.beta1=1.5", "training.beta1 and beta2 must be in [0, 1) and training.eps positive"),
    ("training.eps=0", "training.beta1 and beta2 must be in [0, 1) and training.eps positive"),
    ("training.sample_tokens=-1", "training.sample_tokens must be >= 0 (0: no samples), got -1"),
    ("rlhf.mini_batch_size=0", "rlhf.mini_batch_size must be positive, got 0"),
    ("rlhf.ppo_steps=-1", "rlhf.ppo_steps must be >= 0, got -1"),
    ("rlhf.samples_per_prompt=1", "rlhf.samples_per_prompt must be >= 2 (the judge ranks them in pairs)"),
    ("rlhf.lam=1.5", "rlhf.gamma and rlhf.lam must be in [0, 1], got 1.0 and 1.5"),
    ("rlhf.target_kl=0", "rlhf.target_kl must be positive (or null: a fixed rlhf.kl_coef), got 0.0"),
    ("multimodal.learning_rate=0", "multimodal.learning_rate must be positive, got 0.0"),
    ("data.max_bytes=0", "data.max_bytes must be positive (or null: all of the source), got 0"),
])
def test_bad_values_raise_clear_errors(override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_config("tiny", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"not found; pass a YAML path or a preset name \(base, tiny\)"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # the README's configs/tiny.yaml typed outside the repository
    with pytest.raises(UserError, match=rf"'configs/tiny.yaml' not found in {tmp_path}; the bundled preset of that "
                                        rf"name is --config tiny"):
        load_config("configs/tiny.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="cannot parse"):
        load_config(bad)
    # where and what, on one line: the first line of PyYAML's message ("mapping values are not allowed here",
    # or "while parsing a flow sequence") said neither
    bad.write_text("model:\n  dim: 64\n  n_layers: 2\n   n_heads: 4\n")
    with pytest.raises(UserError, match=r"^cannot parse config '.*bad.yaml': line 4, column 11: mapping values are "
                                        r"not allowed"):
        load_config(bad)
    with pytest.raises(UserError, match=r"^cannot parse override 'model.dim=\[1,2': [^\n]*expected ',' or '\]'[^\n]* "
                                        r"\(while parsing a flow sequence\)$"):  # libyaml's words or PyYAML's
        load_config("tiny", ["model.dim=[1,2"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  n_layer: 3\n")
    with pytest.raises(UserError, match="did you mean 'model.n_layers'"):
        load_config(typo)


def test_a_config_extends_a_preset_or_another_file(tmp_path):
    """A partial YAML used to get the schema's defaults (the seed's GPT-2 shape: 768 wide, vocab 50,257, lr 6e-5)
    for every key it left out; ``extends: tiny`` starts it from the preset instead."""
    tiny = load_config("tiny")
    (tmp_path / "wide.yaml").write_text("extends: tiny\nmodel:\n  dim: 256\n  n_heads: 8\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "short.yaml").write_text("extends: ../wide.yaml\ntraining:\n  max_steps: 7\n")
    cfg = load_config(tmp_path / "sub" / "short.yaml", ["training.learning_rate=1e-3"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.training.max_steps, cfg.training.learning_rate) == (256, 8, 7, 1e-3)
    for key in ("model.n_layers", "model.vocab_size", "training.batch_size", "data.source"):  # tiny's, not base's
        assert cfg[key.split(".")[0]][key.split(".")[1]] == tiny[key.split(".")[0]][key.split(".")[1]]
    assert "extends" not in cfg
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (tmp_path / "list.yaml").write_text("extends: [tiny]\n")
    (tmp_path / "gone.yaml").write_text("extends: nope.yaml\n")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")  # trained the 124M schema defaults, unannounced
    for name, said in [("a.yaml", "extends itself"), ("list.yaml", "extends must be a preset name"),
                       ("gone.yaml", "extends 'nope.yaml', which is not there"), ("empty.yaml", "sets nothing")]:
        with pytest.raises(UserError, match=said):
            load_config(tmp_path / name)


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", ["model.dim=240", "training.learning_rate=2e-5", "rlhf.target_kl=null", "data.source=text:a b.txt"]),
    ("base", []),
])
def test_config_prints_a_yaml_file_that_loads_back_to_the_same_config(preset, overrides, tmp_path, capsys):
    from omegaconf import OmegaConf

    from .test_cli import cli

    code, printed, _ = cli(capsys, "config", "--config", preset, *overrides)
    assert code == 0
    (tmp_path / "c.yaml").write_text(printed)
    expected = OmegaConf.to_container(load_config(preset, overrides))
    assert OmegaConf.to_container(load_config(tmp_path / "c.yaml")) == expected
    # every key, each with what its schema says of it
    assert "  n_kv_heads: null  # None = n_heads (multi-head); fewer = grouped-query attention" in printed.splitlines()
    assert "  learning_rate: 2.0e-05" in printed.splitlines() or preset == "base"
    code, _, err = cli(capsys, "config", "--config", preset, "model.dims=3")
    assert code == 2 and "did you mean 'model.dim'" in err


def test_commented_yaml_keeps_any_string():
    from omegaconf import OmegaConf

    from nanogpt4.config import commented_yaml, config_from_yaml_text

    cfg = load_config("tiny")
    cfg.training.sample_prompt = 'def f():\n\treturn "é\\\\"  # no comment: µ'
    cfg.training.learning_rate = 3e-7
    back = config_from_yaml_text(commented_yaml(cfg))
    assert OmegaConf.to_container(back) == OmegaConf.to_container(cfg)
