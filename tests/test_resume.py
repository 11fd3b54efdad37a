"""Long runs that survive (issue 28), in ppo_discrete.py, ppo_continuous.py, ppo_penalty.py and trpo.py: a run stopped after iteration k and resumed from its checkpoint logs exactly
what the run that never stopped logs; a run SIGKILLed at random moments (while writing its checkpoint too) always
leaves a checkpoint that loads and, resumed, a metrics.jsonl with every iteration once; bad resumes are refused
in one line before anything starts."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ppo_continuous
import ppo_discrete
import ppo_penalty
import trpo
from conftest import ROOT

RESUMABLE = [ppo_discrete, ppo_continuous, ppo_penalty, trpo]

# (script, flags): 10 short iterations; CartPole ends episodes by termination, HalfCheetah by its time limit
# (1000 steps: one in iteration 4 and one in 8), Hopper on mujoco.batch by falling
RUNS = [
    (ppo_discrete, ["--total-timesteps", "5120"]),
    (ppo_continuous, ["--env-id", "HalfCheetah-v4", "--num-steps", "256", "--num-minibatches", "4",
                      "--update-epochs", "2", "--total-timesteps", "2560"]),
    (ppo_continuous, ["--env-id", "Hopper-v4", "--env-backend", "mujoco-batch", "--num-envs", "4", "--num-steps",
                      "64", "--num-minibatches", "4", "--update-epochs", "2", "--total-timesteps", "2560"]),
    (ppo_penalty, ["--env-id", "HalfCheetah-v4", "--num-envs", "1", "--num-steps", "256", "--num-minibatches", "4",
                   "--update-epochs", "2", "--total-timesteps", "2560"]),
    (trpo, ["--env-id", "HalfCheetah-v4", "--num-steps", "128", "--total-timesteps", "2560"]),
    (trpo, ["--env-id", "CartPole-v1", "--num-steps", "256", "--total-timesteps", "5120"]),
    (ppo_continuous, ["--env-id", "Hopper-v4", "--num-envs", "2", "--num-steps", "128", "--num-minibatches", "4",
                      "--update-epochs", "2", "--total-timesteps", "2560"]),  # AsyncVectorEnv: envs in subprocesses
]


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time"), row.pop("sps")
    return rows


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = sorted((cwd / "runs").glob("*"))
    return run_dir


@pytest.mark.parametrize("module,flags", RUNS, ids=["cartpole", "halfcheetah", "hopper-mujoco-batch",
                                                          "penalty-halfcheetah", "trpo-halfcheetah", "trpo-cartpole",
                                                          "hopper-subprocesses"])
def test_a_resumed_run_logs_exactly_what_the_straight_run_logs(tmp_path, monkeypatch, module, flags):
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    module.main(flags)
    straight = metric_rows(only_run_dir(tmp_path / "straight"))

    (tmp_path / "stopped").mkdir()
    monkeypatch.chdir(tmp_path / "stopped")
    log = module.Logger.log

    def log_then_stop_after_iteration_4(self, metrics):  # as Ctrl-C during iteration 4 would
        log(self, metrics)
        if metrics["iteration"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(module.Logger, "log", log_then_stop_after_iteration_4)
    with pytest.raises(SystemExit):
        module.main([*flags, "--save-model", "--eval-episodes", "1"])
    monkeypatch.setattr(module.Logger, "log", log)
    run_dir = only_run_dir(tmp_path / "stopped")
    checkpoint = torch.load(run_dir / f"{module.SCRIPT}.pt", weights_only=True)
    assert checkpoint["iteration"] == 4
    module.main([*flags, "--resume", str(run_dir / f"{module.SCRIPT}.pt")])
    assert only_run_dir(tmp_path / "stopped") == run_dir  # the same folder, no second one
    resumed = metric_rows(run_dir)
    assert [row["iteration"] for row in resumed] == list(range(1, 11))
    assert resumed == straight


def test_sigkilled_at_random_moments_the_run_still_finishes_with_every_iteration_once(tmp_path):
    """ppo_discrete.py with --save-every 1, killed (SIGKILL) three times at seeded random moments after its first
    checkpoint, resumed each time: the checkpoint always loads, and the metrics run 1..N with no gap or repeat."""
    rng = random.Random(0)
    flags = ["--total-timesteps", "51200", "--save-every", "1"]  # 100 iterations of ~20-40 ms
    cmd = [sys.executable, str(ROOT / "ppo_discrete.py"), *flags]
    checkpoint = None
    for kill in range(4):
        resume = ["--resume", str(checkpoint)] if checkpoint else []
        proc = subprocess.Popen(cmd + resume, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kill < 3:
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob("runs/*/ppo_discrete.pt")) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            proc.kill()
            proc.wait(timeout=60)
        else:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr.decode()
        (checkpoint,) = tmp_path.glob("runs/*/ppo_discrete.pt")
        assert torch.load(checkpoint, weights_only=True)["iteration"] >= 1  # never a broken file
    (run_dir,) = tmp_path.glob("runs/*")
    iterations = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, 101))
    assert not list(run_dir.glob("*.tmp*"))


@pytest.mark.parametrize("module", RESUMABLE)
def test_a_write_cut_off_leaves_the_previous_checkpoint(tmp_path, monkeypatch, module):
    path = str(tmp_path / "run.pt")
    module.save_checkpoint(path, {"iteration": 1})

    def save_half_then_die(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as a kill in the middle of torch.save

    monkeypatch.setattr(module.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        module.save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert len(list(tmp_path.glob("run.pt.tmp*"))) == 1  # what the cut-off write left: removed by the next one
    module.save_checkpoint(path, {"iteration": 3})
    assert torch.load(path, weights_only=True) == {"iteration": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_the_flags_a_resume_may_change_are_the_same_in_every_script():
    assert all(module.RESUME_MAY_CHANGE == ppo_discrete.RESUME_MAY_CHANGE for module in RESUMABLE)


@pytest.mark.parametrize("module", RESUMABLE)
def test_metrics_past_the_checkpoint_and_a_cut_off_line_are_dropped(tmp_path, module):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 6)) + '{"iteration": 6, "glo')
    module.keep_metrics_until(str(path), 3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]


@pytest.fixture(scope="module")
def cartpole_checkpoint(tmp_path_factory) -> Path:
    """A finished 2-iteration ppo_discrete.py run's checkpoint."""
    cwd = tmp_path_factory.mktemp("checkpoint")
    subprocess.run([sys.executable, str(ROOT / "ppo_discrete.py"), "--total-timesteps", "1024", "--save-model",
                    "--eval-episodes", "1"], cwd=cwd, check=True, capture_output=True)
    (path,) = cwd.glob("runs/*/ppo_discrete.pt")
    return path


