"""Tests of ppo_penalty.py: the adaptive beta rule, the exact KLs, the gradient at theta_old, the running
normalisation, smoke runs on CartPole-v1 and Pendulum-v1 with checkpoint round trips, time-limit
bootstrapping, determinism, Box envs in subprocesses logging what in-process envs log, bad input and the NaN
stop. Under torchrun: tests/test_distributed.py."""

import copy
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, Normal, kl_divergence

import ppo_penalty
from conftest import ROOT
from ppo_penalty import (
    BETA_MAX,
    BETA_MIN,
    Agent,
    RewardScaler,
    RunningMeanStd,
    categorical_kl,
    categorical_logprob_entropy,
    evaluate,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    kl_penalty_loss,
    update_beta,
)

CARTPOLE_TWO_ITERATIONS = ["--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "128"]
PENDULUM_TWO_ITERATIONS = ["--env-id", "Pendulum-v1", "--total-timesteps", "512", "--num-envs", "2",
                           "--num-steps", "128", "--num-minibatches", "4", "--update-epochs", "2", "--ent-coef", "0"]


def run_dirs(cwd: Path):
    return sorted((cwd / "runs").glob("*")) if (cwd / "runs").exists() else []


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# update_beta
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_target", [0.003, 0.01, 0.02, 0.03])
def test_update_beta_at_and_around_both_thresholds(kl_target):
    upper, lower = kl_target * 1.5, kl_target / 1.5  # computed as update_beta computes them
    beta = 0.8
    # exactly at a threshold: strict inequalities, beta unchanged
    assert update_beta(beta, upper, kl_target) == beta
    assert update_beta(beta, lower, kl_target) == beta
    # one float step past a threshold: the rule fires
    assert update_beta(beta, math.nextafter(upper, math.inf), kl_target) == 2 * beta
    assert update_beta(beta, math.nextafter(lower, 0.0), kl_target) == beta / 2
    # one float step inside the band: unchanged
    assert update_beta(beta, math.nextafter(upper, 0.0), kl_target) == beta
    assert update_beta(beta, math.nextafter(lower, math.inf), kl_target) == beta
    # well inside and well outside
    assert update_beta(beta, kl_target, kl_target) == beta
    assert update_beta(beta, 100 * kl_target, kl_target) == 2 * beta  # doubled once, however far off
    assert update_beta(beta, 0.0, kl_target) == beta / 2


def test_update_beta_docstring_example_and_bounds():
    assert update_beta(1.0, 0.02, 0.01) == 2.0
    assert update_beta(1.0, 0.012, 0.01) == 1.0
    assert update_beta(1.0, 0.005, 0.01) == 0.5
    assert (BETA_MIN, BETA_MAX) == (1e-4, 1e4)
    assert update_beta(BETA_MAX, 1.0, 0.01) == BETA_MAX
    assert update_beta(0.75 * BETA_MAX, 1.0, 0.01) == BETA_MAX  # clamped, not 1.5e4
    assert update_beta(BETA_MIN, 0.0, 0.01) == BETA_MIN
    assert update_beta(1.5 * BETA_MIN, 0.0, 0.01) == BETA_MIN
    beta = 1.0
    for _ in range(2000):  # far more doublings than a float survives without the clamp
        beta = update_beta(beta, 1.0, 0.01)
    assert beta == BETA_MAX
    for _ in range(2000):
        beta = update_beta(beta, 0.0, 0.01)
    assert beta == BETA_MIN
    assert update_beta(3.0, float("nan"), 0.01) == 3.0  # both comparisons False
    assert isinstance(update_beta(1.0, 0.02, 0.01), float)


# ---------------------------------------------------------------------------------------------------------
# exact KLs, Gaussian log-prob and entropy
# ---------------------------------------------------------------------------------------------------------


def random_gaussians(batch=16, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    old_mean, new_mean = torch.randn(2, batch, dim, generator=g, dtype=torch.float64)
    old_log_std, new_log_std = 0.5 * torch.randn(2, batch, dim, generator=g, dtype=torch.float64)
    return old_mean, old_log_std, new_mean, new_log_std


def test_categorical_kl_matches_torch_distributions_and_docstring():
    g = torch.Generator().manual_seed(0)
    old_logits, new_logits = 2 * torch.randn(2, 32, 5, generator=g, dtype=torch.float64)
    expected = kl_divergence(Categorical(logits=old_logits), Categorical(logits=new_logits))
    torch.testing.assert_close(categorical_kl(old_logits, new_logits), expected)
    example = categorical_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]]))
    assert example.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


