"""Numerical tests of the functions every script carries a copy of (the contract).

Each test runs once per script that defines the function, so the copies stay identical in behaviour.
"""

import inspect
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import load_scripts, scripts_defining


# Definitions every script that has them carries word for word: a reader who pastes one from any script gets
# the same code, and a fix made in one place cannot silently stay there.
SHARED_DEFINITIONS = [
    "compute_gae", "normalize_advantages", "ppo_clip_loss", "approx_kl", "value_loss", "explained_variance",
    "categorical_logprob_entropy", "sample_categorical", "gaussian_log_prob", "gaussian_entropy", "categorical_kl",
    "gaussian_kl", "layer_init", "RunningMeanStd", "RewardScaler", "compute_array", "SameStepVectorEnv",
    "pick_device", "load_checkpoint", "make_run_dir", "write_json", "budget_line", "StopSignal",
    "setup_distributed", "mean_over_ranks", "gather_over_ranks", "normalize_advantages_over_ranks", "average_gradients",
    "any_rank", "gather_episodes", "teardown_distributed", "merge_statistics_over_ranks", "ignore_stop_signals",
    "cpu_weights", "load_resume", "save_checkpoint", "keep_metrics_until", "rng_state",
    "set_rng_state", "generator_state", "set_generator_state", "env_state", "find_time_limit", "restore_env_state", "vector_env_state",
    "restore_vector_env_state", "gather_objects", "ResumableEnv", "ResumableEpisodeStatistics",
    "render_offscreen_if_headless",
]


@pytest.mark.parametrize("name", SHARED_DEFINITIONS)
def test_shared_definitions_are_the_same_text_in_every_script(name):
    texts = {}
    for module in load_scripts():
        if hasattr(module, name):
            texts.setdefault(inspect.getsource(getattr(module, name)), []).append(module.__name__)
    assert len(texts) >= 1
    assert len(texts) == 1, f"{name} differs between {list(texts.values())}"


# ---------------------------------------------------------------------------------------------------------
# compute_gae
# ---------------------------------------------------------------------------------------------------------


