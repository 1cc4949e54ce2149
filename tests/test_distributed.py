import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.train.checkpoint import load_model
from nanogpt4.train.distributed import DistInfo, apply_fsdp
from nanogpt4.train.pretrain import pretrain

from .conftest import step_losses


def ranks_saying(*args, **kwargs):
    """`nanogpt4 ARGS...` on 2 torchrun ranks, rank 0 slow to say an error (tests/workers/slow_rank_zero.py)."""
    worker = Path(__file__).parent / "workers" / "slow_rank_zero.py"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), *args], capture_output=True, text=True, timeout=300, **kwargs)
    return res, [line for line in res.stderr.splitlines() if line.startswith("error: ")]


def torchrun(out, overrides, nproc=2, expect_rc=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanogpt4", "pretrain", "--out", str(out), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (res.returncode == 0) == (expect_rc == 0), res.stderr[-3000:]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["training.grad_accum_steps=2"]], ids=["ddp", "ddp+accum"])
def test_two_process_ddp_reproduces_single_process(prepared, tmp_path, extra):
    ov, _ = prepared
    ov = ov + ["training.max_steps=8", "training.eval_interval=4", "training.checkpoint_interval=4"] + extra
    pretrain(load_config("tiny", ov), tmp_path / "single", progress=False, log=lambda _m: None)
    torchrun(tmp_path / "ddp", ov)
    single, ddp = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert list(ddp) == list(range(1, 9))
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])
    a, _, _ = load_model(tmp_path / "single")
    b, _, _ = load_model(tmp_path / "ddp")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert (p - q).abs().max() < 1e-4, name


def test_a_command_that_trains_in_one_process_refuses_torchrun_once_and_writes_nothing(tmp_path):
    """Under torchrun only the training stages split the work; the pipeline would run whole on both ranks, into
    one directory."""
    res, said = ranks_saying("pipeline", "--out", str(tmp_path / "p"))
    assert res.returncode != 0 and said == [
        "error: `nanogpt4 pipeline` runs in one process: under torchrun each of the 2 ranks would run all of it, "
        "into the same files; run it without torchrun (pretrain, sft, reward, ppo, dpo, rlhf and multimodal train "
        "data-parallel under it)"], res.stderr[-3000:]
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_two_process_sft_reward_and_dpo_reproduce_single_process(prepared, tmp_path, capsys):
    """They ran whole on every rank (so torchrun refused them); now each rank trains on its share of every batch,
    SFT's ranks weighed by their response tokens, and the losses are the single process's."""
    import json

    from nanogpt4.cli import main

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=4"]) == 0
    data = tmp_path / "data"
    data.mkdir()
    # responses of very different lengths: a rank's mean over its own tokens is not the batch's
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "response": "    return x"
                                                        + " + x" * (i % 7) * 3 + "\n"}) + "\n" for i in range(40)))
    (data / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"def g{i}(x):\n", "chosen": "    return x\n",
                                                          "rejected": "    retur" + "n" * (i % 5) + "\n"}) + "\n"
                                              for i in range(40)))
    small = [*ov, "rlhf.sft_steps=4", "rlhf.reward_steps=4", "rlhf.dpo_steps=4", "rlhf.compare_frozen_base=false",
             "--device", "cpu"]
    stages = [["sft", "--pretrained", str(tmp_path / "pre"), "--data", str(data / "sft.jsonl")],
              ["reward", "--sft", str(tmp_path / "sft-1"), "--data", str(data / "prefs.jsonl")],
              ["dpo", "--sft", str(tmp_path / "sft-1"), "--data", str(data / "prefs.jsonl"), "--no-eval"]]
    for argv in stages:
        assert main([*argv, "--out", str(tmp_path / f"{argv[0]}-1"), *small]) == 0
        capsys.readouterr()
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "nanogpt4", *argv, "--out", str(tmp_path / f"{argv[0]}-2"), *small, "--json"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["processes"] == 2
        one, two = step_losses(tmp_path / f"{argv[0]}-1"), step_losses(tmp_path / f"{argv[0]}-2")
        assert list(one) == list(two) == [1, 2, 3, 4], argv[0]
        assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (argv[0], one, two)