def test_gaussian_kl_matches_torch_distributions_and_docstring():
    old_mean, old_log_std, new_mean, new_log_std = random_gaussians()
    expected = kl_divergence(Independent(Normal(old_mean, old_log_std.exp()), 1),
                             Independent(Normal(new_mean, new_log_std.exp()), 1))
    torch.testing.assert_close(gaussian_kl(old_mean, old_log_std, new_mean, new_log_std), expected)
    zeros = torch.zeros(1, 4)
    assert gaussian_kl(zeros, zeros, zeros + 1, zeros).item() == pytest.approx(0.5 * 4)


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    old_mean, old_log_std, _, _ = random_gaussians()
    actions = old_mean + torch.randn_like(old_mean)
    dist = Independent(Normal(old_mean, old_log_std.exp()), 1)
    torch.testing.assert_close(gaussian_log_prob(old_mean, old_log_std, actions), dist.log_prob(actions))
    torch.testing.assert_close(gaussian_entropy(old_log_std), dist.entropy())
    # a state-independent log-std [D] broadcasts over the batch
    log_std = old_log_std[0]
    torch.testing.assert_close(gaussian_log_prob(old_mean, log_std, actions),
                               Independent(Normal(old_mean, log_std.exp()), 1).log_prob(actions))
    example = gaussian_log_prob(torch.zeros(1, 2), torch.zeros(2), torch.zeros(1, 2))
    assert example.item() == pytest.approx(-1.8379, abs=1e-4)


def within_4_standard_errors(samples: torch.Tensor, exact: torch.Tensor):
    """Monte-Carlo means over dim 0 of `samples` [n, B] within 4 standard errors of `exact` [B]."""
    estimate = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    assert torch.all((estimate - exact).abs() < 4 * standard_error), (estimate, exact, standard_error)


def test_categorical_kl_matches_monte_carlo_estimate():
    g = torch.Generator().manual_seed(2)
    old_logits = torch.randn(4, 6, generator=g, dtype=torch.float64)
    new_logits = old_logits + 0.7 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    n = 50_000
    actions = torch.multinomial(old_logits.softmax(-1), n, replacement=True, generator=g).T  # [n, 4], a ~ pi_old
    old_lp = categorical_logprob_entropy(old_logits.expand(n, 4, 6).reshape(-1, 6), actions.reshape(-1))[0]
    new_lp = categorical_logprob_entropy(new_logits.expand(n, 4, 6).reshape(-1, 6), actions.reshape(-1))[0]
    log_ratio = (old_lp - new_lp).reshape(n, 4)  # log pi_old / pi_new: its mean under pi_old is the KL
    within_4_standard_errors(log_ratio, categorical_kl(old_logits, new_logits))


def test_gaussian_kl_matches_monte_carlo_estimate():
    old_mean, old_log_std, new_mean, new_log_std = random_gaussians(batch=4)
    g = torch.Generator().manual_seed(3)
    n = 50_000
    actions = old_mean + old_log_std.exp() * torch.randn(n, *old_mean.shape, generator=g, dtype=torch.float64)
    log_ratio = gaussian_log_prob(old_mean, old_log_std, actions) - gaussian_log_prob(new_mean, new_log_std, actions)
    within_4_standard_errors(log_ratio, gaussian_kl(old_mean, old_log_std, new_mean, new_log_std))


