"""Fitting ``nanogpt4 pipeline`` to a time budget: ``--scale`` shortens every stage's training, ``--minutes``
picks the scale from this machine's measured speed (13.5 by default: ``DEFAULT_MINUTES``).

The same recipe takes 25 minutes on a 2-core CPU with native bf16 and about four times longer on one without
(fp32 matmuls). A budget keeps every stage and shortens how long each trains; the evaluations keep their size,
so the numbers stay comparable with the full run's. Pretraining is cut least (``stage_scale``): every later
stage starts from its model, and a few hundred more pretraining steps are what turn noise into Python. It follows
the full run's learning-rate curve and anneals at its end, at a smaller batch when it is short
(``shortened_pretraining``).
The estimate is a cost model: one training step of the pipeline's language model and one of its
vision-language model are timed here (a few seconds), and each stage's time is a fixed part plus a part
proportional to its scale, in units of those steps, as measured on the tiny preset (``COSTS``).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.utils import atomic_write_json, autocast_ctx, resolve_device, resolve_dtype

# The RLHF and multimodal settings that count training work; a scale multiplies each (at least 1, or the floor
# given here). Pretraining is shortened its own way (``shortened_pretraining``).
SCALED_STEPS: dict[str, int] = {
    "rlhf.sft_steps": 1, "rlhf.label_prompts": 64, "rlhf.reward_steps": 1, "rlhf.ppo_steps": 1,
    "rlhf.dpo_steps": 1, "multimodal.align_steps": 1, "multimodal.tune_steps": 1,
}
MIN_SCALE = 0.02
# 13.5, not 15: the README's first command creates a venv and installs the package first (55-67 s on 2 cores), and
# the whole command should end inside 15 minutes (at 15 it took 14m49s-15m27s, the pipeline 825-885 s of them; at
# 14, 14m34s-14m56s, the pipeline 826-829 s)
DEFAULT_MINUTES = 13.5
LAST_STAGE_SHARE = 0.95  # the last stage aims at 95% of the budget: its own estimate was 3-4% off either way
COOLDOWN_SHARE = 0.3  # a shortened pretraining or multimodal tune stage anneals over its last 30% of steps
HALF_BATCH_BELOW = 0.5  # ... and trains at half the batch when it gets less than half the recipe's tokens
PRETRAIN_ROOT = 1 / 3  # pretraining trains on scale ** PRETRAIN_ROOT of its tokens (``stage_scale``)

# Each stage's time = fixed + variable probe steps at the tiny preset's step counts: the language model's step for
# set-up, pretraining and RLHF, the vision-language model's for the multimodal stage. The variable part follows
# the configured step counts (``_work``). Measured on the tiny preset's full pipeline on a 2-core CPU without
# native bf16 (probe 0.70 s and 1.44 s; stages 754, 930 and ~4,690 s; README, The main job: the full recipe); the
# multimodal split into its fixed part (evaluation: 19-21 units) and 0.90 units per training step comes from
# two 15-minute runs on that machine (1.26-1.32 s per step against probes of 1.39-1.45 s).
COSTS: dict[str, tuple[str, float, float]] = {
    "setup": ("lm", 25.0, 0.0),  # the probe itself, samples, report
    "pretrain": ("lm", 47.0, 1030.0),  # fixed: tokenizer training + encoding, evaluations
    "rlhf": ("lm", 57.0, 1271.0),  # fixed: the held-out evaluation of every policy
    "multimodal": ("vlm", 22.0, 3240.0),  # fixed: the held-out evaluation (with image, blank image, prior)
}
# the settings whose counts make up each stage's training work (the variable part's reference: the tiny preset)
STAGE_WORK = {"pretrain": ("training.max_steps", "training.batch_size"),
              "multimodal": ("multimodal.align_steps", "multimodal.tune_steps"),
              "rlhf": ("rlhf.sft_steps", "rlhf.label_prompts", "rlhf.reward_steps", "rlhf.ppo_steps",
                       "rlhf.dpo_steps")}


@functools.cache
def _reference(key: str) -> int:
    return OmegaConf.select(load_config("tiny"), key)


def _work(cfg: DictConfig, stage: str) -> float:
    """A stage's training work relative to the tiny preset's (1.0 there): the mean ratio of its step counts
    (pretraining's: of its tokens, as a shortened one may take more, smaller steps)."""
    keys = STAGE_WORK.get(stage, ())
    if not keys:
        return 0.0
    if stage == "pretrain":  # tokens: steps x batch
        return math.prod(OmegaConf.select(cfg, k) for k in keys) / math.prod(_reference(k) for k in keys)
    if stage == "multimodal":  # one loop over both LLaVA stages: their steps add up
        return sum(OmegaConf.select(cfg, k) for k in keys) / sum(_reference(k) for k in keys)
    return sum(OmegaConf.select(cfg, k) / _reference(k) for k in keys) / len(keys)


@dataclass
class Plan:
    scale: float
    minutes: float | None = None
    lm_step_s: float | None = None
    vlm_step_s: float | None = None
    estimate_s: float | None = None
    multimodal_scale: float | None = None  # --minutes: refitted to the time left once RLHF is done
    vlm_step_now_s: float | None = None  # --minutes: the vision-language step timed again then (``retime``)

    @property
    def vlm_scale(self) -> float:
        """The scale the multimodal stage trains at: its refitted one where a budget set it."""
        return self.scale if self.multimodal_scale is None else self.multimodal_scale

    @property
    def shortened(self) -> bool:
        return self.scale != 1 or self.vlm_scale != 1


def stage_scale(scale: float, stage: str) -> float:
    """The fraction of its training ``stage`` gets at pipeline scale ``scale``. Pretraining gets the cube root
    (an eighth of the RLHF and multimodal steps keeps half the pretraining): the stages after it fine-tune its
    model, so its loss bounds theirs, and its loss falls fastest early. At the 15-minute budget on 2 cores the cube
    root gives it about 0.44 of its tokens where the square root gave 0.31: ~110 s more, taken from the other
    stages (their scale ~0.097 -> ~0.085), lowered its val loss from 4.21 to 4.03 on 1,536 fixed held-out windows."""
    return scale ** PRETRAIN_ROOT if stage == "pretrain" else scale


def _check_scale(scale: float) -> None:
    if not (0 < scale <= 1 and math.isfinite(scale)):
        raise UserError(f"--scale must be in (0, 1], got {scale}; 1 is the full recipe, 0.25 a quarter of its steps")


def scaled(cfg: DictConfig, scale: float) -> DictConfig:
    """``cfg`` with the RLHF and multimodal training-work counts multiplied by ``scale`` (evaluation sizes
    unchanged); the pretraining's settings are ``shortened_pretraining``'s. A shortened multimodal tune stage keeps
    the full run's warmup and cosine and anneals over its last ``COOLDOWN_SHARE`` of steps, as the pretraining
    does: at the 15-minute budget's 259 tune steps (same pretrained model, two seeds) that scored digits
    0.759 / 0.744 against 0.684 / 0.628 for the cosine compressed into them, scenes 0.616 / 0.610 against
    0.610 / 0.604."""
    _check_scale(scale)
    if scale == 1:
        return cfg
    out = copy.deepcopy(cfg)
    for key, floor in SCALED_STEPS.items():
        value = OmegaConf.select(cfg, key)
        if value:  # 0 (a stage switched off) stays 0
            OmegaConf.update(out, key, max(floor if value >= floor else value, round(value * scale)))
    mm, short = cfg.multimodal, out.multimodal
    if short.tune_steps < mm.tune_steps:
        short.lr_decay_steps = mm.lr_decay_steps or mm.tune_steps
        short.cooldown_steps = round(short.tune_steps * COOLDOWN_SHARE)
    return out


def shortened_pretraining(cfg: DictConfig, scale: float) -> DictConfig:
    """``cfg`` with the pretraining of pipeline scale ``scale``: ``stage_scale`` of the recipe's tokens, trained
    as the full run is (same warmup, same learning-rate curve) until its last ``COOLDOWN_SHARE`` of steps,
    which fall linearly to the floor. Under ``HALF_BATCH_BELOW`` of the tokens it takes half the batch for twice
    the steps. Measured on the tiny preset's 324-step budget (val loss, 1,536 fixed held-out windows, same 245 s):
    the full run stopped early 4.40; with the cooldown 4.34; with it at batch 16 4.21 (batch 8: 4.25, and
    slower; a 50% cooldown: 4.24). A cosine compressed into the short run is worse than stopping (4.65 at 305
    steps): it lowers the learning rate while the loss still falls fast; the cooldown lowers it only at the end.
    The evaluation keeps the full run's windows, so the val losses compare."""
    _check_scale(scale)
    if scale == 1:
        return cfg
    t, share = cfg.training, stage_scale(scale, "pretrain")
    k = 2 if share < HALF_BATCH_BELOW and t.batch_size % (2 * t.grad_accum_steps) == 0 else 1
    steps = max(1, round(t.max_steps * share)) * k
    changes = {
        "max_steps": steps, "batch_size": t.batch_size // k, "warmup_steps": t.warmup_steps * k,
        "lr_decay_steps": (t.lr_decay_steps or t.max_steps) * k,
        "cooldown_steps": round(steps * COOLDOWN_SHARE),
        "eval_interval": max(1, round(t.eval_interval * share)) * k,
        "checkpoint_interval": max(1, round(t.checkpoint_interval * share)) * k,
        "eval_batch_size": t.eval_batch_size or min(t.batch_size, 32),
        "max_tokens": max(1, round(t.max_tokens * share)) if t.max_tokens else t.max_tokens,
    }
    return OmegaConf.merge(cfg, {"training": changes})  # type: ignore[return-value]


def _time_steps(step, n: int = 5) -> float:
    """Median seconds of ``n`` steps after two warm-up steps (allocator, kernels): on a shared VM single steps
    vary by 10%, and the median of 3 moved a 15-minute plan by a minute."""
    step()
    step()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def probe(cfg: DictConfig, lm: bool = True) -> tuple[float | None, float]:
    """Seconds per training step (forward, backward, AdamW) of the pipeline's language model at the pretraining
    batch (None with ``lm=False``), and of its vision-language model at the multimodal batch, on random weights
    and data."""
    from nanogpt4.model.multimodal import MultimodalTransformer
    from nanogpt4.model.transformer import Transformer
    from nanogpt4.train.multimodal import SHORTEST_TURN, refuse_longer_than_context

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.training.dtype, device)
    m, mm = cfg.model, cfg.multimodal
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the probe must not move the run's random streams
        torch.manual_seed(0)

        def timed(model, batch_size: int, images: bool) -> float:
            model = model.to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(3, m.vocab_size, (batch_size, m.max_seq_len), device=device)
            kwargs = {}
            if images:
                n = model.image_tokens
                ids[:, 1:1 + n] = model.image_token_id
                size = model.image_size  # a pretrained encoder's own input size
                kwargs["image_input"] = torch.randn(batch_size, model.channels, size, size, device=device)

            def step():
                with autocast_ctx(device, dtype):
                    loss = model(ids, labels=ids, **kwargs)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            return _time_steps(step)

        vlm = MultimodalTransformer(OmegaConf.merge(cfg, {"multimodal": {"image_token_id": 2}}))
        # the pipeline's multimodal stage uses its pretrained LM: say now if no question can fit, not after it
        refuse_longer_than_context("the multimodal stage's shortest question with its answer",
                                   vlm.image_tokens + SHORTEST_TURN - 1, vlm.image_tokens, m.max_seq_len, False)
        lm_s = timed(Transformer(cfg), cfg.training.batch_size, images=False) if lm else None
        vlm_s = timed(vlm, mm.batch_size, images=True)
    return lm_s, vlm_s


