"""Checkpoints: ``model.safetensors`` + ``config.yaml`` + ``tokenizer.json`` + ``trainer_state.pt``.

Each checkpoint is written into a temp directory and renamed into place, so a run killed at any instant
leaves complete checkpoints only. ``trainer_state.pt`` holds plain tensors/numbers and loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from nanogpt4.config import config_from_yaml_text, to_yaml
from nanogpt4.errors import UserError
from nanogpt4.utils import atomic_dir, require_free_space

STEP_RE = re.compile(r"^step_(\d+)$")


def tied_aliases(model: nn.Module) -> set[str]:
    """Names under which an already-listed parameter appears again (the tied LM head)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def model_tensors(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    state = model.state_dict() if state is None else state
    skip = tied_aliases(model)
    return {k: t.detach().to("cpu").contiguous() for k, t in state.items() if k not in skip}


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(model_tensors(model), str(path), metadata=metadata or {})


def _unreadable(path: Path, reason: str, what: str = "weights") -> UserError:
    """A checkpoint file that does not load (ours are written atomically, so it was damaged after: a copy cut
    short, a disk error): name the checkpoint before it where the run has one. ``reason``: the loader's error,
    its first line."""
    message = f"cannot read {what} '{path}': {reason.splitlines()[0]}"
    ckpt = Path(path).parent
    if STEP_RE.match(ckpt.name):
        earlier = [p for _, p in list_checkpoints(ckpt.parent.parent) if p != ckpt]
        if earlier:
            message += f"; if it is damaged, move {ckpt} away to use the checkpoint before it ({earlier[-1]})"
    return UserError(message)


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise _unreadable(path, str(e)) from None


def is_multimodal(ckpt: Path) -> bool:
    """A vision-language checkpoint (`nanogpt4 multimodal`): it carries the image projector."""
    return any(k.startswith("projector.") for k in tensor_names(Path(ckpt) / "model.safetensors"))


def load_weights(model: nn.Module, path: Path, crop_positions: bool = False) -> None:
    """Load safetensors weights, naming the first missing/unexpected/mis-shaped tensor on mismatch.
    ``crop_positions``: a longer learned position table than the model's keeps its first rows."""
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise _unreadable(path, str(e)) from None
    expected = model_tensors(model)
    table = tensors.get("pos_embed.weight")
    if crop_positions and table is not None and "pos_embed.weight" in expected:
        tensors["pos_embed.weight"] = table[:expected["pos_embed.weight"].shape[0]]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(f"checkpoint '{path}' does not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; was it saved with another architecture/config?")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise UserError(f"checkpoint '{path}' tensor '{k}' has shape {tuple(t.shape)} but the config builds "
                            f"{tuple(expected[k].shape)}; use the checkpoint's own config.yaml")
    model.load_state_dict(tensors, strict=False)  # tied weights arrive through their first name


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ck.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def newest_checkpoint_under(run_dir: Path) -> Path | None:
    """The most recently written checkpoint of a run directory or of any stage inside it (a multimodal run's
    align/ and tune/, an rlhf run's sft/ ... dpo/, a reward run's twin), None when there is none."""
    found = [p for root in Path(run_dir).glob("**/checkpoints") for _, p in list_checkpoints(root.parent)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, cfg, tokenizer_path: Path | None,
                    trainer_state: dict, keep_last: int, best: bool = False,
                    weights: dict[str, torch.Tensor] | None = None, extra: dict[str, nn.Module] | None = None) -> Path:
    """Write ``checkpoints/step_N`` atomically; ``weights`` overrides the model's own (gathered FSDP shards);
    ``extra``: other models trained beside it, each as ``NAME.safetensors`` (PPO's critic)."""
    ck_root = Path(run_dir) / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step_{step}"
    files = {"model": model_tensors(model, weights), **{name: model_tensors(m) for name, m in (extra or {}).items()}}
    fix = "free space (or lower training.keep_last)"
    # the new checkpoint is written beside the kept ones before the oldest is pruned
    require_free_space(ck_root, _tensor_bytes(files) + _tensor_bytes(trainer_state), f"checkpoint {final.name}",
                       fix)
    with atomic_dir(final, fix) as tmp:
        for name, tensors in files.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
        (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        if tokenizer_path is not None and Path(tokenizer_path).exists():
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if best:
        _link_best(ck_root, final)
    _prune(ck_root, keep_last)
    return final


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint payload: what writing it takes on disk, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _link_best(ck_root: Path, src: Path) -> None:
    """``checkpoints/best`` = hard links to the best step's files (no copy, survives pruning)."""
    with atomic_dir(ck_root / "best") as tmp:
        for f in src.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copyfile(f, tmp / f.name)
        (tmp / "STEP").write_text(src.name.split("_")[1])


def _prune(ck_root: Path, keep_last: int) -> None:
    found = list_checkpoints(ck_root.parent)
    for _, path in found[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message here advises weights_only=False, which would run whatever code the file holds
        raise _unreadable(path, "not a trainer state that nanogpt4 wrote (torch.load with weights_only=True "
                                "refuses it)", "the trainer state") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise _unreadable(path, str(e), "the trainer state") from None


def resume_point(run_dir: Path, max_steps: int, steps_name: str = "step", setting: str = "",
                 trained: str = "the trained model") -> tuple[int, Path, dict] | None:
    """Where a stage's ``--resume`` picks up: (step, checkpoint, trainer state) of ``run_dir``'s latest checkpoint,
    or None when it has none (the stage starts again). Refuses a checkpoint past ``max_steps`` (``setting``: the
    config key that sets them, for the message), and one without optimizer state short of them: that is the
    stage's ``trained`` model, saved after its training, which more steps cannot train on."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    step, ckpt = found[-1]
    if step > max_steps:
        raise UserError(f"'{run_dir}' is at {steps_name} {step}, past the {max_steps} steps now asked for{setting}; "
                        f"give at least {step} to train on (nothing was trained)")
    state = load_trainer_state(ckpt)
    if "optimizer" not in state and step < max_steps:
        raise UserError(f"{ckpt} holds {trained} without the optimizer state that more steps would need; train on "
                        f"from it in a new run (nothing was trained)")
    return step, ckpt, state


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint, or the run's final weights) or a checkpoint directory."""
    p = Path(path)
    if (p / "model.safetensors").exists() and (p / "config.yaml").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    if (p / "meta.json").exists() and (p / "train.bin").exists():
        from nanogpt4.data.prepare import prepared_with  # here: data preparation pulls in tokenizers, tqdm

        made_with = prepared_with(json.loads((p / "meta.json").read_text()))
        command = ["nanogpt4", "pretrain", f"data.dir={path}"] + [
            f"{k}={v}" for k, v in made_with.items() if v is not None and (k, v) != ("data.tokenizer", "bpe")]
        raise UserError(f"'{path}' holds prepared data, not a model; train one on it first: "
                        f"{shlex.join(command)} --out runs/NAME")
    inside = runs_under(p)
    if inside:  # a pipeline's output, or the RLHF stage's folder of runs
        names = ", ".join(r.relative_to(p).as_posix() for r in inside)
        raise UserError(f"'{path}' holds {len(inside)} runs, not one: {names}; pass the one you mean "
                        f"({p.as_posix()}/NAME)")
    if (p / "metrics.jsonl").exists() and (p / "config.yaml").exists():
        raise UserError(f"'{path}' holds a run stopped before its first checkpoint: it has no weights to load; "
                        f"train it again (delete it first), or give a lower training.checkpoint_interval")
    raise UserError(f"'{path}' is neither a checkpoint nor a run with checkpoints; "
                    f"pass a run directory (runs/NAME, after `nanogpt4 pretrain`) or a checkpoints/step_N directory")


def _is_run(d: Path) -> bool:
    """A checkpoint, a run with checkpoints, or a `nanogpt4 multimodal` run (its stages' checkpoints)."""
    return (((d / "model.safetensors").exists() and (d / "config.yaml").exists())
            or any(latest_checkpoint(d / s) is not None for s in ("", "tune", "align")))


def runs_under(p: Path, depth: int = 2) -> list[Path]:
    """The runs in ``p``'s subdirectories, ``depth`` levels down, in name order."""
    if not p.is_dir():
        return []
    found: list[Path] = []
    for d in sorted(x for x in p.iterdir() if x.is_dir() and not x.name.startswith(".")):
        if _is_run(d):
            found.append(d)
        elif depth > 1:
            found += runs_under(d, depth - 1)
    return found


def resolve_stage_checkpoint(path: str | Path) -> Path:
    """``resolve_checkpoint``, and for a `nanogpt4 multimodal` run's directory its last stage's latest checkpoint."""
    p = Path(path)
    stage = next((p / s for s in ("tune", "align") if latest_checkpoint(p / s) is not None), p)
    return resolve_checkpoint(stage)


def refuse_other_models(path: str | Path, ckpt: Path) -> None:
    """A language model is wanted: name what ``path`` (resolved to ``ckpt``) holds instead (a vision-language or
    reward model), where the tensor-name mismatch would say little."""
    if is_multimodal(ckpt):
        raise UserError(f"'{path}' is a `nanogpt4 multimodal` run (a vision-language model): ask it about an image "
                        f"with `nanogpt4 ask --run {path} --image FILE`")
    if "reward_head.weight" in tensor_names(ckpt / "model.safetensors"):
        raise UserError(f"'{path}' is a reward model (`nanogpt4 reward`): it scores text and does not generate; "
                        f"use the SFT, PPO or DPO run next to it")


def load_model(path: str | Path, device: torch.device | str = "cpu", model_cls: type[nn.Module] | None = None):
    """(model, config, tokenizer) from a run or checkpoint directory; ``model_cls`` (default ``Transformer``)
    is built from the checkpoint's config."""
    from nanogpt4.data.tokenizer import Tokenizer
    from nanogpt4.model.transformer import Transformer

    ckpt = resolve_stage_checkpoint(path)
    if model_cls is None:
        refuse_other_models(path, ckpt)
    cfg = config_from_yaml_text((ckpt / "config.yaml").read_text(encoding="utf-8"))
    model = (model_cls or Transformer)(cfg)
    load_weights(model, ckpt / "model.safetensors")
    tok_path = ckpt / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.exists() else None
    return model.to(device).eval(), cfg, tokenizer