def reference_gae(rewards, values, dones, last_value, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k}, the sum written out term by term and cut at the end of the
    episode (the first done at or after t) or at the end of the rollout. Plain Python floats."""
    T, N = rewards.shape
    advantages = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                next_value = last_value[n] if k == T - 1 else values[k + 1, n]
                delta = rewards[k, n] + gamma * next_value * (1.0 - dones[k, n]) - values[k, n]
                total += weight * delta
                if dones[k, n]:
                    break
                weight *= gamma * lam
            advantages[t, n] = total
    return advantages


def random_rollout(T=20, N=3, seed=0, done_prob=0.15):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = (torch.rand(T, N, generator=g) < done_prob).double()
    dones[5, 0] = 1.0  # at least one episode end inside the rollout
    last_value = torch.randn(N, generator=g, dtype=torch.float64)
    return rewards, values, dones, last_value


@pytest.mark.parametrize("compute_gae", scripts_defining("compute_gae"))
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.97, 1.0), (1.0, 0.5)])
def test_gae_matches_written_out_sum(compute_gae, gamma, lam):
    rewards, values, dones, last_value = random_rollout()
    advantages, returns = compute_gae(rewards, values, dones, last_value, gamma, lam)
    expected = reference_gae(rewards.numpy(), values.numpy(), dones.numpy(), last_value.numpy(), gamma, lam)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(returns.numpy(), expected + values.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("compute_gae", scripts_defining("compute_gae"))
def test_gae_lambda_zero_is_td0(compute_gae):
    rewards, values, dones, last_value = random_rollout()
    gamma = 0.9
    advantages, _ = compute_gae(rewards, values, dones, last_value, gamma, 0.0)
    next_values = torch.cat([values[1:], last_value[None]])
    td0 = rewards + gamma * next_values * (1 - dones) - values
    torch.testing.assert_close(advantages, td0)


@pytest.mark.parametrize("compute_gae", scripts_defining("compute_gae"))
def test_gae_lambda_one_gives_monte_carlo_returns(compute_gae):
    rewards, values, dones, last_value = random_rollout()
    gamma = 0.95
    _, returns = compute_gae(rewards, values, dones, last_value, gamma, 1.0)
    T, N = rewards.shape
    for n in range(N):
        for t in range(T):
            # discounted reward sum to the episode end, or to the rollout end plus the bootstrap value
            mc, discount = 0.0, 1.0
            for k in range(t, T):
                mc += discount * rewards[k, n].item()
                discount *= gamma
                if dones[k, n]:
                    break
            else:
                mc += discount * last_value[n].item()
            assert returns[t, n].item() == pytest.approx(mc, abs=1e-9)


@pytest.mark.parametrize("compute_gae", scripts_defining("compute_gae"))
def test_gae_nothing_leaks_across_done(compute_gae):
    rewards, values, dones, last_value = random_rollout()
    dones[:, 1] = 0.0
    dones[7, 1] = 1.0  # env 1: one episode ends with transition 7
    before, _ = compute_gae(rewards, values, dones, last_value, 0.99, 0.95)
    rewards[8:, 1] += 100.0  # anything after the boundary...
    values[8:, 1] -= 50.0
    last_value[1] += 1000.0
    after, _ = compute_gae(rewards, values, dones, last_value, 0.99, 0.95)
    torch.testing.assert_close(after[:8, 1], before[:8, 1])  # ...does not reach the episode before it
    assert not torch.allclose(after[8:, 1], before[8:, 1])


@pytest.mark.parametrize("compute_gae", scripts_defining("compute_gae"))
def test_gae_docstring_example(compute_gae):
    advantages, returns = compute_gae(
        torch.ones(3, 1), torch.zeros(3, 1), torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([2.0]), 0.5, 1.0
    )
    torch.testing.assert_close(advantages, torch.tensor([[1.5], [1.0], [2.0]]))
    torch.testing.assert_close(returns, advantages)


# ---------------------------------------------------------------------------------------------------------
# ppo_clip_loss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ppo_clip_loss", scripts_defining("ppo_clip_loss"))
@pytest.mark.parametrize(
    "ratio,advantage,expected",
    [
        (1.5, 2.0, -2.4),  # A > 0, r past 1+eps: capped at (1+eps) A
        (0.5, 2.0, -1.0),  # A > 0, r below 1-eps: min keeps the smaller r A
        (0.5, -1.0, 0.8),  # A < 0, r below 1-eps: capped at (1-eps) A
        (1.5, -1.0, 1.5),  # A < 0, r past 1+eps: min keeps the more negative r A
        (1.1, 3.0, -3.3),  # inside the band: plain r A
    ],
)
def test_clip_loss_values(ppo_clip_loss, ratio, advantage, expected):
    new = torch.tensor([math.log(ratio)], dtype=torch.float64)
    loss, _ = ppo_clip_loss(new, torch.zeros(1, dtype=torch.float64), torch.tensor([advantage], dtype=torch.float64), 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ppo_clip_loss", scripts_defining("ppo_clip_loss"))
def test_clip_loss_gradient_zero_exactly_where_clipped(ppo_clip_loss):
    eps = 0.2
    ratios = torch.tensor([1.5, 1.3, 0.5, 0.7, 0.5, 1.5, 1.1, 0.9, 1.05, 0.95], dtype=torch.float64)
    advs = torch.tensor([2.0, 1.0, -1.0, -2.0, 2.0, -1.0, 1.0, -1.0, -3.0, 0.5], dtype=torch.float64)
    new = ratios.log().requires_grad_()
    old = torch.zeros_like(new)
    loss, clipfrac = ppo_clip_loss(new, old, advs, eps)
    (grad,) = torch.autograd.grad(loss, new)
    unclipped_grad = -(ratios * advs) / len(ratios)  # d/d(new_logprob) of -mean(r A), r = exp(new - old)
    clipped = ((advs > 0) & (ratios > 1 + eps)) | ((advs < 0) & (ratios < 1 - eps))
    assert clipped.tolist() == [True, True, True, True, False, False, False, False, False, False]
    assert torch.all(grad[clipped] == 0.0)  # exactly zero, as the article says
    torch.testing.assert_close(grad[~clipped], unclipped_grad[~clipped])
    assert clipfrac.item() == pytest.approx(6 / 10)  # |r - 1| > eps for the first six


@pytest.mark.parametrize("ppo_clip_loss", scripts_defining("ppo_clip_loss"))
def test_clip_loss_at_old_policy_is_policy_gradient(ppo_clip_loss):
    torch.manual_seed(0)
    old = torch.randn(64, dtype=torch.float64)
    new = old.clone().requires_grad_()
    advs = torch.randn(64, dtype=torch.float64)
    loss, clipfrac = ppo_clip_loss(new, old, advs, 0.2)
    (grad,) = torch.autograd.grad(loss, new)
    assert loss.item() == pytest.approx(-advs.mean().item())
    torch.testing.assert_close(grad, -advs / 64)
    assert clipfrac.item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# approx_kl
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approx_kl", scripts_defining("approx_kl"))
def test_k3_nonnegative_per_sample_and_k1_can_be_negative(approx_kl):
    torch.manual_seed(0)
    logratios = torch.randn(500, dtype=torch.float64) * 2
    per_sample = [approx_kl(lr.reshape(1), torch.zeros(1, dtype=torch.float64)) for lr in logratios]
    assert all(k3.item() >= 0.0 for _, k3 in per_sample)
    assert any(k1.item() < 0.0 for k1, _ in per_sample)
    k1, k3 = approx_kl(torch.zeros(5), torch.zeros(5))
    assert k1.item() == 0.0 and k3.item() == 0.0


@pytest.mark.parametrize("approx_kl", scripts_defining("approx_kl"))
def test_kl_estimators_unbiased_for_categoricals(approx_kl):
    """Actions drawn from pi_old; both estimators' means match the exact KL(pi_old || pi_new) within 4
    standard errors of the Monte-Carlo mean (n = 200k samples)."""
    g = torch.Generator().manual_seed(1)
    p_old = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    p_new = torch.softmax(torch.log(p_old) + 0.5 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p_old * (p_old.log() - p_new.log())).sum().item()
    actions = torch.multinomial(p_old, 200_000, replacement=True, generator=g)
    old_lp, new_lp = p_old.log()[actions], p_new.log()[actions]
    k1, k3 = approx_kl(new_lp, old_lp)
    logratio = new_lp - old_lp
    for estimate, samples in ((k1, -logratio), (k3, logratio.exp() - 1 - logratio)):
        standard_error = samples.std().item() / math.sqrt(len(samples))
        assert abs(estimate.item() - exact) < 4 * standard_error, (estimate.item(), exact, standard_error)
    assert exact > 0.01  # the two policies really differ


# ---------------------------------------------------------------------------------------------------------
# value_loss, explained_variance
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_loss", scripts_defining("value_loss"))
def test_value_loss_plain_and_clipped(value_loss):
    new = torch.tensor([1.0, 0.0, 2.0])
    old = torch.tensor([0.0, 0.0, 2.5])
    returns = torch.tensor([2.0, 1.0, 2.0])
    # plain: 0.5 * mean((1-2)^2, (0-1)^2, 0) = 0.5 * 2/3
    assert value_loss(new, old, returns, None).item() == pytest.approx(1 / 3)
    # clipped at 0.2: V_clip = [0.2, 0.0, 2.3]; max(unclipped, clipped) = [max(1, 3.24), 1, max(0, 0.09)]
    assert value_loss(new, old, returns, 0.2).item() == pytest.approx(0.5 * (3.24 + 1.0 + 0.09) / 3)


@pytest.mark.parametrize("explained_variance", scripts_defining("explained_variance"))
def test_explained_variance_cases(explained_variance):
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(y, 2.5), y).item() == pytest.approx(0.0)
    assert explained_variance(-y, y).item() < 0.0
    # a constant offset leaves nothing unexplained in the variance
    assert explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(y, torch.full_like(y, 7.0)).item())


# ---------------------------------------------------------------------------------------------------------
# categorical policy helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("categorical_logprob_entropy", scripts_defining("categorical_logprob_entropy"))
def test_categorical_logprob_entropy_matches_torch_distributions(categorical_logprob_entropy):
    torch.manual_seed(0)
    logits = torch.randn(32, 5) * 3
    actions = torch.randint(0, 5, (32,))
    logprob, entropy = categorical_logprob_entropy(logits, actions)
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logprob, dist.log_prob(actions))
    torch.testing.assert_close(entropy, dist.entropy())


@pytest.mark.parametrize("sample_categorical", scripts_defining("sample_categorical"))
def test_sample_categorical_frequencies(sample_categorical):
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]]).repeat(100_000, 1)
    counts = torch.bincount(sample_categorical(logits), minlength=4).double()
    probs = torch.softmax(logits[0].double(), 0)
    expected = probs * 100_000
    # each count within 5 binomial standard deviations of its expectation
    assert torch.all((counts - expected).abs() < 5 * (expected * (1 - probs)).sqrt()), (counts, expected)


# ---------------------------------------------------------------------------------------------------------
# Gaussian policy helpers and exact KLs (continuous-action scripts)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gaussian_log_prob", scripts_defining("gaussian_log_prob"))
def test_gaussian_log_prob_matches_torch_normal(gaussian_log_prob):
    torch.manual_seed(0)
    mean, actions = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64) * 2
    log_std = torch.randn(3, dtype=torch.float64) * 0.5  # state-independent: broadcast over the batch
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(mean, log_std, actions), expected)
    torch.testing.assert_close(gaussian_log_prob(mean, log_std.expand(16, 3), actions), expected)


@pytest.mark.parametrize("gaussian_entropy", scripts_defining("gaussian_entropy"))
def test_gaussian_entropy_matches_torch_normal(gaussian_entropy):
    log_std = torch.tensor([[-1.0, 0.0, 0.7]], dtype=torch.float64)
    expected = torch.distributions.Normal(torch.zeros(1, 3, dtype=torch.float64), log_std.exp()).entropy().sum(-1)
    torch.testing.assert_close(gaussian_entropy(log_std), expected)


@pytest.mark.parametrize("categorical_kl", scripts_defining("categorical_kl"))
def test_categorical_kl_matches_torch(categorical_kl):
    torch.manual_seed(0)
    old, new = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=old), torch.distributions.Categorical(logits=new)
    )
    torch.testing.assert_close(categorical_kl(old, new), expected)
    torch.testing.assert_close(categorical_kl(old, old), torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("gaussian_kl", scripts_defining("gaussian_kl"))
def test_gaussian_kl_matches_torch(gaussian_kl):
    torch.manual_seed(0)
    m_old, m_new = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    s_old, s_new = torch.randn(8, 2, dtype=torch.float64) * 0.3, torch.randn(8, 2, dtype=torch.float64) * 0.3
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m_old, s_old.exp()), torch.distributions.Normal(m_new, s_new.exp())
    ).sum(-1)
    torch.testing.assert_close(gaussian_kl(m_old, s_old, m_new, s_new), expected)


# ---------------------------------------------------------------------------------------------------------
# Running normalisation: RunningMeanStd (observations), RewardScaler (rewards)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
def test_running_mean_std_of_streamed_batches_is_that_of_all_data(RunningMeanStd):
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 20.0, 0.01], dtype=torch.float64)
    shift = torch.tensor([4.0, -50.0, 0.0], dtype=torch.float64)
    data = torch.randn(600, 3, generator=g, dtype=torch.float64) * scale + shift
    rms = RunningMeanStd((3,), torch.device("cpu"))
    start = 0
    for size in [1, 2, 1, 96, 3, 1, 496]:  # uneven batches, batches of one included
        rms.update(data[start : start + size])
        start += size
    assert start == len(data)
    assert rms.count == 600  # exact: the count starts at 0, not at a small epsilon
    torch.testing.assert_close(rms.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms.var, data.var(0, correction=0), rtol=1e-12, atol=1e-12)
    # one row at a time, as one env feeds it every step (update's own path for batches of one)
    rms = RunningMeanStd((3,), torch.device("cpu"))
    for row in data[:300]:
        rms.update(row.unsqueeze(0))
    torch.testing.assert_close(rms.mean, data[:300].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms.var, data[:300].var(0, correction=0), rtol=1e-10, atol=1e-12)
    # the docstring's example
    rms = RunningMeanStd((1,), torch.device("cpu"))
    rms.update(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    rms.update(torch.tensor([[5.0]], dtype=torch.float64))
    assert (rms.mean.item(), rms.var.item(), rms.count) == pytest.approx((3.0, 8 / 3, 3), rel=1e-12)


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
def test_running_mean_std_state_dict_round_trip(RunningMeanStd, tmp_path):
    g = torch.Generator().manual_seed(1)
    rms = RunningMeanStd((3,), torch.device("cpu"))
    for _ in range(4):
        rms.update(torch.randn(8, 3, generator=g, dtype=torch.float64) * 3 - 1)
    torch.save({"obs_rms": rms.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["obs_rms"]
    assert set(state) == {"mean", "var", "count"}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    restored = RunningMeanStd((3,), torch.device("cpu"))
    restored.load_state_dict(state)
    assert restored.count == rms.count == 32
    x = torch.randn(5, 3, generator=g, dtype=torch.float64) * 4
    torch.testing.assert_close(restored.normalize(x), rms.normalize(x), rtol=0, atol=0)
    # state_dict and load_state_dict copy: updating either normaliser afterwards changes no saved state
    snapshot = rms.state_dict()
    saved = {key: value.clone() for key, value in state.items()}
    batch = torch.randn(7, 3, generator=g, dtype=torch.float64)
    rms.update(batch)
    restored.update(batch)
    torch.testing.assert_close(restored.mean, rms.mean, rtol=0, atol=0)  # both go on identically
    torch.testing.assert_close(restored.var, rms.var, rtol=0, atol=0)
    for key in saved:
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)
        torch.testing.assert_close(snapshot[key], saved[key], rtol=0, atol=0)


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
def test_running_mean_std_normalize_clips_and_returns_float32(RunningMeanStd):
    rms = RunningMeanStd((2,), torch.device("cpu"))
    x = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    out = rms.normalize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float())  # before any data (mean 0, var 1): the identity
    rms.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64))  # mean [2, 0], var [1, 0]
    out = rms.normalize(torch.tensor([[2.5, 0.0], [1e6, 1.0], [-1e6, -1.0]], dtype=torch.float64))
    assert out.dtype == torch.float32
    # column 1 has var 0: divided by sqrt(1e-8), so any nonzero deviation is clipped
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0], [10.0, 10.0], [-10.0, -10.0]]))
    assert rms.normalize(torch.tensor([[2.5, 0.0]])).dtype == torch.float32  # float32 input too
    assert rms.count == 2  # normalize read the statistics, it did not update them


@pytest.mark.parametrize("compute_array", scripts_defining("compute_array"))
def test_compute_array_is_a_numpy_view_on_the_cpu(compute_array):
    """On the CPU: numpy, sharing the memory of a float64 tensor or array (writes reach the tensor), a float64
    copy of anything else."""
    t = torch.zeros(3, dtype=torch.float64)
    view = compute_array(t, torch.device("cpu"))
    view += 2.0
    assert isinstance(view, np.ndarray) and t.tolist() == [2.0, 2.0, 2.0]
    x = np.ones(3)
    assert compute_array(x, torch.device("cpu")) is x
    converted = compute_array(torch.ones(3, dtype=torch.float32), torch.device("cpu"))
    assert converted.dtype == np.float64 and converted.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
def test_running_statistics_compute_the_same_on_tensors_as_on_numpy_views(RunningMeanStd, monkeypatch):
    """What runs on a GPU (the formulas on tensors) gives what runs on the CPU (on numpy views of them): here
    both on the CPU, the tensor path by making compute_array return tensors. RewardScaler too."""
    import sys

    script = sys.modules[RunningMeanStd.__module__]
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 4, generator=g, dtype=torch.float64) * 3 + 1 for n in (1, 5, 1, 1, 8, 2, 1)]
    x = torch.randn(6, 4, generator=g, dtype=torch.float64) * 4
    rewards = torch.randn(40, 2, generator=g, dtype=torch.float64)
    dones = (torch.rand(40, 2, generator=g) < 0.1).float()

    def run():
        rms, scaler = RunningMeanStd((4,), torch.device("cpu")), script.RewardScaler(2, 0.99, torch.device("cpu"))
        for batch in batches:
            rms.update(batch)
        scaled = torch.cat([scaler(rewards[:15], dones[:15]), scaler(rewards[15:], dones[15:])])
        return rms.mean, rms.var, rms.normalize(x), scaled, scaler.returns, scaler.return_rms.var

    on_numpy = run()
    monkeypatch.setattr(script, "compute_array", lambda x, device: torch.as_tensor(x, dtype=torch.float64, device=device))
    on_tensors = run()
    assert isinstance(on_numpy[2], torch.Tensor) and on_numpy[2].dtype == on_tensors[2].dtype == torch.float32
    for a, b in zip(on_numpy, on_tensors):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # the same formulas; sums may round apart


@pytest.mark.parametrize("RewardScaler", scripts_defining("RewardScaler"))
def test_reward_scaler_divides_by_std_of_the_discounted_returns_seen(RewardScaler):
    gamma, T, N = 0.9, 30, 3
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64) * 2 + 0.5
    dones = (torch.rand(T, N, generator=g) < 0.2).float()
    dones[4, 1] = 1.0  # at least one episode end
    scaler = RewardScaler(N, gamma, torch.device("cpu"))
    # reference: plain Python, step by step: each env's return G = r + gamma G (0 after a done), and the
    # population std of every return seen so far (all envs, all steps) divides that step's rewards
    running, seen, expected = [0.0] * N, [], np.zeros((T, N))
    for t in range(T):
        for n in range(N):
            running[n] = running[n] * gamma + rewards[t, n].item()
        seen.extend(running)
        expected[t] = np.clip(rewards[t].numpy() / math.sqrt(np.var(seen) + 1e-8), -10, 10)
        for n in range(N):
            if dones[t, n]:
                running[n] = 0.0
    # the rollout fed in uneven pieces (one step, several, the rest): the scaler carries G and the statistics
    start = 0
    for size in (1, 7, 22):
        scaled = scaler(rewards[start : start + size], dones[start : start + size])
        np.testing.assert_allclose(scaled.numpy(), expected[start : start + size], rtol=1e-9)
        start += size
    assert start == T
    np.testing.assert_allclose(scaler.returns.numpy(), running, rtol=1e-12, atol=0)
    assert scaler.return_rms.count == T * N
    assert scaler.return_rms.var.item() == pytest.approx(np.var(seen), rel=1e-9)
    assert scaler.return_rms.mean.item() == pytest.approx(np.mean(seen), rel=1e-9)


@pytest.mark.parametrize("RewardScaler", scripts_defining("RewardScaler"))
def test_reward_scaler_restarts_the_return_at_episode_end(RewardScaler):
    scaler = RewardScaler(2, 0.5, torch.device("cpu"))
    two = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    scaler(two, torch.tensor([[0.0, 1.0]]))  # env 1's episode ends with this step
    assert scaler.returns.tolist() == [2.0, 0.0]
    scaler(two, torch.zeros(1, 2))
    assert scaler.returns.tolist() == [3.0, 2.0]  # env 0 carries on (2 * 0.5 + 2), env 1 starts again
    # the docstring's example: one env, rewards 2, 2 -> returns 2, 3 -> stds 0 and 0.5 -> [[10], [4]]
    scaler = RewardScaler(1, 0.5, torch.device("cpu"))
    scaled = scaler(torch.tensor([[2.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
    assert scaled[:, 0].tolist() == pytest.approx([10.0, 4.0], rel=1e-6)
    # the first return of a fresh scaler has std 0: divided by sqrt(1e-8), clipped to +-10 with the sign kept
    for reward, clipped in ((3.0, 10.0), (-3.0, -10.0)):
        fresh = RewardScaler(1, 0.5, torch.device("cpu"))
        assert fresh(torch.tensor([[reward]], dtype=torch.float64), torch.zeros(1, 1)).item() == clipped


@pytest.mark.parametrize("RewardScaler", scripts_defining("RewardScaler"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_reward_scaler_takes_any_float_dtype(RewardScaler, dtype):
    """Paste trap: the return loop writes into views of float64 memory; fed float32 rewards it once wrote into a
    converted copy and returned uninitialised memory, and corrupted the statistics."""
    scaler = RewardScaler(1, 0.5, torch.device("cpu"))
    scaled = scaler(torch.tensor([[2.0], [2.0]], dtype=dtype), torch.zeros(2, 1, dtype=dtype))
    assert scaled[:, 0].tolist() == pytest.approx([10.0, 4.0], rel=1e-6)  # the docstring's example
    assert scaler.returns.tolist() == [3.0]
    assert (scaler.return_rms.mean.item(), scaler.return_rms.var.item()) == pytest.approx((2.5, 0.25), rel=1e-12)


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
def test_running_mean_std_copies_are_independent_and_working(RunningMeanStd, duplicate):
    """Paste trap: on the CPU the statistics are computed on numpy views of the tensors; a copy must compute on
    views of its own tensors, so that update() reaches state_dict() and load_state_dict() reaches normalize()."""
    import copy
    import pickle

    g = torch.Generator().manual_seed(3)
    data = torch.randn(40, 3, generator=g, dtype=torch.float64) * 2 + 1
    rms = RunningMeanStd((3,), torch.device("cpu"))
    rms.update(data[:10])
    twin = copy.deepcopy(rms) if duplicate == "deepcopy" else pickle.loads(pickle.dumps(rms))
    twin.update(data[10:].float())  # float32 in: converted, not refused
    torch.testing.assert_close(twin.state_dict()["mean"], data.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rms.mean, data[:10].mean(0), rtol=1e-12, atol=1e-12)  # the original is untouched
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    twin.load_state_dict(rms.state_dict())
    torch.testing.assert_close(twin.normalize(x), rms.normalize(x), rtol=0, atol=0)
    twin.load_state_dict({"mean": torch.zeros(3, dtype=torch.float64), "var": torch.ones(3, dtype=torch.float64),
                          "count": torch.tensor(0.0, dtype=torch.float64)})
    torch.testing.assert_close(twin.normalize(x), x.float())  # the loaded statistics are the ones normalize uses


# One env, 256 Pendulum-v1 steps in one iteration: its episode ends by time limit at step 200.
PENDULUM_ONE_ITERATION = {
    "ppo_continuous": ["--num-steps", "256", "--num-minibatches", "2", "--update-epochs", "1"],
    "ppo_penalty": ["--num-envs", "1", "--num-steps", "256", "--num-minibatches", "2", "--update-epochs", "1"],
    "trpo": ["--num-envs", "1", "--num-steps", "256", "--num-minibatches", "2", "--vf-iters", "1"],
}


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
def test_observation_statistics_count_every_observation_final_ones_included(RunningMeanStd, tmp_path, monkeypatch):
    """The observation statistics are merged from exactly the observations the envs returned, in order: the
    reset batch, then per step the final observation of every episode that ended (before the reset
    observation that replaces it in the step's batch), then the step's batch."""
    import sys

    import gymnasium as gym

    script = sys.modules[RunningMeanStd.__module__]
    # the vector env the script steps one env with: its own SameStepVectorEnv, or gymnasium's SyncVectorEnv
    vector_env = getattr(script, "SameStepVectorEnv", gym.vector.SyncVectorEnv)
    returned = []  # every batch of observations the vector env handed back, final observations included
    real_reset, real_step = vector_env.reset, vector_env.step

    def reset(self, **kwargs):
        next_obs, info = real_reset(self, **kwargs)
        returned.append(np.array(next_obs))
        return next_obs, info

    def step(self, actions):
        next_obs, reward, terminated, truncated, info = real_step(self, actions)
        done = terminated | truncated
        if done.any():
            returned.append(np.stack(info["final_obs"][done]))
        returned.append(np.array(next_obs))
        return next_obs, reward, terminated, truncated, info

    merged = []  # every batch merged into the observation statistics (the return statistics have shape ())
    real_update = RunningMeanStd.update

    def update(self, batch):  # batch: a tensor, or the envs' numpy array as it came
        if self.mean.shape == (3,):
            merged.append(np.array(batch, dtype=np.float64))  # a copy
        real_update(self, batch)

    monkeypatch.setattr(vector_env, "reset", reset)
    monkeypatch.setattr(vector_env, "step", step)
    monkeypatch.setattr(RunningMeanStd, "update", update)
    monkeypatch.chdir(tmp_path)
    script.main(["--env-id", "Pendulum-v1", "--total-timesteps", "256", *PENDULUM_ONE_ITERATION[script.__name__]])

    assert len(returned) == 1 + 256 + 1  # the reset batch, 256 steps, the final observation at step 200
    np.testing.assert_array_equal(np.concatenate(merged), np.concatenate(returned))


# ---------------------------------------------------------------------------------------------------------
# SameStepVectorEnv (every script that steps gymnasium envs): what gymnasium's SyncVectorEnv(SAME_STEP) returns
# ---------------------------------------------------------------------------------------------------------

# Short time limits, so that both kinds of episode end happen: CartPole and Hopper terminate under random
# actions; Acrobot and Pendulum only truncate.
SAME_STEP_ENVS = {
    "ppo_discrete": [("CartPole-v1", 15), ("Acrobot-v1", 40)],
    "ppo_continuous": [("Pendulum-v1", 40), ("Hopper-v4", 40)],
    "trpo": [("CartPole-v1", 15), ("Pendulum-v1", 40), ("Hopper-v4", 40)],
    "ppo_penalty": [("CartPole-v1", 15), ("Pendulum-v1", 40), ("Hopper-v4", 40)],
}


def random_actions(space: gym.spaces.Space, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random actions of the single-env space, batched as the scripts batch theirs."""
    if isinstance(space, gym.spaces.Discrete):
        return rng.integers(0, space.n, size=n)
    return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)