def estimate_s(cfg: DictConfig, scale: float, lm_step_s: float, vlm_step_s: float) -> float:
    """Estimated pipeline seconds for ``cfg`` at ``scale``, given the probe's step times."""
    unit = {"lm": lm_step_s, "vlm": vlm_step_s}
    return sum((fixed + stage_scale(scale, stage) * _work(cfg, stage) * variable) * unit[kind]
               for stage, (kind, fixed, variable) in COSTS.items())


def plan_for_minutes(cfg: DictConfig, minutes: float, log=print) -> Plan:
    if not (minutes > 0 and math.isfinite(minutes)):
        raise UserError(f"--minutes must be a positive number, got {minutes}")
    log("pipeline: timing one training step of each model to fit the budget")
    lm, vlm = probe(cfg)
    budget = minutes * 60
    full, need = estimate_s(cfg, 1.0, lm, vlm), estimate_s(cfg, MIN_SCALE, lm, vlm) / 60
    if need * 60 > budget:
        raise UserError(f"--minutes {minutes:g} is too short on this machine: the shortest plan (scale {MIN_SCALE:g}, "
                        f"{stage_scale(MIN_SCALE, 'pretrain'):.0%} of pretraining, the full evaluations) takes about "
                        f"{need:.1f} minutes; give at least --minutes {math.ceil(need)}")
    # the largest scale on a 0.001 grid (a readable number that reruns reproduce exactly) whose estimate fits;
    # the estimate grows with the scale, so bisect
    lo, hi = round(MIN_SCALE * 1000), 1000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate_s(cfg, mid / 1000, lm, vlm) <= budget else (lo, mid - 1)
    scale = lo / 1000
    plan = Plan(scale, minutes, lm, vlm, estimate_s(cfg, scale, lm, vlm))
    if scale < 1:
        log(f"pipeline: the full recipe would take about {full / 60:.0f} minutes here; {minutes:g} minutes fit scale "
            f"{scale:g} (pretraining {stage_scale(scale, 'pretrain'):.3g} of its tokens, RLHF and multimodal "
            f"{scale:g}; estimate {plan.estimate_s / 60:.1f} minutes); --scale 1 runs the full recipe")
    else:
        log(f"pipeline: the full recipe fits {minutes:g} minutes here (estimate {full / 60:.1f} minutes)")
    return plan


