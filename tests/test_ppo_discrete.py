"""End-to-end tests of ppo_discrete.py: smoke run, checkpoint round trip, determinism, bad input, NaN stop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_discrete
from conftest import ROOT

TWO_ITERATIONS = ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "128"]


def run_dirs(cwd: Path):
    return sorted((cwd / "runs").glob("*")) if (cwd / "runs").exists() else []


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_train_save_and_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = ppo_discrete.main(TWO_ITERATIONS + ["--save-model", "--eval-episodes", "2"])
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [1, 2]
    for key in ("approx_kl_k1", "approx_kl_k3", "clipfrac", "entropy", "explained_variance", "policy_loss",
                "value_loss", "learning_rate", "sps", "episodic_return", "episodic_length"):
        assert key in metrics[-1], key
    assert metrics[-1]["global_step"] == 1024
    assert metrics[0]["learning_rate"] == pytest.approx(2.5e-4)
    assert metrics[1]["learning_rate"] == pytest.approx(2.5e-4 / 2)  # linear annealing over 2 iterations
    assert metrics[0]["update_minibatches"] == 16  # 4 epochs x 4 minibatches, no early stop

    checkpoint_path = run_dir / "ppo_discrete.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["script"] == "ppo_discrete"
    assert checkpoint["args"]["env_id"] == "CartPole-v1"
    assert "eval_return_mean" in summary

    result = ppo_discrete.main(["--eval-checkpoint", str(checkpoint_path), "--eval-episodes", "3"])
    assert len(result["eval_returns"]) == 3
    assert "eval CartPole-v1: return" in capsys.readouterr().out


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        ppo_discrete.main(TWO_ITERATIONS)
        runs.append(read_metrics(run_dirs(tmp_path / name)[0]))
    for first, second in zip(*runs):
        for key in ("time", "sps"):
            first.pop(key), second.pop(key)
        assert first == second


def test_target_kl_stops_the_update_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ppo_discrete.main(TWO_ITERATIONS + ["--target-kl", "1e-9", "--learning-rate", "0.01"])
    metrics = read_metrics(run_dirs(tmp_path)[0])
    assert all(m["update_minibatches"] < 16 for m in metrics)


class CountingEnv(gym.Env):
    """Observation = steps taken / 10, reward 1 every step; terminates at step `terminate_at` if given.
    Registered below with a 4-step time limit, so episodes end by truncation unless terminate_at <= 4."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, terminate_at=None):
        self.terminate_at, self.t = terminate_at, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([self.t / 10], np.float32), 1.0, terminated, False, {}


gym.register("CountingTruncated-v0", entry_point=CountingEnv, max_episode_steps=4)
gym.register("CountingTerminated-v0", entry_point=lambda: CountingEnv(terminate_at=4), max_episode_steps=10)


@pytest.mark.parametrize("env_id,bootstrapped", [("CountingTruncated-v0", True), ("CountingTerminated-v0", False)])
def test_time_limit_is_bootstrapped_and_termination_is_not(tmp_path, monkeypatch, env_id, bootstrapped):
    """Every 4th transition ends an episode. At a time limit the reward GAE sees is 1 + gamma * V(s_final)
    with s_final = [0.4], the real last observation (not the reset one); at a termination it stays 1."""
    monkeypatch.chdir(tmp_path)
    agents, seen = [], []

    class SpyAgent(ppo_discrete.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    def spy_gae(rewards, values, dones, last_value, gamma, gae_lambda):
        if not seen:  # first iteration: the agent has not been updated yet
            with torch.no_grad():
                v_final = agents[0].value(torch.tensor([[0.4]])).item()
            seen.append((rewards.clone(), dones.clone(), gamma * v_final))
        return original_gae(rewards, values, dones, last_value, gamma, gae_lambda)

    original_gae = ppo_discrete.compute_gae
    monkeypatch.setattr(ppo_discrete, "Agent", SpyAgent)
    monkeypatch.setattr(ppo_discrete, "compute_gae", spy_gae)
    ppo_discrete.main(["--env-id", env_id, "--total-timesteps", "32", "--num-envs", "2", "--num-steps", "16",
                       "--num-minibatches", "2"])
    rewards, dones, bootstrap = seen[0]
    ends = torch.zeros(16, 2)
    ends[3::4] = 1.0
    torch.testing.assert_close(dones, ends)
    expected = torch.ones(16, 2) + (bootstrap * ends if bootstrapped else 0.0)
    torch.testing.assert_close(rewards, expected)
    assert abs(bootstrap) > 1e-3  # the check above would be vacuous if V(s_final) were 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--env-id", "Pendulum-v1"], "Box action space; this script needs Discrete"),
        (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
        (["--num-minibatches", "3"], "does not divide the batch size 512"),
        (["--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--total-timesteps", "100"], "smaller than one batch"),
    ],
)
def test_bad_input_exits_before_training(tmp_path, argv, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_discrete.py"), *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_checkpoint_from_another_script_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"script": "ppo_continuous", "model": {}, "args": {}}, path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_discrete.py"), "--eval-checkpoint", str(path)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "written by ppo_continuous.py, not ppo_discrete.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_iteration_and_quantity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def nan_value_loss(new_values, old_values, returns, clip_coef):
        return new_values.mean() * float("nan")

    monkeypatch.setattr(ppo_discrete, "value_loss", nan_value_loss)
    with pytest.raises(SystemExit, match=r"value_loss is nan at iteration 1, minibatch 1 "):
        ppo_discrete.main(TWO_ITERATIONS + ["--save-model"])
    assert not list(tmp_path.glob("runs/*/ppo_discrete.pt"))


def test_wandb_failure_never_stops_training(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    ppo_discrete.main(TWO_ITERATIONS + ["--track"])
    assert "wandb disabled, training goes on: RuntimeError: no network" in capsys.readouterr().out
    assert len(read_metrics(run_dirs(tmp_path)[0])) == 2


def test_wandb_offline_run(tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_discrete.py"), *TWO_ITERATIONS, "--track"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert list(run_dir.glob("wandb/offline-run-*"))
    assert "wandb disabled" not in result.stdout


def test_capture_video_without_moviepy_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_find_spec = ppo_discrete.importlib.util.find_spec
    # both made to look missing, so the test does not depend on what this machine has installed
    monkeypatch.setattr(
        ppo_discrete.importlib.util, "find_spec",
        lambda name: None if name in ("moviepy", "pygame") else real_find_spec(name),
    )
    with pytest.raises(SystemExit, match="--capture-video needs moviepy and pygame: pip install moviepy pygame"):
        ppo_discrete.main(TWO_ITERATIONS + ["--capture-video"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "videos").exists()


def test_agent_sample_draws_from_the_softmax_of_the_actor():
    """The rollout's a ~ pi_old(.|s): agent.sample's frequencies are softmax(agent.actor(s)), per state."""
    torch.manual_seed(0)
    agent = ppo_discrete.Agent(4, 3)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(300.0)  # a policy far from uniform, different in the two states
        obs = torch.randn(2, 4)
        probs = agent.actor(obs).softmax(-1)  # [2, 3]
        actions = agent.sample(obs.repeat_interleave(20000, dim=0)).reshape(2, 20000)
    assert actions.dtype == torch.long
    for state in range(2):
        frequencies = torch.bincount(actions[state], minlength=3).double() / 20000
        torch.testing.assert_close(frequencies, probs[state].double(), atol=0.015, rtol=0)
    assert (probs[0] - probs[1]).abs().max() > 0.1
