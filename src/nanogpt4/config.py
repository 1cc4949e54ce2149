"""Typed configuration: YAML files + dotted overrides, validated with clear errors.

``load_config("configs/tiny.yaml", ["training.max_steps=10"])`` returns an OmegaConf object backed by
the dataclasses below, so ``cfg.model.dim`` and ``cfg["rlhf"]["clip_epsilon"]`` both work, and a typo or
a wrong type is caught at load time instead of hours into a run.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from nanogpt4.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    vocab_size: int = 50257
    max_seq_len: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos_embedding: str = "learned"  # learned | rope
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (exact, erf) | gelu_tanh (GPT-2's "gelu_new": its tanh approximation) | swiglu
    mlp_hidden: int | None = None  # None = 4*dim for gelu, the 2/3*4*dim rounded to 64 for swiglu
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    parametrization: str = "sp"  # sp (standard, GPT-2) | mup (maximal update: hyperparameters transfer across width)
    mup_base_dim: int = 128  # µP: the width at which init and learning rates equal the tuned values


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | stdlib:all | text:PATH_OR_GLOB | jsonl:PATH | shakespeare | hf:NAME[:CONFIG]
    # bpe (trained on the train split, size = model.vocab_size) | gpt2 (tiktoken) | PATH of a tokenizer.json
    # (e.g. a run's: new data encoded with the tokenizer that run was trained with)
    tokenizer: str = "bpe"
    dir: str | None = None  # where prepared shards live; None = runs/data/<source>-<tokenizer>-<vocab>
    val_fraction: float = 0.05  # share of the documents held out for validation
    max_bytes: int | None = None  # cap on the raw text read (quick experiments)
    text_field: str = "text"  # field read by jsonl: and hf: sources
    cache_dir: str | None = None  # downloads (shakespeare); None = ~/.cache/nanogpt4


@dataclass
class TrainingConfig:
    batch_size: int = 32  # sequences per optimizer step, summed over accumulation and ranks
    learning_rate: float = 6e-5
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000
    max_tokens: int | None = None  # stop once this many training tokens were seen
    max_time_s: float | None = None  # stop after this much wall time (a cooldown is brought forward to end there)
    lr_decay_steps: int | None = None  # cosine length; None = max_steps
    cooldown_steps: int = 0  # the last N steps fall linearly to the floor (anneals a run stopped on a long cosine)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    eval_interval: int = 100  # steps between evaluations (val loss, bits per byte, a sample)
    eval_iters: int = 10  # batches per evaluation
    eval_batch_size: int | None = None  # windows per eval batch; None = min(batch_size, 32)
    log_interval: int = 10  # steps between training-loss rows of metrics.jsonl (evaluations log their own)
    checkpoint_interval: int = 500  # steps between checkpoints
    keep_last: int = 2  # latest checkpoints kept (checkpoints/best apart)
    dtype: str = "auto"  # auto | float32 | bfloat16
    compile: bool = False
    fsdp: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    tensorboard: bool = False
    sample_tokens: int = 64  # a sample is generated at each eval; 0 disables
    sample_prompt: str = ""  # what those samples continue; empty: a document's start
    # pretrain from this checkpoint's weights (a run, checkpoints/step_N, or `import-hf`'s): its model.* (dropout
    # aside) and, unless data.tokenizer names one, its tokenizer
    init_from: str | None = None


@dataclass
class RLHFConfig:
    sft_steps: int = 200
    sft_learning_rate: float = 1e-4
    sft_examples: int = 4000  # offline tasks SFT trains on (without --data)
    reward_model_lr: float = 1e-5
    reward_steps: int = 200
    freeze_base: bool = False
    compare_frozen_base: bool = True  # also train the other variant (frozen vs fine-tuned base) and report both
    judge: str = "python-syntax"
    label_prompts: int = 1000  # prompts sampled by the SFT policy and labelled by the judge
    samples_per_prompt: int = 4  # K samples per prompt, ranked by the judge
    label_all_pairs: bool = True  # every separated pair of the K (InstructGPT); false: only the best vs the worst
    label_min_gap: float = 0.05  # judge-score difference below which a pair counts as a tie
    eval_prompts: int = 256  # held-out prompts every policy is judged on
    best_of_n: int = 4
    dpo_steps: int = 150
    dpo_learning_rate: float = 5e-5
    ppo_learning_rate: float = 2e-5
    no_eos_penalty: float = 0.5  # taken off the score of a PPO response that never ends
    ppo_epochs: int = 4
    ppo_steps: int = 100
    clip_epsilon: float = 0.2  # PPO's clip of the probability ratio
    value_clip: float = 0.2  # clip of the value head's change per update
    kl_coef: float = 0.05  # starting weight of the per-token KL penalty to the SFT model
    target_kl: float | None = 6.0  # KL the adaptive controller steers kl_coef to; None: kl_coef fixed
    kl_horizon: int = 10000  # the controller's horizon (Ziegler et al.): larger, slower changes
    gamma: float = 1.0  # GAE's discount
    lam: float = 0.95  # GAE's lambda
    rollout_batch_size: int = 32
    mini_batch_size: int = 8
    max_new_tokens: int = 32
    dpo_beta: float = 0.1  # DPO's beta: how far from the SFT model the policy may move (larger: less far)


@dataclass
class MultimodalConfig:
    encoder: str = "vit"  # vit | cnn (the seed's two conv layers)
    image_size: int = 32
    patch_size: int = 8  # encoder patches per image = (image_size / patch_size)^2
    token_merge: int = 1  # pixel shuffle: each k x k block of encoder patches -> one image token (k^2 fewer tokens)
    stem: str = "conv"  # conv (stride-2 3x3 convs; needs a power-of-two patch) | patch (one strided conv)
    channels: int = 3
    encoder_dim: int = 128
    encoder_layers: int = 2
    encoder_heads: int = 4
    pretrained_encoder: str | None = None  # a transformers vision model (name or local dir) instead of the ViT
    freeze_encoder: bool = True  # with pretrained_encoder: keep its weights fixed
    image_token_id: int = 2  # <|image|> in the BPE tokenizer; set from the tokenizer at run time
    encoder_lr_scale: float = 1.0
    projector_lr_scale: float = 1.0
    data: str = "scenes+digits"  # scenes | digits | scenes+digits | jsonl:PATH (image, prompt, answer)
    digits_fraction: float = 0.3  # share of training rows from the digits set in scenes+digits
    batch_size: int = 64
    learning_rate: float = 1e-3
    align_steps: int = 300  # stage 1 (LLaVA): LM frozen, encoder + projector learn to speak its language
    tune_steps: int = 3000  # stage 2: everything trains
    lr_decay_steps: int | None = None  # stage 2's warmup and cosine as for this many steps; None = tune_steps
    cooldown_steps: int = 0  # stage 2's last N steps fall linearly to the floor (as training.cooldown_steps)
    eval_scenes: int = 600  # held-out scenes (questions are drawn per scene)
    max_new_tokens: int = 24
    augment: bool = True  # random shifts of training images


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    seed: int = 1337
    device: str = "auto"


CHOICES = {
    "model.pos_embedding": ("learned", "rope"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "gelu_tanh", "swiglu"),
    "model.parametrization": ("sp", "mup"),
    "training.dtype": ("auto", "float32", "bfloat16"),
    "multimodal.encoder": ("vit", "cnn"),
    "multimodal.stem": ("conv", "patch"),
}


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A file path, or the name of a bundled preset (``tiny``, ``base``)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / f"{p.stem}.yaml"
    if not p.suffix and bundled.is_file():
        return bundled
    presets = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    if bundled.is_file():  # configs/tiny.yaml typed outside the repository: the package carries the same file
        raise UserError(f"config file '{path}' not found in {Path.cwd()}; the bundled preset of that name is "
                        f"--config {p.stem}")
    raise UserError(f"config file '{path}' not found; pass a YAML path or a preset name ({presets})")


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node[k], full + "."))
    return keys


# What nanoGPT, Hugging Face and most trainers call our keys: users bring these names with them.
KEY_ALIASES = {
    "lr": "learning_rate", "n_embd": "dim", "d_model": "dim", "hidden_size": "dim", "n_layer": "n_layers",
    "num_layers": "n_layers", "num_hidden_layers": "n_layers", "n_head": "n_heads", "num_heads": "n_heads",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "block_size": "max_seq_len",
    "n_positions": "max_seq_len", "seq_len": "max_seq_len", "context_length": "max_seq_len",
    "max_iters": "max_steps", "steps": "max_steps", "warmup_iters": "warmup_steps",
    "lr_decay_iters": "lr_decay_steps", "gradient_accumulation_steps": "grad_accum_steps",
    "micro_batch_size": "batch_size", "grad_norm_clip": "grad_clip", "max_grad_norm": "grad_clip",
    "data_dir": "dir", "dataset": "source",
}


def _unknown_key_error(key: str, schema: DictConfig, where: str) -> UserError:
    known = _all_keys(schema)
    leaf_keys = [k for k in known if not isinstance(OmegaConf.select(schema, k), DictConfig)]
    section, _, leaf = key.rpartition(".")
    meant = KEY_ALIASES.get(leaf, leaf)
    siblings = {k.rsplit(".", 1)[-1]: k for k in leaf_keys if k.rpartition(".")[0] == section}
    close = [siblings[meant]] if meant in siblings else []
    if not close:  # a typo in the last component, in the section the key names
        m = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        close = [siblings[m[0]]] if m else []
    if not close:  # the section has several of them (rlhf.lr: sft_learning_rate, ppo_learning_rate, ...)
        close = [k for name, k in siblings.items() if leaf in name.split("_") or f"_{meant}" in name]
    if not close:  # a misspelt section, or a key of another section (the same section's keys were tried)
        others = [k for k in (leaf_keys if section else known) if not k.startswith(f"{section}.")]
        close = difflib.get_close_matches(key, others, n=1, cutoff=0.6)
    if not close:  # the right leaf in the wrong section: the first section that has it
        leaves: dict[str, str] = {}
        for k in leaf_keys:
            leaves.setdefault(k.rsplit(".", 1)[-1], k)
        m = difflib.get_close_matches(meant, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    meaning = f"one of {', '.join(repr(k) for k in close)}" if len(close) > 1 else repr(close[0]) if close else ""
    if close:
        hint = f"; did you mean {meaning}?"
    elif section and siblings:  # a section the schema has, and nothing in it close: its keys are the list
        hint = f"; {section} has {', '.join(siblings)}"
    elif not section:
        hint = f"; the top-level keys are {', '.join(schema)}"
    else:
        hint = "; see configs/base.yaml for the known keys"
    return UserError(f"unknown config key '{key}' in {where}{hint}")


def _merge(base: DictConfig, other: Any, where: str, schema: DictConfig) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = e.full_key if getattr(e, "full_key", None) else str(e)
        raise _unknown_key_error(key, schema, where) from None
    except ValidationError as e:
        raise UserError(f"bad value for '{e.full_key}' in {where}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"invalid config in {where}: {str(e).splitlines()[0]}") from None


def yaml_problem(e: Exception, one_line: bool = False) -> str:
    """One line for a YAML error: where and what (its message spans several lines, the file's quoted among them;
    its first line alone, "while parsing a flow sequence", said neither). ``one_line``: an override's value, where
    the place (past its end, often) tells nothing."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context})" if e.context else ""
        where = "" if one_line else f"line {mark.line + 1}, column {mark.column + 1}: "
        return f"{where}{e.problem}{context}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _config_files(path: str | os.PathLike, beside: Path | None = None,
                  chain: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """A config file and the files it ``extends:`` (a preset name or a YAML path, relative to the file that names
    it), the furthest ancestor first: a partial YAML that extends ``tiny`` gets tiny's settings, not the schema's
    (the seed's GPT-2 shape) for every key it leaves out."""
    try:
        p = beside / path if beside is not None and (beside / path).is_file() else resolve_config_path(path)
    except UserError as e:
        if not chain:
            raise
        raise UserError(f"config '{chain[-1]}' extends '{path}', which is not there: {e}") from None
    if p.resolve() in chain:
        raise UserError(f"config '{p}' extends itself ({' -> '.join(str(c) for c in (*chain, p.resolve()))})")
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:
        raise UserError(f"cannot parse config '{p}': {yaml_problem(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"config '{p}' must be a YAML mapping of sections (model:, training:, ...)")
    if not loaded:  # it would train the schema's defaults, the 124M GPT-2 shape, with no word said
        raise UserError(f"config '{p}' sets nothing; write the keys to change (model:, training:, ...), with "
                        f"`extends: tiny` (or base) for the rest, or pass --config tiny")
    parent = loaded.pop("extends", None)
    if parent is None:
        return [(p, loaded)]
    if not isinstance(parent, str):
        raise UserError(f"config '{p}': extends must be a preset name (tiny, base) or a YAML path, got {parent!r}")
    return [*_config_files(parent, p.parent, (*chain, p.resolve())), (p, loaded)]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                check: bool = True) -> DictConfig:
    """Load a YAML config (or a preset name) over the typed defaults, apply ``key=value`` overrides, and
    (``check``) validate the result: a caller that replaces a section first validates after it."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    for p, loaded in _config_files(path) if path is not None else []:
        cfg = _merge(cfg, loaded, f"'{p}'", schema)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like section.key=value, e.g. training.max_steps=10")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            dotlist = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception as e:
            raise UserError(f"cannot parse override '{item}': {yaml_problem(e, one_line=True)}") from None
        cfg = _merge(cfg, dotlist, f"override '{item}'", schema)
    if check:
        validate(cfg)
    return cfg


def _flat(node: Any, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def settings_changes(saved: DictConfig, now: DictConfig, sections: tuple[str, ...],
                     ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) for every leaf of ``sections`` that differs, ``ignore``'s keys left out."""
    a, b = OmegaConf.to_container(saved), OmegaConf.to_container(now)
    old = _flat({k: a.get(k) for k in sections})  # type: ignore[union-attr]
    new = _flat({k: b.get(k) for k in sections})  # type: ignore[union-attr]
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in ignore]