def retime(cfg: DictConfig, plan: Plan, log=print) -> None:
    """Time the vision-language model's step again before the last stage is fitted (a few seconds; twice when
    the machine reads slower than at the start): the first probe is one moment of a shared VM's speed. A run whose
    probe read 0.49 s a step (0.59-0.63 s on that machine's other runs) trained its last stage ~20% slower than
    planned and ended 3 s over its 900."""
    slower_than = plan.vlm_step_s * 1.05 if plan.vlm_step_s else math.inf
    _, now = probe(cfg, lm=False)
    if now > slower_than:
        # one reading can catch a passing stall (a run's read 0.70 s, its stage then ran 0.55 s a step and the
        # pipeline ended 89 s early); a slowdown that lasts shows in a second reading too
        now = min(now, probe(cfg, lm=False)[1])
    plan.vlm_step_now_s = now
    if now > slower_than:
        log(f"pipeline: this machine is slower now than when the run began (a multimodal training step takes "
            f"{now:.2f} s, was {plan.vlm_step_s:.2f} s); the last stage is fitted to that")


def _multimodal_costs_s(plan: Plan) -> tuple[float, float]:
    """The multimodal stage's fixed seconds (its evaluation) and seconds per unit of training work, from the
    slower of a budgeted plan's two timings of its step (the probe and ``retime``'s): fitting to the faster
    would count on the machine speeding back up."""
    assert plan.minutes is not None and plan.vlm_step_s, "only a --minutes plan has a budget to fit"
    step = max(plan.vlm_step_s, plan.vlm_step_now_s or 0.0)
    _, fixed, variable = COSTS["multimodal"]
    return fixed * step, variable * step