@pytest.mark.slow
def test_two_process_rlhf_chain_matches_single_process(prepared, tmp_path, capsys):
    """`nanogpt4 rlhf` under torchrun: rank 0 labels the pairs and sends them on, every stage trains data-parallel
    (SFT, reward model and DPO to the single process's losses), the ranks' PPO reads one centred reward."""
    import json

    from nanogpt4.cli import main

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=20"]) == 0
    small = [*ov, "rlhf.sft_steps=4", "rlhf.reward_steps=4", "rlhf.ppo_steps=2", "rlhf.dpo_steps=3",
             "rlhf.sft_examples=60", "rlhf.label_prompts=120", "rlhf.eval_prompts=16", "rlhf.rollout_batch_size=8",
             "rlhf.mini_batch_size=4", "rlhf.max_new_tokens=10", "rlhf.label_min_gap=0.0",
             "rlhf.compare_frozen_base=false", "--device", "cpu"]
    assert main(["rlhf", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "one"), *small]) == 0
    capsys.readouterr()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "nanogpt4", "rlhf", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "two"),
                          *small, "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and {"judge_sft", "judge_ppo", "judge_dpo", "kl_ppo"} <= summary.keys()
    prefs = [(tmp_path / run / "preferences.jsonl").read_bytes() for run in ("one", "two")]
    assert prefs[0] == prefs[1]
    for stage in ("sft", "reward", "dpo"):
        one, two = step_losses(tmp_path / "one" / stage), step_losses(tmp_path / "two" / stage)
        assert list(one) == list(two) and all(abs(one[s] - two[s]) < 1e-5 for s in one), (stage, one, two)
    ppo = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(ppo) == 2 and all(abs(r["reward"]) < 50 for r in ppo)


def test_a_judge_failing_on_rank_zero_before_sft_stops_every_rank_at_once(prepared, tmp_path):
    """Rank 0 judges the pretrained policy before SFT while the others set up DDP: its error left them waiting
    in that collective (until gloo's timeout); now it is sent to them, said once, and every rank exits 2."""
    from nanogpt4.cli import main

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=2"]) == 0
    (tmp_path / "broken_judge.py").write_text(
        "from nanogpt4.errors import UserError\n\n\ndef score(prompts, responses):\n"
        "    raise UserError('the judge cannot score these')\n")
    res, said = ranks_saying("sft", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "sft"), *ov,
                             "rlhf.judge=broken_judge:score", "rlhf.eval_prompts=4", "rlhf.max_new_tokens=4",
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode != 0 and said == ["error: the judge cannot score these"], res.stderr[-3000:]


@pytest.mark.slow
def test_two_process_multimodal_reproduces_single_process(tmp_path, capsys):
    """`nanogpt4 multimodal` ran whole on every rank (so torchrun refused it); now the ranks split every batch,
    each weighed by its answer tokens, and rank 0 alone evaluates and writes."""
    import json

    from nanogpt4.cli import main

    small = ["multimodal.image_size=16", "multimodal.patch_size=8", "multimodal.encoder_dim=32",
             "multimodal.eval_scenes=8", "multimodal.batch_size=8", "multimodal.tune_steps=4",
             "multimodal.data=scenes", "training.log_interval=1", "training.dtype=float32", "--device", "cpu"]
    assert main(["multimodal", "--out", str(tmp_path / "one"), *small]) == 0
    capsys.readouterr()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "nanogpt4", "multimodal", "--out", str(tmp_path / "two"), *small, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["processes"] == 2
    assert res.stdout.count("multimodal: accuracy") == 1  # rank 0 said it
    one, two = step_losses(tmp_path / "one" / "tune"), step_losses(tmp_path / "two" / "tune")
    assert list(one) == list(two) == [1, 2, 3, 4]
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    assert (tmp_path / "two" / "report.md").exists() and (tmp_path / "two" / "summary.json").exists()


def test_a_refusal_on_rank_zero_is_said_once_and_the_other_ranks_leave_quietly(prepared, tmp_path):
    """Rank 0's checks (an existing run, a finished resume, other data) ran before a barrier: the other ranks,
    left waiting for a rank that had exited, died with a traceback each."""
    ov, _ = prepared
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine\n")
    res, said = ranks_saying("pretrain", "--out", str(tmp_path / "r"), *ov)
    assert res.returncode != 0 and said == [f"error: run directory '{tmp_path / 'r'}' holds notes.txt: give a new or "
                                            f"empty directory (nothing in it was changed)"], res.stderr[-3000:]
    assert "[rank1]" not in res.stderr and "exitcode: 2" in res.stderr, res.stderr[-3000:]
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["notes.txt"]
    # refused before the ranks join a group (the same --out on each): said by rank 0 alone, not once per rank
    res, said = ranks_saying("sft", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "r"))
    assert res.returncode != 0 and said == [f"error: --out '{tmp_path / 'r'}' already holds notes.txt: give a new or "
                                            f"empty directory, or delete it to train this stage again (nothing in "
                                            f"it was changed)"], res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__ < (2, 9), reason="FSDP2 trains right on the CPU from torch 2.9")