def test_kl_of_a_distribution_with_itself_is_zero_with_zero_gradient():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64)
    new_logits = logits.clone().requires_grad_()
    kl = categorical_kl(logits, new_logits)
    assert torch.all(kl.abs() < 1e-12)
    (grad,) = torch.autograd.grad(kl.sum(), new_logits)
    assert grad.abs().max().item() < 1e-12

    mean, log_std, _, _ = random_gaussians(batch=8)
    new_mean, new_log_std = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    kl = gaussian_kl(mean, log_std, new_mean, new_log_std)
    assert torch.all(kl.abs() < 1e-12)
    grads = torch.autograd.grad(kl.sum(), (new_mean, new_log_std))
    assert max(grad.abs().max().item() for grad in grads) < 1e-12


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
def test_gradient_of_l_kl_at_theta_old_is_the_policy_gradient(discrete):
    """At theta = theta_old the penalty and its gradient vanish, whatever beta: grad L^KL = grad mean(r A),
    and grad r = grad log pi at r = 1, so it is the plain policy gradient mean(A grad log pi)."""
    torch.manual_seed(0)
    agent = Agent(obs_dim=4, act_dim=3, discrete=discrete).double()
    with torch.no_grad():  # move the log-std off its initial 0 so the Gaussian case is not special
        for p in agent.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obs = torch.randn(64, 4, dtype=torch.float64)
    advantages = torch.randn(64, dtype=torch.float64)
    with torch.no_grad():
        old_params = agent.dist_params(obs)
        actions = agent.sample(obs)
        old_logprob = agent.logprob_entropy(old_params, actions)[0]

    params = list(agent.actor.parameters()) + ([] if discrete else [agent.actor_logstd])
    new_params = agent.dist_params(obs)
    new_logprob = agent.logprob_entropy(new_params, actions)[0]
    loss, surrogate, penalty = kl_penalty_loss(new_logprob, old_logprob, advantages, agent.kl(old_params, new_params),
                                               beta=100.0)
    assert penalty.item() == pytest.approx(0.0, abs=1e-12)
    assert surrogate.item() == pytest.approx(advantages.mean().item())
    grad_kl = torch.autograd.grad(loss, params)
    grad_pg = torch.autograd.grad(-(advantages * agent.logprob_entropy(agent.dist_params(obs), actions)[0]).mean(),
                                  params)
    for a, b in zip(grad_kl, grad_pg):
        torch.testing.assert_close(a, b)
    assert max(g.abs().max().item() for g in grad_pg) > 1e-3  # not a vacuous 0 == 0


