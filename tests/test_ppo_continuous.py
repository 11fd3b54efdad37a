"""Tests of ppo_continuous.py: the Gaussian policy's math, the running normalisers, smoke runs on Pendulum-v1
and HalfCheetah-v4, checkpoint -> evaluation round trip, determinism, truncation bootstrap, bad input, NaN stop.
The contract functions it shares with ppo_discrete.py are tested in test_contract.py."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_continuous
from conftest import ROOT

# 2 iterations of 100 steps; Pendulum episodes last 200 steps, so the second iteration ends one (by time limit)
TWO_ITERATIONS = ["--env-id", "Pendulum-v1", "--num-steps", "100", "--num-minibatches", "2",
                  "--update-epochs", "1", "--total-timesteps", "200"]


def run_dirs(cwd: Path):
    return sorted((cwd / "runs").glob("*")) if (cwd / "runs").exists() else []


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Gaussian policy math
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_state_std", [False, True])
def test_gaussian_log_prob_and_entropy_match_torch_distributions(per_state_std):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(32, 6, generator=g, dtype=torch.float64) * 2
    log_std = torch.randn(32, 6, generator=g, dtype=torch.float64) if per_state_std else \
        torch.randn(6, generator=g, dtype=torch.float64)
    actions = mean + torch.randn(32, 6, generator=g, dtype=torch.float64) * 3
    normal = torch.distributions.Normal(mean, log_std.exp())
    logprob = ppo_continuous.gaussian_log_prob(mean, log_std, actions)
    assert logprob.shape == (32,)
    torch.testing.assert_close(logprob, normal.log_prob(actions).sum(-1))
    entropy = ppo_continuous.gaussian_entropy(log_std)
    torch.testing.assert_close(entropy.expand(32), normal.entropy().sum(-1))


def test_gaussian_docstring_examples():
    logprob = ppo_continuous.gaussian_log_prob(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 0.0]))
    assert logprob.item() == pytest.approx(-0.5 - math.log(2 * math.pi), abs=1e-6)
    assert logprob.item() == pytest.approx(-2.3379, abs=1e-4)
    assert ppo_continuous.gaussian_entropy(torch.zeros(1)).item() == pytest.approx(1.4189, abs=1e-4)
    assert ppo_continuous.gaussian_entropy(torch.tensor([0.0, math.log(2.0)])).item() == pytest.approx(3.5310, abs=1e-4)


def test_gaussian_log_prob_gradients_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_std = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randn(8, 3, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(ppo_continuous.gaussian_log_prob(mean, log_std, actions).sum(), (mean, log_std))
    reference = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum()
    for a, b in zip(ours, torch.autograd.grad(reference, (mean, log_std))):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Running normalisers
# ---------------------------------------------------------------------------------------------------------


def test_running_mean_std_of_streamed_batches_equals_that_of_all_data():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1000, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + \
        torch.tensor([5.0, -3.0, 0.0, 100.0])
    rms = ppo_continuous.RunningMeanStd((4,), torch.device("cpu"))
    start = 0
    for size in [1, 1, 7, 100, 1, 391, 2, 497]:  # uneven batches, batches of one included
        rms.update(data[start : start + size])
        start += size
    assert start == len(data)
    assert rms.count == 1000
    torch.testing.assert_close(rms.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms.var, data.var(0, correction=0), rtol=1e-12, atol=1e-12)


def test_running_mean_std_docstring_example_and_normalize():
    rms = ppo_continuous.RunningMeanStd((1,), torch.device("cpu"))
    x = torch.tensor([[2.0], [-3.0]])
    torch.testing.assert_close(rms.normalize(x), x)  # before any data: identity
    rms.update(torch.tensor([[1.0], [3.0]]))
    rms.update(torch.tensor([[5.0]]))
    assert rms.mean.item() == pytest.approx(3.0) and rms.var.item() == pytest.approx(8 / 3) and rms.count == 3
    out = rms.normalize(torch.tensor([[3.0 + math.sqrt(8 / 3)], [1e6], [-1e6]], dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0], [10.0], [-10.0]]))  # clipped to +-10


def test_running_mean_std_state_survives_save_and_load(tmp_path):
    g = torch.Generator().manual_seed(2)
    rms = ppo_continuous.RunningMeanStd((3,), torch.device("cpu"))
    for _ in range(5):
        rms.update(torch.randn(10, 3, generator=g) * 4 + 1)
    torch.save({"obs_rms": rms.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["obs_rms"]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = ppo_continuous.RunningMeanStd((3,), torch.device("cpu"))
    restored.load_state_dict(state)
    x = torch.randn(6, 3, generator=g)
    torch.testing.assert_close(restored.normalize(x), rms.normalize(x), rtol=0, atol=0)
    assert restored.count == rms.count == 50
    batch = torch.randn(7, 3, generator=g)
    rms.update(batch), restored.update(batch)  # both go on identically
    torch.testing.assert_close(restored.mean, rms.mean, rtol=0, atol=0)
    torch.testing.assert_close(restored.var, rms.var, rtol=0, atol=0)


def test_reward_scaler_divides_by_std_of_discounted_return_and_restarts_at_episode_end():
    gamma = 0.9
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(50, 2, generator=g, dtype=torch.float64) * 5 + 1
    dones = (torch.rand(50, 2, generator=g) < 0.1).double()
    scaler = ppo_continuous.RewardScaler(2, gamma, torch.device("cpu"))
    scaled = scaler(rewards, dones)  # the whole rollout in one call
    # reference: plain Python, the returns of every env and step so far, their population std
    running, seen, expected = [0.0, 0.0], [], np.zeros((50, 2))
    for t in range(50):
        for n in range(2):
            running[n] = running[n] * gamma + rewards[t, n].item()
        seen.extend(running)
        for n in range(2):
            expected[t, n] = np.clip(rewards[t, n].item() / math.sqrt(np.var(seen) + 1e-8), -10, 10)
            if dones[t, n]:
                running[n] = 0.0
    np.testing.assert_allclose(scaled.numpy(), expected, rtol=1e-9)
    # the docstring's example
    scaler = ppo_continuous.RewardScaler(1, 0.5, torch.device("cpu"))
    scaled = scaler(torch.tensor([[2.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
    assert scaled[:, 0].tolist() == pytest.approx([10.0, 4.0], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def test_smoke_pendulum_train_save_and_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = ppo_continuous.main(TWO_ITERATIONS + ["--save-model", "--eval-episodes", "2"])
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [1, 2]
    for key in ("approx_kl_k1", "approx_kl_k3", "clipfrac", "entropy", "explained_variance", "policy_loss",
                "value_loss", "learning_rate", "sps", "episodic_return", "episodic_length", "episodic_return_100",
                "action_std", "reward_scale", "time", "global_step"):
        assert key in metrics[-1], key
    assert metrics[-1]["global_step"] == 200
    assert metrics[0]["learning_rate"] == pytest.approx(3e-4)
    assert metrics[1]["learning_rate"] == pytest.approx(3e-4 / 2)  # linear annealing over 2 iterations
    assert metrics[0]["update_minibatches"] == 2  # 1 epoch x 2 minibatches
    assert metrics[0]["entropy"] == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi), abs=1e-3)  # std 1, 1 dim
    assert metrics[-1]["episodic_length"] == 200 and metrics[-1]["episodic_return"] is not None

    checkpoint_path = run_dir / "ppo_continuous.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["script"] == "ppo_continuous"
    assert checkpoint["args"]["env_id"] == "Pendulum-v1"
    assert checkpoint["obs_rms"]["mean"].shape == (3,) and checkpoint["obs_rms"]["var"].shape == (3,)
    # the reset observation, one per step, and the final observation of the episode that ended at step 200
    assert checkpoint["obs_rms"]["count"].item() == 202
    assert checkpoint["return_rms"]["count"].item() == 200  # one return per step
    assert "actor_logstd" in checkpoint["model"]
    assert "eval_return_mean" in summary

    result = ppo_continuous.main(["--eval-checkpoint", str(checkpoint_path), "--eval-episodes", "2"])
    assert len(result["eval_returns"]) == 2
    assert result["eval_returns"].mean() == pytest.approx(summary["eval_return_mean"])  # same seed, same agent
    assert "eval Pendulum-v1: return" in capsys.readouterr().out


def test_evaluation_uses_the_saved_normaliser_frozen(tmp_path, monkeypatch):
    """The actor sees (obs - saved mean) / sqrt(saved var + eps); the statistics never move during evaluation."""
    monkeypatch.chdir(tmp_path)
    ppo_continuous.main(TWO_ITERATIONS + ["--save-model", "--eval-episodes", "1"])
    checkpoint = torch.load(run_dirs(tmp_path)[0] / "ppo_continuous.pt", weights_only=True)
    saved = {k: v.clone() for k, v in checkpoint["obs_rms"].items()}
    assert not torch.allclose(saved["mean"], torch.zeros(3, dtype=torch.float64))  # trained, not initial

    def no_update(self, batch):
        raise AssertionError("evaluation must not update the observation statistics")

    actor_inputs = []

    class SpyAgent(ppo_continuous.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.actor_mean.register_forward_hook(lambda module, inputs, output: actor_inputs.append(inputs[0]))

    monkeypatch.setattr(ppo_continuous.RunningMeanStd, "update", no_update)
    monkeypatch.setattr(ppo_continuous, "Agent", SpyAgent)
    ppo_continuous.evaluate(checkpoint, episodes=1, seed=5, device=torch.device("cpu"))
    for key in saved:
        torch.testing.assert_close(checkpoint["obs_rms"][key], saved[key], rtol=0, atol=0)
    first_obs, _ = gym.make("Pendulum-v1").reset(seed=5)
    expected = (torch.as_tensor(first_obs, dtype=torch.float64) - saved["mean"]) / (saved["var"] + 1e-8).sqrt()
    torch.testing.assert_close(actor_inputs[0], expected.float())
    assert len(actor_inputs) == 200  # one full episode


def test_smoke_halfcheetah(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ppo_continuous.main(["--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1",
                         "--total-timesteps", "128", "--save-model", "--eval-episodes", "1"])
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("HalfCheetah-v4__ppo_continuous__1__")
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in metrics] == [64, 128]
    assert all(math.isfinite(m["value_loss"]) and math.isfinite(m["approx_kl_k3"]) for m in metrics)
    checkpoint = torch.load(run_dir / "ppo_continuous.pt", weights_only=True)
    assert checkpoint["obs_rms"]["mean"].shape == (17,)
    assert checkpoint["model"]["actor_logstd"].shape == (6,)
    assert "eval_return_mean" in json.loads((run_dir / "summary.json").read_text())


def spy_on_make_envs(monkeypatch) -> list:
    """The vector envs main() makes, in a list."""
    made = []
    original = ppo_continuous.make_envs

    def spy_make_envs(args, run_name):
        made.append(original(args, run_name))
        return made[-1]

    monkeypatch.setattr(ppo_continuous, "make_envs", spy_make_envs)
    return made


def test_several_envs_step_in_subprocesses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = spy_on_make_envs(monkeypatch)
    ppo_continuous.main(["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "128",
                         "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "512"])
    assert isinstance(made[0].unwrapped, gym.vector.AsyncVectorEnv)
    metrics = read_metrics(run_dirs(tmp_path)[0])
    assert [m["global_step"] for m in metrics] == [256, 512]
    # Pendulum's episodes end by time limit at step 200: one per env in the second iteration, reported by the
    # RecordEpisodeStatistics wrapper around the subprocesses
    assert [m["episodes"] for m in metrics] == [0, 2] and metrics[1]["episodic_length"] == 200


def test_one_env_steps_in_this_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = spy_on_make_envs(monkeypatch)
    ppo_continuous.main(["--env-id", "Pendulum-v1", "--num-steps", "256", "--num-minibatches", "2",
                         "--update-epochs", "1", "--total-timesteps", "256"])
    assert isinstance(made[0], ppo_continuous.SameStepVectorEnv)
    (metrics,) = read_metrics(run_dirs(tmp_path)[0])
    assert metrics["episodes"] == 1 and metrics["episodic_length"] == 200


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        ppo_continuous.main(TWO_ITERATIONS)
        runs.append(read_metrics(run_dirs(tmp_path / name)[0]))
    assert len(runs[0]) == len(runs[1]) == 2
    for first, second in zip(*runs):
        for key in ("time", "sps"):
            first.pop(key), second.pop(key)
        assert first == second


def test_compile_trains_like_eager_up_to_float_rounding(tmp_path, monkeypatch):
    """--compile changes how the minibatch loss is computed (fused kernels), not what: the same seed gives the
    same losses, KLs and returns as the eager run, to float rounding. Its first call compiles (~10 s)."""
    runs = []
    for flags in ([], ["--compile"]):
        (tmp_path / str(len(runs))).mkdir()
        monkeypatch.chdir(tmp_path / str(len(runs)))
        ppo_continuous.main(TWO_ITERATIONS + flags)
        runs.append(read_metrics(run_dirs(tmp_path / str(len(runs)))[0]))
    for eager, compiled in zip(*runs):
        for key in ("policy_loss", "value_loss", "entropy", "loss", "approx_kl_k1", "approx_kl_k3",
                    "explained_variance", "action_std", "episodic_return"):
            if eager[key] is None:  # no episode ended in that iteration
                assert compiled[key] is None, key
            else:
                assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
        assert compiled["clipfrac"] == eager["clipfrac"]


def test_compile_without_a_cxx_compiler_exits_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo_continuous.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        ppo_continuous.main(TWO_ITERATIONS + ["--compile"])
    assert "--compile on the CPU needs a C++ compiler" in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


def test_target_kl_stops_the_update_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ppo_continuous.main(TWO_ITERATIONS + ["--update-epochs", "4", "--target-kl", "1e-9", "--learning-rate", "0.01"])
    metrics = read_metrics(run_dirs(tmp_path)[0])
    assert all(m["update_minibatches"] < 8 for m in metrics)


class BoxCountingEnv(gym.Env):
    """Observation = steps taken / 10, reward 1 every step whatever the action; terminates at step
    `terminate_at` if given. Registered below with a 4-step time limit, so episodes end by truncation unless
    terminate_at <= 4."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

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