def test_fsdp_two_processes_trains_and_checkpoints(prepared, tmp_path):
    ov, _ = prepared
    ov = ov + ["training.max_steps=6", "training.eval_interval=3", "training.checkpoint_interval=3",
               "training.fsdp=true"]
    pretrain(load_config("tiny", ov[:-1]), tmp_path / "single", progress=False, log=lambda _m: None)
    torchrun(tmp_path / "fsdp", ov)
    single, fsdp = step_losses(tmp_path / "single"), step_losses(tmp_path / "fsdp")
    for step in single:
        assert abs(single[step] - fsdp[step]) < 1e-4, (step, single[step], fsdp[step])
    # the norm clipping uses is the full gradient's (torch's clip_grad_norm_ got it wrong on 2.9.1)
    norms, fsdp_norms = step_losses(tmp_path / "single", "grad_norm"), step_losses(tmp_path / "fsdp", "grad_norm")
    assert max(norms.values()) > 1.0  # training.grad_clip=1 clips in this run
    for step in norms:
        assert abs(norms[step] - fsdp_norms[step]) < 1e-4 * norms[step], (step, norms[step], fsdp_norms[step])
    m, _, _ = load_model(tmp_path / "fsdp")  # gathered full weights load into a plain model
    assert m.num_parameters() > 0


def test_fsdp_on_the_cpu_before_torch_2_9_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0"))  # trains there, on summed gradients
    with pytest.raises(UserError, match=r"training.fsdp=true on the CPU needs torch>=2.9 \(this is 2.8.0: its FSDP2 "
                                        r"fails or sums the ranks' gradients over gloo\)"):
        apply_fsdp(torch.nn.Linear(2, 2), DistInfo())


@pytest.mark.slow
def test_a_ddp_run_on_a_time_budget_anneals_on_every_rank_together(prepared, tmp_path):
    """The cooldown a time budget brings forward follows rank 0's clock (one broadcast per step on every rank):
    the run neither hangs in a collective nor stops before its learning rate is down."""
    ov, _ = prepared
    torchrun(tmp_path / "timed", ov + ["training.max_steps=2000", "training.max_time_s=6", "training.cooldown_steps=60",
                                       "training.warmup_steps=5", "training.log_interval=1",
                                       "training.eval_interval=50", "training.checkpoint_interval=1000"])
    lrs = step_losses(tmp_path / "timed", "lr")
    steps = sorted(lrs)
    assert 10 < len(steps) < 2000 and steps == list(range(1, len(steps) + 1))
    tc = load_config("tiny", ov).training
    peak, floor = tc.learning_rate, tc.learning_rate * tc.min_lr_ratio
    assert lrs[steps[-1]] <= floor + 0.2 * (peak - floor)


@pytest.mark.slow
def test_a_diverging_ddp_run_stops_every_rank_with_the_same_error(prepared, tmp_path):
    ov, _ = prepared
    res = torchrun(tmp_path / "nan", ov + ["training.max_steps=30", "training.learning_rate=1e5",
                                           "training.grad_clip=0"], expect_rc=1)
    # every rank stops at the same step, on the all-reduced loss; rank 0 says so (both did, and torchrun could end
    # one before it had: the line was there once or twice)
    said = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].startswith("error: the training loss became nan at step "), res.stderr[-3000:]
    # rank 0 exits 2; torchrun then SIGTERMs the rank waiting to leave after it, which is its rule, not a crash
    assert "exitcode  : 2" in res.stderr and "SIGABRT" not in res.stderr and "SIGSEGV" not in res.stderr


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_the_step_in_flight_and_says_so_once(prepared, tmp_path):
    """The terminal's Ctrl-C reaches torchrun, which sends it on to its ranks (each in a session of its own): they
    finish the step together, rank 0 checkpoints it, and one line says so (every rank said it)."""
    import signal
    import time

    from nanogpt4.train.checkpoint import list_checkpoints

    ov, _ = prepared
    out = tmp_path / "dd"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogpt4",
           "pretrain", "--out", str(out), *ov, "training.max_steps=5000", "training.log_interval=1",
           "training.eval_interval=1000", "training.checkpoint_interval=1000"]
    # its own process group, as a terminal's foreground job; SIGINT not ignored (see tests/conftest.py)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").stat().st_size < 200:
            assert time.time() - t0 < 120 and proc.poll() is None, "the run never logged a step"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and err.count("Ctrl-C: stopping after this step") == 1, err[-3000:]
    step, kept = list_checkpoints(out)[-1]
    assert said[0] == (f"interrupted at step {step} of 5000; {kept} is kept, continue with: torchrun "
                       f"--nproc_per_node=2 -m nanogpt4 pretrain --out {out} --resume"), err[-3000:]