@pytest.mark.parametrize(
    "script,flags,message",
    [
        ("ppo_discrete.py", ["--total-timesteps", "2048", "--learning-rate", "1e-3"],
         "--resume: --learning-rate was 0.00025 in that run, now 0.001"),
        ("ppo_discrete.py", ["--total-timesteps", "1024"], "raise --total-timesteps to train on"),
        ("ppo_continuous.py", [], "was written by ppo_discrete.py, not ppo_continuous.py"),
    ],
)
def test_bad_resumes_are_refused_in_one_line(tmp_path, cartpole_checkpoint, script, flags, message):
    result = subprocess.run([sys.executable, str(ROOT / script), *flags, "--resume", str(cartpole_checkpoint)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_weights_only_checkpoint_cannot_be_resumed(tmp_path, monkeypatch):
    path = tmp_path / "old.pt"
    torch.save({"script": "ppo_discrete", "model": {}, "args": {}}, path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="holds no training state to resume"):
        ppo_discrete.main(["--resume", str(path)])


def test_an_extended_budget_trains_on_in_the_same_folder(tmp_path, monkeypatch, cartpole_checkpoint):
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "run" / "ppo_discrete.pt"
    copy.parent.mkdir()
    copy.write_bytes(cartpole_checkpoint.read_bytes())
    (copy.parent / "metrics.jsonl").write_text((cartpole_checkpoint.parent / "metrics.jsonl").read_text())
    summary = ppo_discrete.main(["--total-timesteps", "2048", "--resume", str(copy)])
    assert summary["global_step"] == 2048 and summary["iterations"] == 4
    assert [json.loads(line)["iteration"] for line in (copy.parent / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_two_ranks_resume_exactly_and_a_changed_rank_count_is_refused(tmp_path):
    """torchrun, 2 ranks, ppo_discrete.py without LR annealing (so a budget extended on resume trains as the
    longer run would): 2 iterations, then --resume to 4, logs what 4 iterations straight log; the 2-rank checkpoint
    resumed by one process is refused in one line."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(ROOT / "ppo_discrete.py"), "--no-anneal-lr", "--save-every", "1"]
    for name, budget in (("straight", "4096"), ("resumed", "2048")):
        (tmp_path / name).mkdir()
        done = subprocess.run([*launcher, "--total-timesteps", budget], cwd=tmp_path / name, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = next((tmp_path / "resumed").glob("runs/*/ppo_discrete.pt"))
    done = subprocess.run([*launcher, "--total-timesteps", "4096", "--resume", str(checkpoint)],
                          cwd=tmp_path / "resumed", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    straight, resumed = (metric_rows(only_run_dir(tmp_path / name)) for name in ("straight", "resumed"))
    assert [row["iteration"] for row in resumed] == [1, 2, 3, 4] and resumed == straight
    one = subprocess.run([sys.executable, str(ROOT / "ppo_discrete.py"), "--no-anneal-lr", "--save-every", "1",
                          "--total-timesteps", "8192", "--resume", str(checkpoint)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode != 0 and one.stderr.strip() == f"error: {checkpoint} holds 2 ranks' envs; this run has 1"