class ImageObsEnv(BoxCountingEnv):
    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)


class UnboundedActionEnv(BoxCountingEnv):
    action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


class TupleActionEnv(BoxCountingEnv):
    action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Box(-1.0, 1.0, (1,), np.float32)))


gym.register("BoxCountingTruncated-v0", entry_point=BoxCountingEnv, max_episode_steps=4)
gym.register("BoxCountingTerminated-v0", entry_point=lambda: BoxCountingEnv(terminate_at=4), max_episode_steps=10)
gym.register("ImageObs-v0", entry_point=ImageObsEnv)
gym.register("UnboundedAction-v0", entry_point=UnboundedActionEnv)
gym.register("TupleAction-v0", entry_point=TupleActionEnv)


@pytest.mark.parametrize("env_id,bootstrapped",
                         [("BoxCountingTruncated-v0", True), ("BoxCountingTerminated-v0", False)])
def test_time_limit_is_bootstrapped_and_termination_is_not(tmp_path, monkeypatch, env_id, bootstrapped):
    """Every 4th transition ends an episode. At a time limit the reward GAE sees is the scaled reward plus
    gamma * V(normalised s_final), s_final = [0.4] the real last observation (not the reset one [0]),
    normalised with the statistics of that step (which count s_final and the reset observation); at a termination it is the scaled reward alone."""
    monkeypatch.chdir(tmp_path)
    agents, seen = [], []

    class SpyAgent(ppo_continuous.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    def spy_gae(rewards, values, dones, last_value, gamma, gae_lambda):
        if not seen:  # first iteration: the agent has not been updated yet; keep the critic of this moment
            seen.append((rewards.clone(), dones.clone(), copy.deepcopy(agents[0].critic)))
        return original_gae(rewards, values, dones, last_value, gamma, gae_lambda)

    original_gae = ppo_continuous.compute_gae
    monkeypatch.setattr(ppo_continuous, "Agent", SpyAgent)
    monkeypatch.setattr(ppo_continuous, "compute_gae", spy_gae)
    ppo_continuous.main(["--env-id", env_id, "--total-timesteps", "32", "--num-steps", "16",
                         "--num-minibatches", "2", "--update-epochs", "1"])
    rewards, dones, critic = seen[0]

    # Replay what the normalisers saw: obs after step t is ((t + 1) % 4) / 10, the reward always 1.
    gamma, cpu = 0.99, torch.device("cpu")
    obs_rms, scaler = ppo_continuous.RunningMeanStd((1,), cpu), ppo_continuous.RewardScaler(1, gamma, cpu)
    obs_rms.update(torch.zeros(1, 1, dtype=torch.float64))
    ends = torch.zeros(16, 1)
    ends[3::4] = 1.0
    expected = torch.zeros(16, 1)
    bootstraps = []
    for t in range(16):
        expected[t] = scaler(torch.ones(1, 1, dtype=torch.float64), ends[t : t + 1])[0]  # one step at a time
        if ends[t]:  # the final observation [0.4] counts in the statistics, before the reset one
            obs_rms.update(torch.tensor([[0.4]], dtype=torch.float64))
        obs_rms.update(torch.full((1, 1), ((t + 1) % 4) / 10, dtype=torch.float64))
        if ends[t] and bootstrapped:
            with torch.no_grad():
                v_final = critic(obs_rms.normalize(torch.tensor([[0.4]], dtype=torch.float64))).item()
                v_reset = critic(obs_rms.normalize(torch.tensor([[0.0]], dtype=torch.float64))).item()
            assert abs(v_final - v_reset) > 1e-4  # the check below tells the final obs from the reset one
            expected[t] += gamma * v_final
            bootstraps.append(gamma * v_final)
    torch.testing.assert_close(dones, ends)
    torch.testing.assert_close(rewards, expected)
    assert not bootstrapped or min(abs(b) for b in bootstraps) > 1e-3  # else the check above would be vacuous


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--env-id", "CartPole-v1"], "Discrete action space; this script needs a bounded Box"),
        (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
        (["--num-minibatches", "3"], "does not divide the batch size 2048"),
        (["--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--learning-rate", "-1e-3"], "--learning-rate must be > 0"),
        (["--total-timesteps", "100"], "smaller than one batch"),
    ],
)
def test_bad_input_exits_before_training(tmp_path, argv, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_continuous.py"), *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-minibatches", "2048"], "minibatches of 1 sample cannot be normalised"),
        (["--gamma", "0"], "--gamma must be in (0, 1]"),
        (["--clip-coef", "0"], "--clip-coef must be > 0"),
        (["--target-kl", "0"], "--target-kl must be > 0"),
        (["--num-envs", "0"], "--num-envs must be >= 1"),
    ],
)
def test_more_bad_arguments_exit_before_training(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ppo_continuous.main(argv)
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "env_id,message",
    [
        ("ImageObs-v0", "this script needs a flat Box (a vector), not images"),
        ("UnboundedAction-v0", "unbounded action space"),
        ("TupleAction-v0", "this script needs a bounded Box"),
    ],
)
def test_unsupported_spaces_exit_before_training(tmp_path, monkeypatch, env_id, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ppo_continuous.main(["--env-id", env_id])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ({"script": "ppo_discrete", "model": {}, "args": {}}, "written by ppo_discrete.py, not ppo_continuous.py"),
        ([1, 2, 3], "written by something else.py, not ppo_continuous.py"),
    ],
)
def test_checkpoint_from_another_script_is_refused(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_continuous.py"), "--eval-checkpoint", str(path)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_nan_loss_stops_with_iteration_and_quantity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def nan_value_loss(new_values, old_values, returns, clip_coef):
        return new_values.mean() * float("nan")

    monkeypatch.setattr(ppo_continuous, "value_loss", nan_value_loss)
    with pytest.raises(SystemExit, match=r"value_loss is nan at iteration 1, minibatch 1 "):
        ppo_continuous.main(TWO_ITERATIONS + ["--save-model"])
    assert not list(tmp_path.glob("runs/*/ppo_continuous.pt"))


def test_wandb_failure_never_stops_training(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    ppo_continuous.main(TWO_ITERATIONS + ["--track"])
    assert "wandb disabled, training goes on: RuntimeError: no network" in capsys.readouterr().out
    assert len(read_metrics(run_dirs(tmp_path)[0])) == 2


@pytest.mark.parametrize(
    "env_id,message",
    [("HalfCheetah-v4", "needs moviepy: pip install moviepy"),
     ("Pendulum-v1", "needs moviepy and pygame: pip install moviepy pygame")],
)
def test_capture_video_without_its_packages_fails_before_training(tmp_path, monkeypatch, env_id, message):
    """MuJoCo renders by itself and needs only moviepy; classic control also needs pygame. Both are made to
    look missing, so the test does not depend on what this machine has installed."""
    monkeypatch.chdir(tmp_path)
    real_find_spec = ppo_continuous.importlib.util.find_spec
    monkeypatch.setattr(
        ppo_continuous.importlib.util, "find_spec",
        lambda name: None if name in ("moviepy", "pygame") else real_find_spec(name),
    )
    with pytest.raises(SystemExit, match=f"--capture-video {message}"):
        ppo_continuous.main(["--env-id", env_id, "--capture-video"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "videos").exists()


def test_agent_sample_draws_from_the_gaussian_policy():
    """The rollout's a ~ pi_old(.|s) = N(actor_mean(s), exp(actor_logstd)^2), unclipped, per state."""
    torch.manual_seed(0)
    agent = ppo_continuous.Agent(3, 2)
    with torch.no_grad():
        agent.actor_mean[-1].weight.mul_(300.0)
        agent.actor_logstd.copy_(torch.tensor([math.log(0.5), math.log(3.0)]))
        obs = torch.randn(1, 3)
        actions = agent.sample(obs.expand(40000, 3))  # [40000, 2]
        mean = agent.actor_mean(obs)[0]
    torch.testing.assert_close(actions.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(actions.std(0), torch.tensor([0.5, 3.0]), atol=0.05, rtol=0)
    assert actions.abs().max() > 3.0  # not clipped to the action bounds