def _interrupted_when(cmd: list[str], logged, timeout: float = 120) -> str:
    """Run ``cmd`` as a terminal's foreground job (its own process group, SIGINT not ignored: see
    tests/conftest.py), Ctrl-C it once ``logged()`` holds; returns its stderr."""
    import signal
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.time()
        while not logged():
            assert time.time() - t0 < timeout and proc.poll() is None, "the run never logged a step"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    return err


@pytest.mark.slow
def test_a_two_process_ppo_run_stopped_by_ctrl_c_resumes_to_the_uninterrupted_runs_steps(prepared, tmp_path,
                                                                                          capsys):
    """Each rank draws its own rollouts, from seeds its checkpoint restores: relaunched with as many processes, as
    the stop message says, the run logs the uninterrupted 2-process run's steps exactly."""
    import json
    import shlex

    from nanogpt4.cli import main
    from nanogpt4.utils import read_jsonl

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=10"]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"def g{i}(x):\n", "chosen": "    return x\n",
                                         "rejected": f"    return {i} +\n"}) + "\n" for i in range(24)))
    assert main(["reward", "--sft", str(tmp_path / "pre"), "--data", str(pairs), "--out", str(tmp_path / "rm"),
                 "rlhf.reward_steps=4"]) == 0
    capsys.readouterr()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogpt4"]
    argv = ["ppo", "--sft", str(tmp_path / "pre"), "--reward", str(tmp_path / "rm"), "--prompts", str(pairs),
            "rlhf.ppo_steps=12", "rlhf.rollout_batch_size=4", "rlhf.mini_batch_size=2", "rlhf.max_new_tokens=8",
            "rlhf.eval_prompts=4", "rlhf.target_kl=1.0", "--device", "cpu"]
    full, part = tmp_path / "full", tmp_path / "part"
    res = subprocess.run([*launch, *argv, "--out", str(full)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = part / "metrics.jsonl"
    err = _interrupted_when([*launch, *argv, "--out", str(part)],
                            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1, err[-3000:]
    again = said[0].split("continue with: ", 1)[1]
    assert again == shlex.join(["torchrun", "--nproc_per_node=2", "-m", "nanogpt4", *argv, "--out", str(part),
                                "--resume"]), said
    step = int(said[0].split(" of 12")[0].rsplit(" ", 1)[1])
    assert 2 <= step < 12 and (part / "checkpoints" / f"step_{step}" / "value.safetensors").exists()
    res = subprocess.run([*launch, *shlex.split(again)[4:]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    timing = ("rollout_s", "update_s")
    ours, theirs = ([{k: v for k, v in row.items() if k not in timing} for row in read_jsonl(d / "metrics.jsonl")]
                    for d in (part, full))
    assert [r["step"] for r in ours] == list(range(1, 13)) and ours == theirs


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_shutdown_leaves_no_communication_threads():
    """Leaving the group must free it: gloo threads that outlive destroy_process_group die with the interpreter,
    and a rank could then abort at exit after its work was done (the model's torch._dynamo import, made after
    init, used to keep the group alive)."""
    worker = Path(__file__).parent / "workers" / "teardown.py"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("threads left []") == 2, res.stdout


def test_a_rank_whose_group_outlived_shutdown_leaves_without_finalizing(monkeypatch):
    """FSDP2 leaves its process group referenced from torch's caches, so its gloo threads outlive
    shutdown_distributed, and interpreter finalization with them alive aborted a rank after its work was done:
    such a rank ends through os._exit, with the command's exit code and its output flushed."""
    from nanogpt4.train import distributed

    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.setattr(distributed, "comm_threads", lambda: ["pt_gloo_runloop"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.leave_rank(0)
    distributed.leave_rank(2)
    assert exits == [0, 2]
    monkeypatch.setattr(distributed, "comm_threads", lambda: [])  # the group was freed: a normal exit
    distributed.leave_rank(0)
    monkeypatch.setattr(distributed, "comm_threads", lambda: ["pt_gloo_runloop"])
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to leave
    distributed.leave_rank(0)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.leave_rank(0)
    assert exits == [0, 2]
