"""The one training loop: pretraining, SFT, reward and multimodal training all run through :class:`Trainer`.

A stage supplies a :class:`BatchSource` (what a step trains on), a ``loss_fn`` (model, batch) -> scalar,
and optionally ``evaluate`` / ``sample`` hooks. The loop owns everything else: AdamW with decay groups,
warmup + cosine schedule, gradient accumulation (``no_sync`` under DDP), clipping, autocast, stop rules
(steps, tokens, wall time, SIGTERM), metrics, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Protocol

import torch
import torch.nn as nn
from omegaconf import DictConfig
from tqdm import tqdm

from nanogpt4.errors import TrainingDiverged, TrainingStopped, UserError
from nanogpt4.train.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    resume_point,
    save_checkpoint,
)
from nanogpt4.train.distributed import (
    DistInfo,
    all_reduce_mean,
    apply_activation_checkpointing,
    apply_ddp,
    apply_fsdp,
    broadcast_flag,
    broadcast_number,
    clip_grad_norm,
    unwrap,
)
from nanogpt4.train.metrics import MetricsLogger, peak_flops
from nanogpt4.utils import autocast_ctx, read_jsonl, require_compiler, resolve_dtype


class BatchSource(Protocol):
    tokens_per_step: int

    def get(self, step: int, micro: int, accum: int, info: DistInfo, device: torch.device) -> dict:
        """The micro-batch ``micro`` of step ``step`` for this rank (a pure function of its arguments)."""
        ...


def rank_rows(batch_size: int, micro: int, accum: int, info: DistInfo) -> slice:
    """This rank's rows of a global batch: micro-batches interleave ranks so any (accum, world) split
    of the same global batch covers the same rows."""
    per = batch_size // (accum * info.world_size)
    if per * accum * info.world_size != batch_size:
        raise UserError(f"training.batch_size={batch_size} must be divisible by grad_accum_steps*world_size="
                        f"{accum * info.world_size}")
    idx = micro * info.world_size + info.rank
    return slice(idx * per, (idx + 1) * per)


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy; label -100 is ignored (prompt tokens in SFT, image tokens, padding)."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])


# A run's own length, stop rules and samples: a stage that builds its settings on ``cfg.training`` (SFT, the reward
# model, DPO, the multimodal stages, a sweep's runs) sets its own length and must not inherit the pretraining's
STAGE_RESET = {"sample_tokens": 0, "max_tokens": None, "max_time_s": None, "lr_decay_steps": None, "cooldown_steps": 0}


def quarter_of_stage(steps: int) -> int:
    """A quarter of a stage of ``steps`` steps, but at least 25 steps (the whole stage where it is shorter): how
    often a stage after pretraining checkpoints, and how often the multimodal stages evaluate."""
    return max(min(steps, 25), steps // 4)


def stage_checkpoint_interval(tc: DictConfig, steps: int) -> int:
    """Steps between the checkpoints of a stage of ``steps`` steps after pretraining (SFT, reward, DPO, PPO,
    multimodal): ``training.checkpoint_interval``, or a quarter of the stage where that comes sooner, though
    never under 25 steps (a short stage costs less to redo than to save often). A stage killed without warning
    (SIGKILL, a lost machine) then resumes from its last checkpoint (``--resume``); a Ctrl-C or SIGTERM writes
    one where it stops."""
    return min(tc.checkpoint_interval, quarter_of_stage(steps))


def lr_for(tc: DictConfig, step: int, end: int | None = None) -> float:
    """The learning rate of ``step`` under a training section's schedule (warmup, cosine over ``lr_decay_steps`` or
    the run's steps, cooldown). ``end``: the step count a budget stops the run at before ``max_steps``, where
    the cooldown then ends."""
    end = tc.max_steps if end is None else end
    return lr_at(step, tc.learning_rate, tc.warmup_steps, tc.lr_decay_steps or tc.max_steps, tc.min_lr_ratio,
                 end, min(tc.cooldown_steps, end))


def lr_at(step: int, base_lr: float, warmup: int, decay_steps: int, min_ratio: float,
          max_steps: int = 0, cooldown: int = 0) -> float:
    """Linear warmup to ``base_lr``, then cosine to ``base_lr * min_ratio`` at ``decay_steps``. With
    ``cooldown`` > 0 the last ``cooldown`` of ``max_steps`` leave that curve and fall linearly from where it is to
    the floor, reached on the last step: a run stopped early on a long cosine still anneals (WSD-style)."""
    start = max_steps - cooldown
    if cooldown > 0 and step >= start:
        at_start = lr_at(start, base_lr, warmup, decay_steps, min_ratio)
        floor = base_lr * min_ratio
        return at_start + (floor - at_start) * min(1.0, (step - start + 1) / cooldown)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= decay_steps:
        return base_lr * min_ratio
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def budget_spent(tc: DictConfig, step: int, tokens: int) -> bool:
    """Whether a run at ``step`` with ``tokens`` seen has spent its step or token budget (nothing left to train)."""
    return step >= tc.max_steps or (tc.max_tokens is not None and tokens >= tc.max_tokens)


def budget_end_step(step: int, steps_timed: int, timed_s: float, time_left_s: float, max_steps: int) -> int:
    """The step count a time-budgeted run reaches: ``step`` plus the steps ``time_left_s`` holds at the pace of its
    last ``steps_timed`` steps (``timed_s`` seconds, evaluations and checkpoints included), one step short rather
    than long, at least one and at most ``max_steps``."""
    if steps_timed <= 0 or timed_s <= 0:
        return max_steps
    return min(max_steps, step + max(1, math.floor(time_left_s * steps_timed / timed_s)))


def anneal_step(last_lr: float, floor: float, step: int, end: int) -> float:
    """The rate of ``step`` on a straight line from ``last_lr`` (the step before's) to ``floor``, reached on step
    ``end - 1``, the last of ``end``. Taken one step at a time, ``end`` may move and the rate still never rises."""
    if end - step <= 1:
        return floor
    return last_lr + (floor - last_lr) / (end - step)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """SIGTERM (a preemptible cluster's notice) or a first Ctrl-C asks a training loop to finish its step,
    checkpoint and exit cleanly: either would otherwise lose every step since the last checkpoint. A second
    Ctrl-C stops at once. Ctrl-C is taken over only where it would raise KeyboardInterrupt (not where it is
    ignored, as in a background job, or where the program embedding us handles it)."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.received: str | None = None  # "SIGTERM" or "SIGINT" (Ctrl-C) once one asked the loop to stop
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
                continue
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.is_main:  # os.write: a print could land inside another write to the same stream
                with contextlib.suppress(OSError):
                    os.write(2, b"\nCtrl-C: stopping after this step to write a checkpoint (Ctrl-C again to stop "
                                b"at once, without one)\n")

    def raise_stopped(self, where: str) -> NoReturn:
        """End the stopped loop (its checkpoint written): an unfinished run must not pass for a result, and a
        pipeline's next stage must not start. ``where``: "at step 3 of 10"."""
        if self.received == "SIGINT":  # main() prints "interrupted" before it
            raise KeyboardInterrupt(f" {where}")
        raise TrainingStopped(f"SIGTERM {where}")


class Trainer:
    def __init__(self, cfg, model: nn.Module, batches: BatchSource, run_dir: Path, info: DistInfo,
                 device: torch.device, *, loss_fn: Callable[[nn.Module, dict], torch.Tensor] = lm_loss,
                 evaluate: Callable[[nn.Module], dict] | None = None,
                 sample: Callable[[nn.Module], str] | None = None, tokenizer_path: Path | None = None,
                 flops_per_token: float | None = None, train_cfg=None, progress: bool = True,
                 log: Callable[[str], None] = print, lr_setting: str = "training.learning_rate",
                 warmup_fix: str | None = None, data_id: str | None = None):
        self.cfg = cfg
        self.data_id = data_id  # the training data's identity, kept in checkpoints and compared on resume
        self.tc = train_cfg if train_cfg is not None else cfg.training
        self.lr_setting = lr_setting  # the config key a user changes to change this stage's learning rate
        self.model = model  # the plain model; self.step_model is what runs forward/backward
        self.batches = batches
        self.run_dir = Path(run_dir)
        self.info = info
        self.device = device
        self.loss_fn = loss_fn
        self.evaluate = evaluate
        self.sample = sample
        self.tokenizer_path = tokenizer_path
        self.progress = progress and info.is_main
        self.log = log if info.is_main else (lambda _msg: None)
        self._token_end = self._token_budget_end(batches.tokens_per_step)
        end = self._token_end or self.tc.max_steps
        if self.tc.warmup_steps > end:  # a run shorter than its warmup never trains at the rate it was given
            self.log(f"training: warmup_steps {self.tc.warmup_steps} is longer than the run ({end} steps): the "
                     f"learning rate rises all run and peaks at {lr_for(self.tc, end - 1):.2e}, not "
                     f"{self.lr_setting}={self.tc.learning_rate:g}; "
                     + (warmup_fix or f"give a training.warmup_steps below {end}"))
        self.dtype = resolve_dtype(self.tc.dtype, device)
        if device.type == "cuda":  # fp32 training on a GPU uses TF32 tensor cores, as its MFU peak assumes
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.flops_per_token = flops_per_token
        # tok/s counts every rank's rows, so MFU is quoted against every rank's peak (each measures its own device:
        # under torchrun a CPU rank's one thread, a GPU rank's GPU), not one device's (2 CPU ranks logged 81% where
        # one process on the same 2 cores logged 56%)
        self.peak = peak_flops(device, self.dtype) * info.world_size if flops_per_token else None
        self._peak_rechecked = False

        if self.tc.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.tc.fsdp and info.enabled:
            self.step_model = apply_fsdp(model, info, self.dtype if self.dtype != torch.float32 else None)
        elif info.enabled:
            self.step_model = apply_ddp(model, info, device)
        else:
            self.step_model = model
        if self.tc.compile:
            require_compiler(device, "training.compile=true")
            self.step_model = torch.compile(self.step_model)
        self.optimizer = unwrap(model).configure_optimizers(
            self.tc.weight_decay, self.tc.learning_rate, (self.tc.beta1, self.tc.beta2), self.tc.eps, device.type) \
            if hasattr(unwrap(model), "configure_optimizers") else self._default_optimizer()
        self.metrics = MetricsLogger(self.run_dir, info.is_main, self.tc.tensorboard)
        self.step = 0
        self.tokens = 0
        self.train_time = 0.0
        self.best_val = math.inf
        self.last_eval: dict = {}
        self._stops = StopSignals(info.is_main)
        self._cut_short = False  # stopped by a signal before the budget was spent
        self._start_step = 0
        # a time budget that ends before max_steps brings the cooldown forward: the rate this run's last step took
        # on its way down (None while the schedule is lr_for's)
        self._anneal_lr: float | None = None

    def _token_budget_end(self, tokens_per_step: int) -> int | None:
        """The step count a token budget (``max_tokens``) stops the run at, when that comes before ``max_steps``:
        a cooldown then ends there, on the run's last step (the cosine stays ``max_steps``', so a run stopped by
        tokens without one continues exactly with ``--resume``)."""
        tc = self.tc
        if tc.max_tokens is None:
            return None
        end = max(1, math.ceil(tc.max_tokens / tokens_per_step))
        if end >= tc.max_steps:
            return None
        if tc.cooldown_steps > 0:
            self.log(f"training: max_tokens {tc.max_tokens:,} stops the run at step {end} of {tc.max_steps}: its "
                     f"cooldown ends there")
        else:
            self.log(f"training: max_tokens {tc.max_tokens:,} stops the run at step {end} of {tc.max_steps}, where "
                     f"the learning rate is still {lr_for(tc, end - 1):.2e}; {self._cooldown_setting()}=N anneals "
                     f"it to its floor there")
        return end

    def _cooldown_setting(self) -> str:
        return f"{self.lr_setting.rsplit('.', 1)[0]}.cooldown_steps"

    def _default_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.tc.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.tc.learning_rate, betas=(self.tc.beta1, self.tc.beta2),
                                 eps=self.tc.eps)

    # ------------------------------------------------------------------ state
    def state_dict(self, optimizer_state: dict | None = None) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_time_s": self.train_time,
                "best_val": self.best_val, "data_step": self.step, "data_id": self.data_id,
                "anneal_lr": self._anneal_lr,
                "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
                "rng": rng_state()}

    def resume(self) -> int:
        """Restore the latest checkpoint of ``run_dir``; returns its step."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise UserError(f"nothing to resume: '{self.run_dir}' has no checkpoints; drop --resume to start fresh")
        return self._restore(ckpt, load_trainer_state(ckpt))

    def _restore(self, ckpt: Path, state: dict) -> int:
        """Weights, optimizer, position, clock and RNG from checkpoint ``ckpt``, its trainer ``state`` read."""
        load_weights(unwrap(self.model), ckpt / "model.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.train_time, self.best_val = float(state["train_time_s"]), float(state["best_val"])
        self._anneal_lr = state.get("anneal_lr")
        set_rng_state(state["rng"])
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {ckpt} (step {self.step}, {self.tokens:,} tokens)")
        if self.data_id and state.get("data_id") and state["data_id"] != self.data_id:
            self.log(f"warning: the training data is not what step {self.step} was trained on (its text, split "
                     f"or mix of sources changed since): training goes on with this data, so the run will not match "
                     f"an uninterrupted one")
        return self.step

    def resume_or_restart(self) -> None:
        """A stage's ``--resume``: from ``run_dir``'s latest checkpoint, or, for a stage stopped before its first,
        from the start, its log emptied. Refuses a checkpoint past this run's ``max_steps``."""
        point = resume_point(self.run_dir, self.tc.max_steps)
        if point is None:
            if self.metrics.path.exists():
                self.log(f"{self.run_dir} starts again (it was stopped before its first checkpoint)")
                self.metrics.truncate_after(0)
            return
        step, ckpt, state = point
        if "optimizer" not in state:  # the stage's trained model, saved after its training
            # (stopped during its evaluation): nothing is left to train, and ``fit`` reads its numbers from the log
            load_weights(unwrap(self.model), ckpt / "model.safetensors")
            self.step = step
            self.log(f"resumed after training: {ckpt} holds the trained model")
            return
        self._restore(ckpt, state)

    def save(self, best: bool = False) -> None:
        if self.tc.fsdp and self.info.enabled:  # every rank takes part in gathering the shards
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=opts)
            state = self.state_dict(get_optimizer_state_dict(self.model, self.optimizer, options=opts))
        else:
            weights, state = None, self.state_dict()
        if self.info.is_main:
            save_checkpoint(self.run_dir, self.step, unwrap(self.model), self.cfg, self.tokenizer_path,
                            state, self.tc.keep_last, best, weights=weights)

    # ------------------------------------------------------------------ loop
    def mfu(self, tok_s: float) -> float:
        """Model FLOPs utilisation of ``tok_s`` (all ranks') against ``self.peak`` (all ranks'). Above 1, the peak
        was measured while something else held the cores (a run started as another exited read 168%): measure it
        once more and keep the higher."""
        mfu = self.flops_per_token * tok_s / self.peak
        if mfu > 1 and not self._peak_rechecked:
            self._peak_rechecked = True
            self.peak = max(self.peak, peak_flops(self.device, self.dtype, fresh=True) * self.info.world_size)
            mfu = self.flops_per_token * tok_s / self.peak
        return mfu

    def _result_from_log(self) -> dict:
        """``fit``'s result for a run resumed where it had finished (stopped between its last checkpoint and its
        summary): its last logged training loss, evaluation and throughput, read back from ``metrics.jsonl``."""
        rows = read_jsonl(self.metrics.path) if self.metrics.path.exists() else []
        train = [r for r in rows if "step_loss" in r]
        evals = [r for r in rows if "step_loss" not in r and r.get("step") == self.step]
        return {"final_train_loss": train[-1]["step_loss"] if train else math.nan, "steps": self.step,
                "tokens": self.tokens, "steps_this_run": 0, "first_step_s": 0.0,
                "steady_tok_per_s": sum(r["tok_per_s"] for r in train) / len(train) if train else 0.0,
                **{k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "tokens")}}

    def _should_stop(self, t_start: float) -> bool:
        tc = self.tc
        spent = budget_spent(tc, self.step, self.tokens)
        spent |= (tc.max_time_s is not None and self.step > self._start_step  # always run at least one step
                         and self.train_time + (time.time() - t_start) >= tc.max_time_s)
        signalled = self._stops.received is not None
        stop = broadcast_flag(spent or signalled, self.info, self.device)
        if stop:  # rank 0's view of why, on every rank
            self._cut_short = broadcast_flag(signalled and not spent, self.info, self.device)
        return stop

    def _learning_rate(self, elapsed_s: float, steps_timed: int, timed_s: float) -> float:
        """``lr_for``'s rate for this step, unless a time budget (``max_time_s``) will stop the run before
        ``max_steps`` and there is a cooldown: then the cooldown ends where the budget does, so that a run slower
        than planned still anneals to the floor instead of being cut on its way down. The end is projected
        again at every step from the pace of the steps so far (evaluations included)."""
        tc, stop = self.tc, self._token_end or self.tc.max_steps
        if tc.max_time_s is None or (self._anneal_lr is None and steps_timed < 5):  # no budget, or no pace yet
            return lr_for(tc, self.step, self._token_end)
        end = budget_end_step(self.step, steps_timed, timed_s, tc.max_time_s - elapsed_s, stop)
        if tc.cooldown_steps <= 0:
            if steps_timed == 20 and end < stop:  # the pace is known: say where the run will be left
                self.log(f"training: the time budget (max_time_s {tc.max_time_s:g}) ends near step {end} of "
                         f"{tc.max_steps}, where the learning rate is still {lr_for(tc, end - 1):.2e}; "
                         f"{self._cooldown_setting()}=N anneals a time-budgeted run to its floor")
            return lr_for(tc, self.step, self._token_end)
        # rank 0's clock decides, as for the stop itself: ranks at different rates would train apart
        end = int(broadcast_number(end, self.info, self.device))
        if self._anneal_lr is None:
            if end >= stop or self.step < end - tc.cooldown_steps:
                return lr_for(tc, self.step, self._token_end)
            self.log(f"training: the time budget (max_time_s {tc.max_time_s:g}) ends near step {end} of "
                     f"{tc.max_steps}: the learning rate anneals to its floor from step {self.step + 1}")
            self._anneal_lr = lr_for(tc, self.step, self._token_end)  # the curve's rate here (or the cooldown's)
        self._anneal_lr = anneal_step(self._anneal_lr, tc.learning_rate * tc.min_lr_ratio, self.step, end)
        return self._anneal_lr

    def _run_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        result = self.evaluate(unwrap(self.model))
        if self.sample is not None:  # on every rank: under FSDP a forward is a collective
            result["sample"] = self.sample(unwrap(self.model))
        return result

    def _loss_scales(self, micro_batches: list[dict]) -> list[float] | None:
        """What each micro-batch's mean loss is multiplied by, so that the step's gradient is the whole global
        batch's; None where every micro-batch weighs alike (LM windows, preference pairs: each is divided by
        accum). A loss averaged over a varying number of tokens (SFT responses, VQA answers: the batch's
        ``loss_tokens``) is weighed by the micro-batch's share of those tokens in the global batch, every rank's
        (DDP then averages over ranks): averaging per-micro-batch means gave a short response the weight of a
        whole micro-batch of long ones."""
        if "loss_tokens" not in micro_batches[0]:
            return None
        counts = [b["loss_tokens"] for b in micro_batches]
        mine = torch.tensor(float(sum(counts)), dtype=torch.float64, device=self.device)
        total = round(float(all_reduce_mean(mine, self.info)) * self.info.world_size)
        return [c * self.info.world_size / max(total, 1) for c in counts]

    def fit(self) -> dict:
        tc, info = self.tc, self.info
        accum = tc.grad_accum_steps
        self.step_model.train()
        t_start = time.time()
        start_step = self._start_step = self.step
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True, mininterval=1.0)
        window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        last_loss = math.nan
        step_times: list[tuple[float, int]] = []  # (seconds, tokens) of this run's optimizer steps alone
        first_step_end = None  # wall clock after this run's first step (compiling, warming up): the pace after it
        with self._stops, contextlib.closing(bar), contextlib.closing(self.metrics):
            done = self._should_stop(t_start)
            while not done:
                t0 = time.perf_counter()
                now = time.time()
                steps_timed = self.step - start_step - 1
                lr = self._learning_rate(self.train_time + now - t_start, steps_timed,
                                         now - first_step_end if first_step_end is not None else 0.0)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss_sum = torch.zeros((), device=self.device)
                micro_batches = [self.batches.get(self.step, micro, accum, info, self.device) for micro in range(accum)]
                scales = self._loss_scales(micro_batches)
                for micro, batch in enumerate(micro_batches):
                    sync = micro == accum - 1 or not hasattr(self.step_model, "no_sync")
                    ctx = contextlib.nullcontext() if sync else self.step_model.no_sync()
                    with ctx:
                        with autocast_ctx(self.device, self.dtype):
                            loss = self.loss_fn(self.step_model, batch)
                            loss = loss / accum if scales is None else loss * scales[micro]
                        loss.backward()
                    loss_sum += loss.detach()
                # every rank checks the mean, so all of them stop together (a NaN on one rank poisons it)
                loss_val = all_reduce_mean(loss_sum, info).item()
                if not math.isfinite(loss_val):
                    raise TrainingDiverged(
                        f"the training loss became {loss_val} at step {self.step + 1}; lower {self.lr_setting} (now"
                        f" {tc.learning_rate:g}), keep training.grad_clip > 0, or use training.dtype=float32",
                        self.step, self.tokens)
                if tc.grad_clip > 0:
                    grad_norm = clip_grad_norm(self.step_model.parameters(), tc.grad_clip)
                else:
                    grad_norm = torch.zeros(())
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                step_times.append((dt, self.batches.tokens_per_step))  # batches may vary (padded VQA rows)
                if first_step_end is None:
                    first_step_end = time.time()
                self.step += 1
                self.tokens += self.batches.tokens_per_step
                last_loss = loss_val
                window_loss += loss_val
                window_steps += 1
                window_tokens += self.batches.tokens_per_step
                window_time += dt
                bar.update(1)
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    tok_s = window_tokens / max(window_time, 1e-9)
                    row = {"step": self.step, "tokens": self.tokens, "loss": window_loss / window_steps,
                           "step_loss": loss_val, "lr": lr, "grad_norm": float(grad_norm), "tok_per_s": tok_s}
                    if self.peak:
                        row["mfu"] = self.mfu(tok_s)
                    self.metrics.log(row)
                    mfu = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}", **mfu)
                    if not self.progress:
                        self.log(f"step {self.step}/{tc.max_steps} loss {row['loss']:.4f} lr {lr:.2e} "
                                 f"{tok_s:,.0f} tok/s" + (f" mfu {mfu['mfu']}" if mfu else ""))
                    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
                done = self._should_stop(t_start)
                # a signal's stop evaluates only where the run would have anyway: its checkpoint comes first (a
                # preempted job has seconds before SIGKILL), and the resumed run's log is the uninterrupted one's
                evaluated = self.step % tc.eval_interval == 0 or (done and not self._cut_short)
                if evaluated:
                    self._evaluate_and_log(bar)
                if self.step % tc.checkpoint_interval == 0 or done:
                    # best among the checkpoints evaluated at their own step, not by an earlier step's loss
                    val = self.last_eval.get("val_loss") if evaluated else None
                    is_best = val is not None and val <= self.best_val
                    if is_best:
                        self.best_val = val
                    self.train_time += time.time() - t_start
                    t_start = time.time()
                    self.save(best=is_best)
        self.train_time += time.time() - t_start
        # checkpointed above; a signal that came during the last step's evaluation or checkpoint stops it too
        if self._cut_short or self._stops.received is not None:
            self._stops.raise_stopped(f"at step {self.step} of {tc.max_steps}")
        if self.step == start_step:  # resumed where it had finished: nothing trained, its log has the numbers
            if self.sample is not None:  # the log has no sample: the same weights write it again (every rank)
                self.last_eval = {"sample": self.sample(unwrap(self.model))}
            return self._result_from_log()
        steps_run = max(1, self.step - start_step)
        # the first step carries torch.compile's tracing and the allocator's warm-up: steady throughput leaves
        # it out when there is more than one
        steady = step_times[1:] or step_times
        return {"final_train_loss": last_loss, "steps": self.step, "tokens": self.tokens,
                "steps_this_run": steps_run, "first_step_s": step_times[0][0] if step_times else 0.0,
                "steady_tok_per_s": sum(n for _, n in steady) / max(sum(t for t, _ in steady), 1e-9),
                **{k: v for k, v in self.last_eval.items() if k != "sample"}}

    def _evaluate_and_log(self, bar) -> None:
        t0 = time.time()
        result = self._run_eval()
        if not result:
            return
        self.last_eval = result
        row = {"step": self.step, "tokens": self.tokens, **{k: v for k, v in result.items() if k != "sample"}}
        self.metrics.log(row)
        msg = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
        write = bar.write if self.progress else self.log
        write(f"eval step {self.step}: {msg} ({time.time() - t0:.1f}s)")
        if "sample" in result:
            write("sample: " + result["sample"][:400].replace("\n", "\n        "))