def test_kl_penalty_loss_values_and_no_ratio_clipping():
    new = torch.tensor([math.log(1.5)], dtype=torch.float64)
    loss, surrogate, penalty = kl_penalty_loss(new, torch.zeros(1, dtype=torch.float64),
                                               torch.tensor([2.0], dtype=torch.float64),
                                               torch.tensor([0.1], dtype=torch.float64), 4.0)
    assert (loss.item(), surrogate.item(), penalty.item()) == pytest.approx((-2.6, 3.0, 0.4))
    # ratios far outside PPO-Clip's band keep the full importance-sampling gradient -r A / B
    ratios = torch.tensor([3.0, 0.2, 1.5, 0.5], dtype=torch.float64)
    advs = torch.tensor([2.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    new = ratios.log().requires_grad_()
    zeros = torch.zeros(4, dtype=torch.float64)
    loss, _, _ = kl_penalty_loss(new, zeros, advs, zeros, 1.0)
    (grad,) = torch.autograd.grad(loss, new)
    torch.testing.assert_close(grad, -(ratios * advs) / 4)
    assert not hasattr(ppo_penalty, "ppo_clip_loss")


# ---------------------------------------------------------------------------------------------------------
# RunningMeanStd, RewardScaler
# ---------------------------------------------------------------------------------------------------------


def test_running_mean_std_matches_whole_data_and_round_trips():
    g = torch.Generator().manual_seed(5)
    # float64, as main() passes the observations (the statistics are kept in float64)
    data = 3.0 + 2.0 * torch.randn(1000, 3, generator=g, dtype=torch.float64)
    rms = RunningMeanStd((3,), torch.device("cpu"))
    for chunk in data.split(37):  # uneven chunks, as env steps and reset batches come
        rms.update(chunk)
    # the count starts at 0: the statistics are exactly those of the data
    torch.testing.assert_close(rms.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms.var, data.var(0, correction=0), rtol=1e-12, atol=1e-12)
    assert rms.count == 1000
    normalised = rms.normalize(data)
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(0, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    copy = RunningMeanStd((3,), torch.device("cpu"))
    copy.load_state_dict(rms.state_dict())
    torch.testing.assert_close(copy.normalize(data), normalised, rtol=0, atol=0)
    # clipped to +-10 (cleanrl's and Stable-Baselines3's value)
    far = torch.tensor([[1e3, -1e3, 3.0]])
    assert copy.normalize(far)[0, :2].tolist() == [10.0, -10.0]
    docstring = RunningMeanStd((1,), torch.device("cpu"))
    docstring.update(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    docstring.update(torch.tensor([[5.0]], dtype=torch.float64))
    assert (docstring.mean.item(), docstring.var.item(), docstring.count) == pytest.approx((3.0, 8 / 3, 3), rel=1e-12)


def test_reward_scaler_docstring_example_sign_and_clip():
    cpu = torch.device("cpu")
    scaler = RewardScaler(1, 0.5, cpu)  # rewards 2, 2 -> returns 2, 3 -> std 0.5 -> second reward 4
    scaled = scaler(torch.tensor([[2.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
    assert scaled[1].item() == pytest.approx(4.0, rel=1e-6)
    # divided by the std of the return (of the rewards of both envs here: 1.5, -1.5), never shifted: sign kept
    scaler = RewardScaler(2, 0.99, cpu)
    torch.testing.assert_close(scaler(torch.tensor([[1.5, -1.5]], dtype=torch.float64), torch.tensor([[1.0, 0.0]])),
                               torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert scaler.returns.tolist() == [0.0, -1.5]  # env 0's episode ended: its return restarts at 0
    # clipped to +-10, sign kept: the first return of a fresh scaler has std 0, the divisor is sqrt(1e-8)
    for reward, clipped in ((3.0, 10.0), (-3.0, -10.0)):
        fresh = RewardScaler(1, 0.99, cpu)
        assert fresh(torch.tensor([[reward]], dtype=torch.float64), torch.zeros(1, 1)).item() == clipped


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------

LOGGED = ("approx_kl_k1", "approx_kl_k3", "kl_exact", "beta", "kl_target", "kl_penalty", "surrogate", "clipfrac",
          "entropy", "explained_variance", "policy_loss", "value_loss", "loss", "learning_rate", "sps",
          "episodic_return", "episodic_length", "episodic_return_100", "time", "global_step", "iteration",
          "update_minibatches")


def check_beta_schedule(metrics, init_beta=1.0, kl_target=0.01):
    assert metrics[0]["beta"] == init_beta
    for before, after in zip(metrics, metrics[1:]):
        assert after["beta"] == update_beta(before["beta"], before["kl_exact"], kl_target)
    for m in metrics:
        assert m["kl_target"] == kl_target
        assert m["kl_exact"] >= 0.0 and m["approx_kl_k3"] >= 0.0
        # penalty = beta * mean KL over the update's minibatches; policy_loss = penalty - surrogate
        assert m["policy_loss"] == pytest.approx(m["kl_penalty"] - m["surrogate"], abs=1e-6)


def test_smoke_cartpole_train_save_and_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = ppo_penalty.main(CARTPOLE_TWO_ITERATIONS + ["--save-model", "--eval-episodes", "2"])
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [1, 2]
    for key in LOGGED:
        assert key in metrics[-1], key
    assert metrics[-1]["global_step"] == 1024
    assert metrics[0]["learning_rate"] == pytest.approx(2.5e-4)
    assert metrics[1]["learning_rate"] == pytest.approx(2.5e-4 / 2)  # linear annealing over 2 iterations
    assert metrics[0]["update_minibatches"] == 16  # 4 epochs x 4 minibatches
    check_beta_schedule(metrics)

    checkpoint_path = run_dir / "ppo_penalty.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["script"] == "ppo_penalty"
    assert checkpoint["args"]["env_id"] == "CartPole-v1"
    assert checkpoint["beta"] == summary["beta"] == update_beta(metrics[1]["beta"], metrics[1]["kl_exact"], 0.01)
    assert checkpoint["obs_rms"] is None  # no normalisation for Discrete envs
    assert "eval_return_mean" in summary

    result = ppo_penalty.main(["--eval-checkpoint", str(checkpoint_path), "--eval-episodes", "3"])
    assert len(result["eval_returns"]) == 3
    assert "eval CartPole-v1: return" in capsys.readouterr().out


def test_smoke_pendulum_train_save_and_evaluate_with_frozen_stats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = ppo_penalty.main(PENDULUM_TWO_ITERATIONS + ["--save-model", "--eval-episodes", "1",
                                                          "--init-beta", "0.5", "--kl-target", "0.02"])
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [1, 2]
    for key in LOGGED:
        assert key in metrics[-1], key
    assert metrics[0]["episodic_return"] is None  # Pendulum episodes are 200 steps
    assert metrics[1]["episodes"] == 2 and metrics[1]["episodic_length"] == 200
    assert metrics[0]["update_minibatches"] == 8
    check_beta_schedule(metrics, init_beta=0.5, kl_target=0.02)

    checkpoint = torch.load(run_dir / "ppo_penalty.pt", weights_only=True)
    assert checkpoint["model"]["actor_logstd"].shape == (1,)
    obs_rms, return_rms = checkpoint["obs_rms"], checkpoint["return_rms"]
    assert obs_rms["mean"].shape == (3,) and return_rms["var"].shape == ()
    # updated with the reset batch, every step's observations and the final observations of the 2 episodes
    # that ended (at step 200): 2 + 512 + 2, exactly (the count starts at 0)
    assert obs_rms["count"].item() == 516
    assert return_rms["count"].item() == 512  # one discounted return per env step

    def no_update(self, batch):
        raise AssertionError("evaluation must not update the normalisation statistics")

    monkeypatch.setattr(RunningMeanStd, "update", no_update)
    first = ppo_penalty.main(["--eval-checkpoint", str(run_dir / "ppo_penalty.pt"), "--eval-episodes", "1"])
    second = ppo_penalty.main(["--eval-checkpoint", str(run_dir / "ppo_penalty.pt"), "--eval-episodes", "1"])
    np.testing.assert_array_equal(first["eval_returns"], second["eval_returns"])
    assert first["eval_returns"][0] == pytest.approx(summary["eval_return_mean"])


@pytest.mark.parametrize("argv", [CARTPOLE_TWO_ITERATIONS, PENDULUM_TWO_ITERATIONS], ids=["cartpole", "pendulum"])
def test_same_seed_same_metrics(tmp_path, monkeypatch, argv):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        ppo_penalty.main(argv)
        runs.append(read_metrics(run_dirs(tmp_path / name)[0]))
    for first, second in zip(*runs):
        for key in ("time", "sps"):
            first.pop(key), second.pop(key)
        assert first == second


HOPPER_TWO_ITERATIONS = ["--env-id", "Hopper-v4", "--total-timesteps", "512", "--num-envs", "2", "--num-steps", "128",
                         "--num-minibatches", "4", "--update-epochs", "2", "--ent-coef", "0"]


@pytest.mark.parametrize("argv", [PENDULUM_TWO_ITERATIONS, HOPPER_TWO_ITERATIONS], ids=["pendulum", "hopper"])
def test_box_envs_in_subprocesses_log_what_envs_in_this_process_log(tmp_path, monkeypatch, argv):
    """Two Box envs step in subprocesses (AsyncVectorEnv); for the same seed every logged metric equals that of
    the same run with the envs stepped in this process (SameStepVectorEnv). Pendulum's episodes end by the time
    limit, Hopper's (mostly) by termination. Discrete envs always step in this process."""
    made, runs = [], []
    make_envs = ppo_penalty.make_envs

    def in_subprocesses(args, run_name, discrete):
        made.append(make_envs(args, run_name, discrete))
        return made[-1]

    def in_this_process(args, run_name, discrete):
        made.append(ppo_penalty.SameStepVectorEnv([lambda: gym.make(args.env_id)] * args.num_envs))
        return made[-1]

    for name, make in (("subprocesses", in_subprocesses), ("this_process", in_this_process)):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        monkeypatch.setattr(ppo_penalty, "make_envs", make)
        ppo_penalty.main(argv)
        runs.append(read_metrics(run_dirs(tmp_path / name)[0]))
    assert isinstance(made[0].unwrapped, gym.vector.AsyncVectorEnv)
    assert isinstance(made[1], ppo_penalty.SameStepVectorEnv)
    assert len(runs[0]) == 2 and sum(m["episodes"] for m in runs[0]) >= 2
    for first, second in zip(*runs):
        for key in ("time", "sps"):
            first.pop(key), second.pop(key)
        assert first == second
    cartpole = make_envs(ppo_penalty.Args(num_envs=4), None, discrete=True)
    assert isinstance(cartpole, ppo_penalty.SameStepVectorEnv)
    cartpole.close()


class CountingEnv(gym.Env):
    """Observation = steps taken / 10, reward 1 every step, episodes end by a 4-step time limit (registered
    below) unless terminate_at <= 4. Discrete or Box actions; the action is ignored."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, terminate_at=None, box=False):
        self.terminate_at, self.t = terminate_at, 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32) if box else gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        assert not isinstance(self.action_space, gym.spaces.Box) or np.all(np.abs(action) <= 1.0)  # clipped
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([self.t / 10], np.float32), 1.0, terminated, False, {}


gym.register("PenaltyCountingTruncated-v0", entry_point=CountingEnv, max_episode_steps=4)
gym.register("PenaltyCountingTerminated-v0", entry_point=lambda: CountingEnv(terminate_at=4), max_episode_steps=10)
gym.register("PenaltyCountingBoxTruncated-v0", entry_point=lambda: CountingEnv(box=True), max_episode_steps=4)


def spy_first_gae(monkeypatch):
    """Patch Agent and compute_gae; `seen` gets (rewards, dones, agent) of iteration 1, with a copy of the
    agent as it was then (before its first update, so with the critic that computed the bootstrap)."""
    agents, seen = [], []

    class SpyAgent(ppo_penalty.Agent):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            agents.append(self)

    def spy_gae(rewards, values, dones, last_value, gamma, gae_lambda):
        if not seen:
            seen.append((rewards.clone(), dones.clone(), copy.deepcopy(agents[0])))
        return original_gae(rewards, values, dones, last_value, gamma, gae_lambda)

    original_gae = ppo_penalty.compute_gae
    monkeypatch.setattr(ppo_penalty, "Agent", SpyAgent)
    monkeypatch.setattr(ppo_penalty, "compute_gae", spy_gae)
    return seen


COUNTING_RUN = ["--total-timesteps", "32", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2"]


@pytest.mark.parametrize("env_id,bootstrapped", [("PenaltyCountingTruncated-v0", True),
                                                  ("PenaltyCountingTerminated-v0", False)])
def test_time_limit_is_bootstrapped_and_termination_is_not(tmp_path, monkeypatch, env_id, bootstrapped):
    """Every 4th transition ends an episode. At a time limit the reward GAE sees is 1 + gamma * V(s_final)
    with s_final = [0.4], the real last observation (not the reset one); at a termination it stays 1."""
    monkeypatch.chdir(tmp_path)
    seen = spy_first_gae(monkeypatch)
    ppo_penalty.main(["--env-id", env_id, *COUNTING_RUN])
    rewards, dones, agent = seen[0]
    with torch.no_grad():
        bootstrap = 0.99 * agent.value(torch.tensor([[0.4]])).item()
    ends = torch.zeros(16, 2)
    ends[3::4] = 1.0
    torch.testing.assert_close(dones, ends)
    torch.testing.assert_close(rewards, torch.ones(16, 2) + (bootstrap * ends if bootstrapped else 0.0))
    assert abs(bootstrap) > 1e-3  # the check above would be vacuous if V(s_final) were 0


def test_box_env_scales_rewards_and_bootstraps_on_the_normalised_scale(tmp_path, monkeypatch):
    """Box actions: GAE sees reward / std(discounted return) (per-env accumulator, reset at episode ends), and
    at a time limit + gamma * V(normalised s_final). Replayed here with the script's own RunningMeanStd and
    RewardScaler: the observations are 0.1, 0.2, 0.3, then s_final = 0.4 and the reset 0 both enter the
    statistics, and s_final is normalised with the statistics of that step."""
    monkeypatch.chdir(tmp_path)
    seen = spy_first_gae(monkeypatch)
    ppo_penalty.main(["--env-id", "PenaltyCountingBoxTruncated-v0", *COUNTING_RUN])
    rewards, dones, agent = seen[0]
    gamma, cpu = 0.99, torch.device("cpu")
    obs_rms, scaler = RunningMeanStd((1,), cpu), RewardScaler(2, gamma, cpu)
    obs_rms.update(torch.zeros(2, 1, dtype=torch.float64))  # the reset observations
    expected = torch.zeros(16, 2)
    for t in range(16):
        end = torch.full((2,), float(t % 4 == 3))
        expected[t] = scaler(torch.ones(1, 2, dtype=torch.float64), end[None])[0]  # the first ones hit the clip at 10
        next_obs = 0.0 if t % 4 == 3 else (t % 4 + 1) / 10
        if t % 4 == 3:  # the final observations count too, before the reset ones
            obs_rms.update(torch.full((2, 1), 0.4, dtype=torch.float64))
        obs_rms.update(torch.full((2, 1), next_obs, dtype=torch.float64))
        if t % 4 == 3:
            final = obs_rms.normalize(torch.tensor([[0.4]], dtype=torch.float64))
            with torch.no_grad():
                expected[t] += gamma * agent.value(final).item()
    ends = torch.zeros(16, 2)
    ends[3::4] = 1.0
    torch.testing.assert_close(dones, ends)
    torch.testing.assert_close(rewards, expected)
    assert not torch.allclose(rewards, torch.ones(16, 2))  # rewards really were scaled


def test_check_env_refuses_unsupported_action_spaces():
    assert ppo_penalty.check_env("CartPole-v1") == (4, 2, True)
    assert ppo_penalty.check_env("Pendulum-v1") == (3, 1, False)

    class UnboundedEnv(CountingEnv):
        def __init__(self):
            super().__init__()
            self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    class MultiDiscreteEnv(CountingEnv):
        def __init__(self):
            super().__init__()
            self.action_space = gym.spaces.MultiDiscrete([2, 3])

    gym.register("PenaltyUnbounded-v0", entry_point=UnboundedEnv)
    gym.register("PenaltyMultiDiscrete-v0", entry_point=MultiDiscreteEnv)
    with pytest.raises(ValueError, match="unbounded Box action space"):
        ppo_penalty.check_env("PenaltyUnbounded-v0")
    with pytest.raises(ValueError, match="MultiDiscrete action space .* needs Discrete or a 1-D Box"):
        ppo_penalty.check_env("PenaltyMultiDiscrete-v0")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
        (["--num-minibatches", "3"], "does not divide the batch size 512"),
        (["--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--kl-target", "0"], "--kl-target must be > 0"),
    ],
)
def test_bad_input_exits_before_training(tmp_path, argv, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_penalty.py"), *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,message", [
    (["--init-beta", "0"], "--init-beta must be in [0.0001, 10000], got 0.0"),
    (["--init-beta", "2e4"], "--init-beta must be in [0.0001, 10000], got 20000.0"),
    (["--kl-target", "-0.01"], "--kl-target must be > 0, got -0.01"),
    (["--env-id", "MountainCarContinuous-v0", "--num-envs", "0"], "--num-envs must be >= 1, got 0"),
    (["--num-envs", "1", "--num-steps", "4", "--num-minibatches", "4"],
     "minibatches of 1 sample cannot be normalised (--norm-adv): use fewer --num-minibatches"),
])
def test_more_bad_input_in_process(tmp_path, monkeypatch, argv, message):
    """The same path as the subprocess tests above (SystemExit before any folder), without a new interpreter."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ppo_penalty.main(argv)
    assert str(exit_info.value) == f"error: {message}"
    assert not (tmp_path / "runs").exists()


def test_checkpoint_from_another_script_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"script": "ppo_discrete", "model": {}, "args": {}}, path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "ppo_penalty.py"), "--eval-checkpoint", str(path)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "written by ppo_discrete.py, not ppo_penalty.py" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_nan_loss_stops_with_iteration_and_quantity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def nan_value_loss(new_values, old_values, returns, clip_coef):
        return new_values.mean() * float("nan")

    monkeypatch.setattr(ppo_penalty, "value_loss", nan_value_loss)
    with pytest.raises(SystemExit, match=r"value_loss is nan at iteration 1, minibatch 1 "):
        ppo_penalty.main(CARTPOLE_TWO_ITERATIONS + ["--save-model"])
    assert not list(tmp_path.glob("runs/*/ppo_penalty.pt"))


def test_nan_kl_stops_with_iteration_and_quantity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def nan_on_the_whole_batch(old_logits, new_logits):
        kl = categorical_kl(old_logits, new_logits)
        return kl * float("nan") if len(old_logits) == 512 else kl  # only the post-update measurement

    monkeypatch.setattr(ppo_penalty, "categorical_kl", nan_on_the_whole_batch)
    with pytest.raises(SystemExit, match=r"kl_exact is nan at iteration 1, after the update"):
        ppo_penalty.main(CARTPOLE_TWO_ITERATIONS + ["--save-model"])
    assert not list(tmp_path.glob("runs/*/ppo_penalty.pt"))


def test_wandb_failure_never_stops_training(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    ppo_penalty.main(CARTPOLE_TWO_ITERATIONS + ["--track"])
    assert "wandb disabled, training goes on: RuntimeError: no network" in capsys.readouterr().out
    assert len(read_metrics(run_dirs(tmp_path)[0])) == 2


def test_plot_beta_draws_the_adaptive_kl_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    ppo_penalty.main(CARTPOLE_TWO_ITERATIONS)
    (run_dir,) = run_dirs(tmp_path)
    out = tmp_path / "beta.png"
    monkeypatch.setattr(sys, "argv", ["plot_beta.py", str(run_dir / "metrics.jsonl"), "--out", str(out), "--with-k3"])
    runpy.run_path(str(ROOT / "benchmarks" / "plot_beta.py"), run_name="__main__")
    assert out.stat().st_size > 1000


class Float64Env(gym.Env):
    """float64 observations near 1e6 whose fractions float32 cannot hold; episodes end by a 3-step time limit."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([1e6 + 0.1, -3.3]), {}

    def step(self, action):
        self.t += 1
        return np.array([1e6 + 0.1 + 0.01 * self.t, -3.3]), 0.0, False, False, {}


gym.register("PenaltyFloat64-v0", entry_point=Float64Env, max_episode_steps=3)


def test_evaluation_normalises_observations_as_training_does(monkeypatch):
    """Training hands the env's float64 observation to the normaliser; evaluation must too (it once cast to
    float32 first, so an agent was evaluated on inputs it never saw: here 0.125 instead of 0.1 past 1e6)."""
    agent = Agent(obs_dim=2, act_dim=1, discrete=False)
    obs_rms = RunningMeanStd((2,), torch.device("cpu"))
    obs_rms.load_state_dict({"mean": torch.tensor([1e6, 0.0], dtype=torch.float64),
                             "var": torch.tensor([0.01, 1.0], dtype=torch.float64),
                             "count": torch.tensor(10.0, dtype=torch.float64)})
    checkpoint = {"script": "ppo_penalty", "model": agent.state_dict(), "args": {"env_id": "PenaltyFloat64-v0"},
                  "obs_rms": obs_rms.state_dict()}
    seen = []
    real_dist_params = Agent.dist_params

    def dist_params(self, obs):
        seen.append(obs.clone())
        return real_dist_params(self, obs)

    monkeypatch.setattr(Agent, "dist_params", dist_params)
    evaluate(checkpoint, episodes=1, seed=0, device=torch.device("cpu"))
    expected = [obs_rms.normalize(np.array([[1e6 + 0.1 + 0.01 * t, -3.3]])) for t in range(3)]
    assert len(seen) == 3
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