@pytest.mark.parametrize("SameStepVectorEnv", scripts_defining("SameStepVectorEnv"))
def test_same_step_vector_env_returns_what_gymnasium_sync_vector_env_returns(SameStepVectorEnv):
    """Step by step under the same random actions: the same observations, rewards, terminations, truncations and
    final observations as gym.vector.SyncVectorEnv with SAME_STEP autoreset (the envs are seeded alike), and the
    episode statistics are the sums of the rewards since the last reset."""
    for env_id, max_episode_steps in SAME_STEP_ENVS[SameStepVectorEnv.__module__]:
        env_fns = [lambda: gym.make(env_id, max_episode_steps=max_episode_steps) for _ in range(3)]
        ours = SameStepVectorEnv(env_fns)
        theirs = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        obs, _ = ours.reset(seed=3)
        np.testing.assert_array_equal(obs, theirs.reset(seed=3)[0])
        rng = np.random.default_rng(0)
        episode_return, episode_length = np.zeros(3), np.zeros(3, dtype=np.int64)
        terminations = truncations = 0
        for _ in range(300):
            actions = random_actions(ours.single_action_space, 3, rng)
            *step, info = ours.step(actions)
            *expected, expected_info = theirs.step(actions)
            for got, want in zip(step, expected):  # obs, rewards, terminated, truncated
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want)
            _, reward, terminated, truncated = step
            done = terminated | truncated
            episode_return += reward
            episode_length += 1
            assert ("_final_obs" in info) == done.any()
            if done.any():
                np.testing.assert_array_equal(info["_final_obs"], expected_info["_final_obs"])
                for i in np.flatnonzero(done):
                    np.testing.assert_array_equal(info["final_obs"][i], expected_info["final_obs"][i])
                np.testing.assert_array_equal(info["_episode"], done)
                np.testing.assert_array_equal(info["episode"]["r"][done], episode_return[done])
                np.testing.assert_array_equal(info["episode"]["l"][done], episode_length[done])
                episode_return[done], episode_length[done] = 0.0, 0
            terminations += int(terminated.sum())
            truncations += int((truncated & ~terminated).sum())
        assert truncations > 0 and (terminations > 0 or env_id in ("Acrobot-v1", "Pendulum-v1")), env_id
        ours.close()
        theirs.close()


@pytest.mark.parametrize("cpu_weights", scripts_defining("cpu_weights"))
def test_cpu_weights_are_the_state_dict_on_the_cpu(cpu_weights):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    weights = cpu_weights(module)
    assert weights.keys() == module.state_dict().keys()
    for name, tensor in module.state_dict().items():
        assert weights[name].device.type == "cpu" and torch.equal(weights[name], tensor)
