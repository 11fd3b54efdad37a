"""No run lost or mislabelled (every script): one folder per run even when runs start in the same second, a clean
stop on Ctrl-C (SIGINT) and SIGTERM, the budget said at start, one closing-line format."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_scripts, scripts_defining

# A run of a few seconds at most for each script: (script, flags).
SHORT = {
    "ppo_discrete": ["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64"],
    "ppo_continuous": ["--env-id", "Pendulum-v1", "--total-timesteps", "128", "--num-steps", "64",
                       "--num-minibatches", "2", "--update-epochs", "1"],
    "ppo_penalty": ["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64"],
    "trpo": ["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
             "--vf-iters", "1"],
    "ppo_rlhf_toy": ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--sft-steps", "4",
                     "--sft-batch-size", "16", "--num-pairs", "32", "--heldout-pairs", "16", "--rm-epochs", "1",
                     "--rm-batch-size", "16", "--ppo-iterations", "2", "--rollout-batch-size", "16",
                     "--num-minibatches", "2", "--update-epochs", "1", "--direct-epochs", "1", "--direct-batch-size",
                     "16", "--direct-eval-every", "1", "--eval-episodes", "16"],
}
DEADLINE = 120  # seconds any subprocess here may take before the test fails instead of hanging


def modules():
    return {module.__name__: module for module in load_scripts()}


@pytest.mark.parametrize("make_run_dir", scripts_defining("make_run_dir"))
def test_make_run_dir_takes_the_next_free_second(make_run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = int(time.time())
    taken = [tmp_path / "runs" / f"CartPole-v1__exp__1__{now + k}" for k in range(3)]
    for folder in taken:
        folder.mkdir(parents=True)
    name, path = make_run_dir("CartPole-v1", "exp", 1)
    assert re.fullmatch(r"CartPole-v1__exp__1__\d+", name), "cleanrl's <env>__<exp>__<seed>__<integer> form"
    assert int(name.rsplit("__", 1)[1]) >= now + 3
    assert Path(path).is_dir() and Path(path).name == name
    assert all(not any(folder.iterdir()) for folder in taken)


@pytest.mark.parametrize("name", list(SHORT))
def test_a_clash_gets_its_own_folder_and_the_closing_line(name, tmp_path, monkeypatch, capsys):
    """A forced clash: the folders of the next seconds exist already (another run of the same env, experiment
    and seed took them); the run writes into a new one and leaves theirs alone."""
    module = modules()[name]
    monkeypatch.chdir(tmp_path)
    env = "rlhf-toy" if name == "ppo_rlhf_toy" else ("Pendulum-v1" if name == "ppo_continuous" else "CartPole-v1")
    now = int(time.time())
    taken = [tmp_path / "runs" / f"{env}__{name}__1__{now + k}" for k in range(3)]
    for folder in taken:
        folder.mkdir(parents=True)
    lr = "vf_lr" if name == "trpo" else "learning_rate"  # trpo.py's policy step has no learning rate
    module.main(SHORT[name] + [f"--{lr.replace('_', '-')}", "0.00042"])
    out = capsys.readouterr().out
    new = [d for d in (tmp_path / "runs").iterdir() if d not in taken]
    assert len(new) == 1 and all(not any(folder.iterdir()) for folder in taken)
    assert json.loads((new[0] / "args.json").read_text())[lr] == 0.00042
    assert (new[0] / "summary.json").exists() and not list(new[0].glob("*.tmp"))
    last = out.strip().splitlines()[-1]
    if name == "ppo_rlhf_toy":
        assert re.fullmatch(r"done: 4 stages in \d+\.\d s; gold reward pi_ref -?\d+\.\d\d -> PPO -?\d+\.\d\d, DPO "
                            r"-?\d+\.\d\d \(best possible \d+\); metrics in \S+/metrics\.jsonl", last), last
    else:
        assert re.fullmatch(r"done: \d+ steps in \d+\.\d s; mean return of the last 100 episodes (-|-?\d+\.\d\d); "
                            r"metrics in \S+/metrics\.jsonl", last), last
        assert out.splitlines()[0].startswith("budget: ")


@pytest.mark.parametrize("budget_line", scripts_defining("budget_line"))
def test_the_budget_says_what_is_trained(budget_line):
    line = budget_line(5000, 512)
    assert "9 iterations x 512 steps = 4608 steps" in line
    assert "notice" in line and "5000" in line and "392" in line
    assert "notice" not in budget_line(1024, 512)


@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_continuous"])
def test_runs_started_together_end_in_their_own_correctly_labelled_folders(name, tmp_path):
    """The sweep of the issue: three runs, same env, experiment and seed, started at once, different LRs."""
    rates = ["0.001", "0.0001", "0.00001"]
    flags = SHORT[name] + ["--no-anneal-lr"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *flags, "--learning-rate", lr],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for lr in rates]
    for proc in procs:
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err[-2000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 3
    seen = set()
    for folder in folders:
        lr = json.loads((folder / "args.json").read_text())["learning_rate"]
        logged = {json.loads(line)["learning_rate"] for line in (folder / "metrics.jsonl").read_text().splitlines()}
        assert logged == {lr}, folder.name
        seen.add(lr)
    assert seen == {float(lr) for lr in rates}


def start(name: str, flags: list, cwd: Path) -> subprocess.Popen:
    """The script in a session of its own, so that a signal can go to its whole process group (as a terminal's
    Ctrl-C does: env worker subprocesses included). Its stdout goes to cwd/stdout.txt, readable while it runs."""
    return subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *flags], cwd=cwd,
                            stdout=open(cwd / "stdout.txt", "w"), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, cwd: Path) -> tuple[str, str]:
    """(stdout, stderr) of a process from start() once it ended; past the deadline, its whole group is killed
    and the test fails instead of hanging."""
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"still running after {DEADLINE} s: {err[-1000:]}") from None
    return (cwd / "stdout.txt").read_text(), err


def wait_for(path: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + DEADLINE
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path.name} before the process ended or the deadline")


def wait_for_first_row(proc: subprocess.Popen, cwd: Path, stage: str = "") -> Path:
    """The run's folder, once its metrics.jsonl has a row (of `stage`, for the RLHF script)."""
    deadline = time.time() + DEADLINE
    while time.time() < deadline:
        files = list(cwd.glob("runs/*/metrics.jsonl"))
        text = files[0].read_text() if files else ""
        if text.strip() and (not stage or f'"stage": "{stage}"' in text):
            return files[0].parent
        if proc.poll() is not None:
            raise AssertionError(f"ended before its first row: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("no metrics row before the deadline")


SIGNALLED = [
    ("ppo_continuous", signal.SIGINT, ["--num-envs", "2", "--num-steps", "256", "--num-minibatches", "4",
                                       "--update-epochs", "1", "--total-timesteps", "1000000", "--save-model",
                                       "--eval-episodes", "1"]),
    ("ppo_continuous", signal.SIGTERM, ["--num-envs", "2", "--num-steps", "256", "--num-minibatches", "4",
                                        "--update-epochs", "1", "--total-timesteps", "1000000", "--save-model",
                                        "--eval-episodes", "1"]),
    ("ppo_discrete", signal.SIGTERM, ["--total-timesteps", "10000000", "--save-model", "--eval-episodes", "1"]),
    ("ppo_penalty", signal.SIGINT, ["--total-timesteps", "10000000", "--save-model", "--eval-episodes", "1"]),
    ("trpo", signal.SIGTERM, ["--total-timesteps", "10000000", "--save-model", "--eval-episodes", "1"]),
]


@pytest.mark.parametrize("name,sig,flags", SIGNALLED, ids=[f"{n}-{s.name}" for n, s, _ in SIGNALLED])
def test_a_signal_stops_the_run_cleanly(name, sig, flags, tmp_path):
    proc = start(name, flags, tmp_path)
    run_dir = wait_for_first_row(proc, tmp_path)
    os.killpg(proc.pid, sig)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 128 + sig, (out[-1000:], err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == sig.name
    assert summary["iterations"] >= 1
    assert (run_dir / f"{name}.pt").exists()
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["iteration"] == summary["iterations"]
    assert re.search(rf"stopped by {sig.name} after iteration \d+: \d+ steps in", out), out[-1000:]


def test_the_rlhf_run_stops_in_its_stage(tmp_path):
    proc = start("ppo_rlhf_toy", SHORT["ppo_rlhf_toy"] + ["--save-model", "--ppo-iterations", "100000"], tmp_path)
    run_dir = wait_for_first_row(proc, tmp_path, stage="ppo")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and summary["stopped_in_stage"] == "ppo"
    assert "stopped by SIGINT in stage ppo" in out
    checkpoint = torch.load(run_dir / "ppo_rlhf_toy.pt", weights_only=True)
    assert {"ref_policy", "reward_model", "ppo_policy"} <= set(checkpoint) and "dpo_policy" not in checkpoint


def test_a_second_signal_stops_at_once(tmp_path):
    flags = ["--total-timesteps", "10000000", "--num-steps", "8192", "--update-epochs", "10"]
    proc = start("ppo_discrete", flags, tmp_path)
    run_dir = wait_for_first_row(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(tmp_path / "stdout.txt", "SIGINT: stopping after this iteration", proc)  # the first one was handled
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "SIGINT again: stopping now" in out
    assert not (run_dir / "summary.json").exists()