def changes_text(changes: list[tuple[str, Any, Any]], shown: int = 3) -> str:
    """``settings_changes``' first ``shown`` changes as "key old -> new; ...", then how many more."""
    text = "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes[:shown])
    return text + (f" and {len(changes) - shown} more" if len(changes) > shown else "")


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that a type system cannot express."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    if cfg.data.tokenizer not in ("bpe", "gpt2") and not cfg.data.tokenizer.endswith(".json"):
        raise UserError(f"data.tokenizer={cfg.data.tokenizer!r} is not one of bpe, gpt2, or the path of a "
                        f"tokenizer.json (e.g. runs/NAME/tokenizer.json)")
    m, t = cfg.model, cfg.training
    for key in ("model.dim", "model.n_layers", "model.n_heads", "model.vocab_size", "model.max_seq_len",
                "training.batch_size", "training.max_steps", "training.grad_accum_steps",
                "training.eval_interval", "training.eval_iters", "training.log_interval",
                "training.checkpoint_interval", "training.keep_last"):
        if OmegaConf.select(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    for key, unset in (("eval_batch_size", "min(batch_size, 32)"), ("max_tokens", "no limit"),
                       ("max_time_s", "no limit"), ("lr_decay_steps", "max_steps")):
        if t[key] is not None and not t[key] > 0:
            raise UserError(f"training.{key} must be positive (or null: {unset}), got {t[key]}")
    if not (0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0 and t.eps > 0):
        raise UserError(f"training.beta1 and beta2 must be in [0, 1) and training.eps positive, got {t.beta1}, "
                        f"{t.beta2}, {t.eps}")
    if t.sample_tokens < 0:
        raise UserError(f"training.sample_tokens must be >= 0 (0: no samples), got {t.sample_tokens}")
    if m.dim % m.n_heads:
        raise UserError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    if m.n_kv_heads is not None and m.n_kv_heads <= 0:
        raise UserError(f"model.n_kv_heads must be positive (or null: model.n_heads), got {m.n_kv_heads}")
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    if m.n_heads % kv:
        raise UserError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}")
    if m.pos_embedding == "rope" and (m.dim // m.n_heads) % 2:
        raise UserError(f"rope needs an even head dim, got {m.dim // m.n_heads}; change model.dim or n_heads")
    if m.mup_base_dim <= 0:
        raise UserError(f"model.mup_base_dim must be a positive width, got {m.mup_base_dim}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.learning_rate <= 0:
        raise UserError(f"training.learning_rate must be positive, got {t.learning_rate}")
    r = cfg.rlhf
    for key in ("sft_learning_rate", "reward_model_lr", "ppo_learning_rate", "dpo_learning_rate", "sft_examples",
                "label_prompts", "eval_prompts", "best_of_n", "ppo_epochs", "rollout_batch_size", "mini_batch_size",
                "max_new_tokens", "kl_horizon", "clip_epsilon", "value_clip", "dpo_beta"):
        if not r[key] > 0:
            raise UserError(f"rlhf.{key} must be positive, got {r[key]}")
    for key in ("sft_steps", "reward_steps", "dpo_steps", "ppo_steps", "label_min_gap", "kl_coef"):
        if not r[key] >= 0:
            raise UserError(f"rlhf.{key} must be >= 0, got {r[key]}")
    if r.samples_per_prompt < 2:
        raise UserError(f"rlhf.samples_per_prompt must be >= 2 (the judge ranks them in pairs), got "
                        f"{r.samples_per_prompt}")
    if not (0.0 <= r.gamma <= 1.0 and 0.0 <= r.lam <= 1.0):
        raise UserError(f"rlhf.gamma and rlhf.lam must be in [0, 1], got {r.gamma} and {r.lam}")
    if r.target_kl is not None and not r.target_kl > 0:
        raise UserError(f"rlhf.target_kl must be positive (or null: a fixed rlhf.kl_coef), got {r.target_kl}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise UserError(f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0 or t.weight_decay < 0 or t.grad_clip < 0:
        raise UserError("training.warmup_steps, weight_decay and grad_clip must be >= 0")
    if not 0 <= t.cooldown_steps <= t.max_steps:
        raise UserError(f"training.cooldown_steps must be in [0, max_steps={t.max_steps}], got {t.cooldown_steps}")
    if t.batch_size % t.grad_accum_steps:
        raise UserError(f"training.batch_size={t.batch_size} must be divisible by "
                        f"training.grad_accum_steps={t.grad_accum_steps}")
    mm = cfg.multimodal
    for key in ("image_size", "patch_size", "token_merge", "channels", "encoder_dim", "encoder_layers",
                "encoder_heads", "batch_size", "eval_scenes", "max_new_tokens", "learning_rate", "encoder_lr_scale",
                "projector_lr_scale"):
        if mm[key] <= 0:
            raise UserError(f"multimodal.{key} must be positive, got {mm[key]}")
    if mm.align_steps < 0 or mm.tune_steps < 0 or mm.align_steps + mm.tune_steps == 0:
        raise UserError("multimodal.align_steps and tune_steps must be >= 0 and not both 0")
    if mm.lr_decay_steps is not None and mm.lr_decay_steps <= 0:
        raise UserError(f"multimodal.lr_decay_steps must be positive (or null: tune_steps), got {mm.lr_decay_steps}")
    if not 0 <= mm.cooldown_steps <= mm.tune_steps:
        raise UserError(f"multimodal.cooldown_steps must be in [0, tune_steps={mm.tune_steps}], got "
                        f"{mm.cooldown_steps}")
    if mm.image_size % mm.patch_size:
        raise UserError(f"multimodal.image_size={mm.image_size} must be a multiple of patch_size={mm.patch_size}")
    if (mm.image_size // mm.patch_size) % mm.token_merge:
        raise UserError(f"multimodal.token_merge={mm.token_merge} must divide the patch grid "
                        f"({mm.image_size // mm.patch_size} = image_size / patch_size)")
    if mm.stem == "conv" and mm.encoder == "vit" and mm.patch_size & (mm.patch_size - 1):
        raise UserError(f"multimodal.stem=conv needs a power-of-two patch_size, got {mm.patch_size}; "
                        f"or set multimodal.stem=patch")
    if mm.encoder_dim % mm.encoder_heads:
        raise UserError(f"multimodal.encoder_dim={mm.encoder_dim} must be divisible by encoder_heads="
                        f"{mm.encoder_heads}")
    if not 0.0 <= mm.digits_fraction <= 1.0:
        raise UserError(f"multimodal.digits_fraction must be in [0, 1], got {mm.digits_fraction}")
    if cfg.data.max_bytes is not None and not cfg.data.max_bytes > 0:
        raise UserError(f"data.max_bytes must be positive (or null: all of the source), got {cfg.data.max_bytes}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def schema_comments() -> dict[str, str]:
    """Each schema key's comment in this file (``"model.n_kv_heads"`` -> ``"None = n_heads (multi-head); ..."``),
    the lines above a field and the one beside it: what ``nanogpt4 config`` prints beside the key. Empty where
    the source cannot be read."""
    import ast
    import inspect
    import io
    import sys
    import tokenize
    from dataclasses import fields

    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    sections = {f.default_factory.__name__: f.name for f in fields(Config) if f.default_factory is not MISSING}
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, line = [], item.lineno - 1
                while line in comments and lines[line - 1].lstrip().startswith("#"):
                    above.insert(0, comments[line])
                    line -= 1
                said = " ".join(above + ([comments[item.lineno]] if item.lineno in comments else []))
                if said:
                    out[f"{sections[node.name]}.{item.target.id}"] = said
    return out


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)  # YAML 1.1 reads 2e-05 as a string: its mantissa needs a dot
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a double-quoted YAML string


def commented_yaml(cfg: DictConfig) -> str:
    """``cfg`` as a YAML file that loads back to it, each key with its schema comment."""
    comments = schema_comments()
    out = []

    def line(text: str, key: str) -> None:
        out.append(f"{text}  # {comments[key]}" if key in comments else text)

    for section, value in OmegaConf.to_container(cfg).items():
        if isinstance(value, dict):
            out.append(f"{section}:")
            for key, v in value.items():
                line(f"  {key}: {_yaml_scalar(v)}", f"{section}.{key}")
        else:
            line(f"{section}: {_yaml_scalar(value)}", section)
    return "\n".join(out) + "\n"


def config_from_yaml_text(text: str) -> DictConfig:
    """Rebuild a validated config from a run's ``config.yaml`` text."""
    schema = OmegaConf.structured(Config)
    cfg = _merge(schema, OmegaConf.create(text), "checkpoint config.yaml", schema)
    validate(cfg)
    return cfg


def with_weights_model(cfg: DictConfig, model: dict) -> DictConfig:
    """``cfg`` with the ``model`` section of weights it will load (an import's, ``training.init_from``'s),
    ``model.dropout`` kept (weights do not fix it), validated as any config is."""
    return config_from_yaml_text(to_yaml(OmegaConf.merge(cfg, {"model": {**model, "dropout": cfg.model.dropout}})))