def multimodal_scale(cfg: DictConfig, plan: Plan, spent_s: float, log=print) -> float:
    """The last stage's scale, fitted to what is left of ``plan``'s budget after the earlier stages took
    ``spent_s`` (measured, so their estimates' errors do not add up). The multimodal stage is about half the time
    of a budgeted run, and on a shared 2-core VM the probe's timing of the earlier stages is off by up to 10%:
    a run planned once finished at 101% of its budget, another at 89%."""
    fixed_s, variable_s = _multimodal_costs_s(plan)
    left = plan.minutes * 60 * LAST_STAGE_SHARE - spent_s
    full = _work(cfg, "multimodal") * variable_s
    fitted = (left - fixed_s) / full if full > 0 else 1.0
    scale = min(1.0, max(MIN_SCALE, math.floor(fitted * 1000) / 1000))
    log(f"pipeline: {spent_s / 60:.1f} of {plan.minutes:g} minutes spent; the multimodal stage gets scale {scale:g}"
        + (" (the budget is spent: the run will overrun it)" if fitted < MIN_SCALE else ""))
    return scale


def evaluation_reserve_s(plan: Plan) -> float:
    """The multimodal evaluation's seconds for the hard stop behind the refit (a run's last stage took 14%
    longer than the probe said and the pipeline ended at 915 of 900 s) until the stage has timed its own probe
    evaluations (``predicted_evaluation_s``): half again the cost model's estimate."""
    fixed_s, _ = _multimodal_costs_s(plan)
    return 1.5 * fixed_s


def pipeline_plan(cfg: DictConfig, out_dir: Path, scale: float | None, minutes: float | None, log=print) -> Plan:
    """The plan for this pipeline directory: ``--scale`` as given, else the scale that fits ``--minutes``
    (``DEFAULT_MINUTES`` when neither is given). A minutes plan is stored in ``OUT/plan.json`` and reused by the
    same command, so a rerun (after Ctrl-C) continues with the scale its finished stages were trained at."""
    if scale is not None and minutes is not None:
        raise UserError("give --scale or --minutes, not both")
    if scale is None and minutes is None:
        minutes = DEFAULT_MINUTES
    path = out_dir / "plan.json"
    if minutes is not None:
        if path.exists():
            stored = Plan(**json.loads(path.read_text()))
            if stored.minutes == minutes:
                log(f"pipeline: scale {stored.scale:g} from {path} (planned for {minutes:g} minutes)")
                return stored
        return plan_for_minutes(cfg, minutes, log)
    plan = Plan(scale)
    scaled(cfg, plan.scale)  # validates
    if not (out_dir / "pretrain").exists():  # a fresh pipeline says up front how long it will take here
        plan.lm_step_s, plan.vlm_step_s = probe(cfg)
        plan.estimate_s = estimate_s(cfg, plan.scale, plan.lm_step_s, plan.vlm_step_s)
        log(f"pipeline: about {plan.estimate_s / 60:.0f} minutes on this machine (estimated from one timed training "
            f"step of each model)")
    return plan


def save_plan(plan: Plan, out_dir: Path) -> None:
    atomic_write_json(out_dir / "plan.json", asdict(plan))
