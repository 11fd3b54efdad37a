"""Tests of trpo.py: the solver pieces against explicit linear algebra, one TRPO step on a fixed batch, and the
script end to end (smoke runs, checkpoint round trip, determinism, truncation bootstrap, bad input, NaN stop)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import trpo
from conftest import ROOT


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the script runs (--torch-threads 1): on a shared 2-core machine, two threads make these small
    double-backward passes hundreds of times slower (threads spinning against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------------------------------------------------
# conjugate_gradient
# ---------------------------------------------------------------------------------------------------------


def random_spd(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=dtype)
    return m @ m.T + 0.5 * n * torch.eye(n, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)


class CountingProduct:
    """v -> A v, counting the calls (each one a Fisher-vector product in TRPO)."""

    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        return self.A @ v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conjugate_gradient_matches_linalg_solve(seed):
    A, b = random_spd(25, seed)
    x, residual = trpo.conjugate_gradient(lambda v: A @ v, b, n_steps=25, residual_tol=1e-24)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert residual.item() == pytest.approx(((b - A @ x) ** 2).sum().item(), abs=1e-18)
    assert residual.item() < 1e-18


def test_conjugate_gradient_docstring_example_and_zero_rhs():
    product = CountingProduct(2.0 * torch.eye(2, dtype=torch.float64))
    x, residual = trpo.conjugate_gradient(product, torch.tensor([2.0, 4.0], dtype=torch.float64), 10, 1e-10)
    torch.testing.assert_close(x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert residual.item() == 0.0 and product.calls == 1
    product = CountingProduct(torch.eye(3))
    x, residual = trpo.conjugate_gradient(product, torch.zeros(3), 10, 1e-10)  # g = 0: no product, no NaN
    assert product.calls == 0 and torch.equal(x, torch.zeros(3))


def test_conjugate_gradient_stops_at_the_residual_tolerance():
    # A with 3 distinct eigenvalues: CG is exact after 3 products, then stops although n_steps is 30
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64).repeat(10)
    product = CountingProduct(q @ torch.diag(eigenvalues) @ q.T)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    x, residual = trpo.conjugate_gradient(product, b, n_steps=30, residual_tol=1e-20)
    assert product.calls == 3
    assert residual.item() <= 1e-20
    torch.testing.assert_close(product.A @ x, b)

    # a loose tolerance: stops at the first iterate whose squared residual is <= tol, not one product later
    A, b = random_spd(40, 4)
    tol = 1e-6 * (b @ b).item()
    product = CountingProduct(A)
    _, residual = trpo.conjugate_gradient(product, b, n_steps=40, residual_tol=tol)
    k = product.calls
    assert 1 < k < 40 and residual.item() <= tol
    _, residual_before = trpo.conjugate_gradient(lambda v: A @ v, b, n_steps=k - 1, residual_tol=tol)
    assert residual_before.item() > tol


def test_conjugate_gradient_stops_where_the_curvature_is_not_positive():
    """CG divides by p^T A p. Where A is not positive definite along p (0, negative, or a NaN product) it returns
    the x it has, finite, instead of a step of inf or NaN."""
    def diag(*d):
        return torch.diag(torch.tensor(d, dtype=torch.float64))

    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for product in (lambda v: diag(1.0, 0.0) @ v, lambda v: diag(1.0, -1.0) @ v, lambda v: v * float("nan")):
        x, residual = trpo.conjugate_gradient(product, b, 10, 1e-10)
        assert torch.equal(x, torch.zeros(2, dtype=torch.float64)) and residual.item() == 1.0
    # at the second step: p = b = [1, 1] has curvature 2, alpha 1, x = [1, 1]; the next p = [0, 2] has curvature 0
    x, residual = trpo.conjugate_gradient(lambda v: diag(2.0, 0.0) @ v, torch.ones(2, dtype=torch.float64), 10, 1e-10)
    assert torch.equal(x, torch.ones(2, dtype=torch.float64)) and residual.item() == 2.0


# ---------------------------------------------------------------------------------------------------------
# flat parameters and gradients
# ---------------------------------------------------------------------------------------------------------


def test_flat_params_round_trip():
    torch.manual_seed(0)
    module = trpo.GaussianPolicy(3, gym.spaces.Box(-1.0, 1.0, (2,), np.float32))
    flat = trpo.flat_params(module)
    assert flat.shape == (sum(p.numel() for p in module.parameters()),)
    assert not flat.requires_grad
    new = torch.randn_like(flat)
    trpo.set_flat_params(module, new)
    assert torch.equal(trpo.flat_params(module), new)
    # .parameters() order: the module's own parameter log_std first, then the submodule net's
    assert [name for name, _ in module.named_parameters()][0] == "log_std"
    assert torch.equal(module.log_std.detach(), new[:2])
    trpo.set_flat_params(module, flat)
    assert torch.equal(trpo.flat_params(module), flat)
    flat.add_(1.0)  # a copy: changing it leaves the module alone
    assert not torch.equal(trpo.flat_params(module), flat)
    with pytest.raises(ValueError, match="entries"):
        trpo.set_flat_params(module, flat[:-1])


def test_flat_grad_matches_autograd_and_fills_unused_with_zeros():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    out = (a**2).sum() * b.sum()
    torch.testing.assert_close(trpo.flat_grad(out, [a, b, unused]), torch.tensor([6.0, 12.0, 5.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------------------------------------
# distributions: log-probs, entropies and exact KLs against torch.distributions
# ---------------------------------------------------------------------------------------------------------


def test_gaussian_log_prob_entropy_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, log_std = torch.randn(16, 3, generator=g), 0.5 * torch.randn(16, 3, generator=g)
    mean2, log_std2 = torch.randn(16, 3, generator=g), 0.5 * torch.randn(16, 3, generator=g)
    actions = torch.randn(16, 3, generator=g)
    normal = torch.distributions.Normal(mean, log_std.exp())
    normal2 = torch.distributions.Normal(mean2, log_std2.exp())
    torch.testing.assert_close(trpo.gaussian_log_prob(mean, log_std, actions), normal.log_prob(actions).sum(-1))
    torch.testing.assert_close(trpo.gaussian_entropy(log_std), normal.entropy().sum(-1))
    torch.testing.assert_close(trpo.gaussian_kl(mean, log_std, mean2, log_std2),
                               torch.distributions.kl_divergence(normal, normal2).sum(-1))
    assert trpo.gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item() == (
        pytest.approx(-0.5 - math.log(2 * math.pi)))
    # the article's pair N(0, 0.01) vs N(0, 10) (as standard deviations): 6.41 nats apart
    kl = trpo.gaussian_kl(torch.zeros(1, 1), torch.tensor([[math.log(0.01)]]), torch.zeros(1, 1),
                          torch.tensor([[math.log(10.0)]]))
    assert kl.item() == pytest.approx(math.log(1000) - 0.5, abs=1e-4)


def test_categorical_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    old, new = 2 * torch.randn(16, 5, generator=g), 2 * torch.randn(16, 5, generator=g)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=old),
                                                 torch.distributions.Categorical(logits=new))
    torch.testing.assert_close(trpo.categorical_kl(old, new), expected)
    half = trpo.categorical_kl(torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]])))
    assert half.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert torch.all(trpo.categorical_kl(old, old).abs() < 1e-6)


def test_surrogate_value_and_gradient_at_the_old_policy():
    assert trpo.surrogate(torch.tensor([math.log(2.0), 0.0]), torch.zeros(2), torch.tensor([3.0, -1.0])).item() == (
        pytest.approx(2.5))
    old = torch.randn(8, dtype=torch.float64)
    new = old.clone().requires_grad_()
    advantages = torch.randn(8, dtype=torch.float64)
    value = trpo.surrogate(new, old, advantages)
    (grad,) = torch.autograd.grad(value, new)
    assert value.item() == pytest.approx(advantages.mean().item())
    torch.testing.assert_close(grad, advantages / 8)  # mean(A grad log pi): the policy gradient


# ---------------------------------------------------------------------------------------------------------
# fisher_vector_product against an explicit Fisher matrix, for both policy heads
# ---------------------------------------------------------------------------------------------------------


def tiny_policy(kind, hidden=4, obs_dim=3, seed=0):
    """A policy of this script with a small MLP, in float64, so that its Fisher matrix can be built explicitly."""
    torch.manual_seed(seed)
    if kind == "categorical":
        policy = trpo.CategoricalPolicy(obs_dim, 3)
        policy.net = trpo.mlp(obs_dim, 3, out_std=1.0, hidden=hidden)
    else:
        policy = trpo.GaussianPolicy(obs_dim, gym.spaces.Box(-1.0, 1.0, (2,), np.float32))
        policy.net = trpo.mlp(obs_dim, 2, out_std=1.0, hidden=hidden)
        with torch.no_grad():
            policy.log_std.copy_(torch.tensor([-0.3, 0.4]))
    return policy.double()


def as_function_of_flat_params(policy, fn):
    """theta (flat) -> fn(distribution of the policy with parameters theta)."""
    names_shapes = [(name, p.shape) for name, p in policy.named_parameters()]

    def wrapped(theta):
        params, offset = {}, 0
        for name, shape in names_shapes:
            n = math.prod(shape)
            params[name] = theta[offset : offset + n].view(shape)
            offset += n
        return fn(params)

    return wrapped


def explicit_fisher_from_scores(policy, obs, kind):
    """F = mean_s E_{a ~ pi(.|s)}[grad log pi(a|s) grad log pi(a|s)^T], the article's definition, computed exactly:
    categorical: the expectation is a finite sum over actions of per-sample score outer products;
    Gaussian: E[score score^T] = J^T diag(1/sigma^2 for each mean, 2 for each log sigma) J, J = d(mu, log sigma)/d theta
    """
    params = list(policy.parameters())
    n_params = sum(p.numel() for p in params)
    fisher = torch.zeros(n_params, n_params, dtype=torch.float64)
    if kind == "categorical":
        for s in range(obs.shape[0]):
            (logits,) = policy(obs[s : s + 1])
            log_probs = logits.log_softmax(-1)[0]
            for a in range(log_probs.shape[0]):
                score = trpo.flat_grad(log_probs[a], params, retain_graph=True)
                fisher += log_probs[a].exp().detach() * torch.outer(score, score)
        return fisher / obs.shape[0]
    flat = trpo.flat_params(policy)
    mean_of = as_function_of_flat_params(policy, lambda p: torch.func.functional_call(policy, p, (obs,))[0])
    jac_mean = torch.autograd.functional.jacobian(mean_of, flat)  # [B, D, P]
    log_std = policy.log_std.detach()
    for s in range(obs.shape[0]):
        fisher += jac_mean[s].T @ torch.diag(torch.exp(-2 * log_std)) @ jac_mean[s]
    fisher /= obs.shape[0]
    jac_log_std = torch.zeros(2, n_params, dtype=torch.float64)
    jac_log_std[:, :2] = torch.eye(2, dtype=torch.float64)  # log_std is the first parameter (flat_params order)
    return fisher + 2.0 * jac_log_std.T @ jac_log_std


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_fisher_vector_product_equals_explicit_fisher(kind):
    policy = tiny_policy(kind)
    obs = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = list(policy.parameters())
    n_params = sum(p.numel() for p in params)

    # Hessian of the mean KL(pi_old || pi_theta) at theta_old, by autograd on a function of the flat parameters
    old_dist = tuple(t.detach() for t in policy(obs))
    mean_kl_of = as_function_of_flat_params(
        policy, lambda p: policy.kl(old_dist, torch.func.functional_call(policy, p, (obs,))).mean()
    )
    hessian = torch.autograd.functional.hessian(mean_kl_of, trpo.flat_params(policy))
    fisher = explicit_fisher_from_scores(policy, obs, kind)
    torch.testing.assert_close(hessian, fisher, rtol=1e-8, atol=1e-10)  # Hessian of the KL = Fisher

    mean_kl = policy.kl(old_dist, policy(obs)).mean()
    kl_grad = trpo.flat_grad(mean_kl, params, create_graph=True)
    g = torch.Generator().manual_seed(6)
    for damping in (0.0, 0.1):
        for _ in range(3):  # several products from one kl_grad, as conjugate_gradient makes them
            v = torch.randn(n_params, dtype=torch.float64, generator=g)
            fv = trpo.fisher_vector_product(kl_grad, params, v, damping)
            torch.testing.assert_close(fv, (fisher + damping * torch.eye(n_params, dtype=torch.float64)) @ v,
                                       rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# one TRPO step on a fixed batch, and the line search
# ---------------------------------------------------------------------------------------------------------


def fixed_batch(policy, kind, batch=512, seed=7):
    """Observations, actions drawn from the policy, their log-probs, and advantages that favour some actions."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, 3, dtype=torch.float64, generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        dist = policy(obs)
        actions = policy.sample(obs)
        old_logprob, _ = policy.log_prob_entropy(dist, actions)
    if kind == "categorical":
        advantages = (actions == (obs[:, 0] > 0).long()).double() - 0.3 * obs[:, 1]  # right action pays
    else:
        advantages = -((actions - obs[:, :2].tanh()) ** 2).sum(-1)  # close to tanh(obs) pays
    return obs, actions, old_logprob, trpo.normalize_advantages(advantages)


def exact_mean_kl(policy, old_dist, obs):
    with torch.no_grad():
        return policy.kl(old_dist, policy(obs)).mean().item()


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_trpo_update_improves_the_surrogate_inside_the_trust_region(kind):
    policy = tiny_policy(kind, hidden=8)
    obs, actions, old_logprob, advantages = fixed_batch(policy, kind)
    with torch.no_grad():
        old_dist = tuple(t.clone() for t in policy(obs))
    old_params = trpo.flat_params(policy)

    stats = trpo.trpo_update(policy, obs, actions, old_logprob, advantages, max_kl=0.01, cg_iters=10,
                             cg_damping=0.1, backtrack_coef=0.8, backtrack_iters=10)
    assert stats["step_accepted"]
    kl = exact_mean_kl(policy, old_dist, obs)
    assert 0.0 < kl <= 0.01
    assert stats["kl"] == pytest.approx(kl)
    with torch.no_grad():
        new_logprob, _ = policy.log_prob_entropy(policy(obs), actions)
    improvement = (trpo.surrogate(new_logprob, old_logprob, advantages) - advantages.mean()).item()
    assert improvement > 0 and stats["surrogate_improvement"] == pytest.approx(improvement)
    assert stats["expected_improvement"] > 0
    step = trpo.flat_params(policy) - old_params
    assert stats["step_norm"] == pytest.approx(step.norm().item())
    assert stats["approx_kl_k3"] > 0


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_full_step_lands_where_the_quadratic_model_puts_it(kind):
    """The step solves 1/2 s^T (F + damping I) s = delta, so the quadratic model of the KL predicts
    1/2 s^T F s = delta - damping/2 |s|^2 (a bit under delta: the damping makes it conservative). The measured KL
    of the full step, accepted without backtracking, matches that up to the third-order terms the model drops,
    which shrink with delta; so does the surrogate's gain match its first-order promise g^T s."""
    errors = []
    for max_kl in (0.01, 0.001):
        policy = tiny_policy(kind, hidden=8)
        obs, actions, old_logprob, advantages = fixed_batch(policy, kind)
        with torch.no_grad():
            old_dist = tuple(t.clone() for t in policy(obs))
        stats = trpo.trpo_update(policy, obs, actions, old_logprob, advantages, max_kl=max_kl, cg_iters=10,
                                 cg_damping=0.1, backtrack_coef=0.8, backtrack_iters=10)
        assert stats["step_accepted"] and stats["backtracks"] == 0
        predicted = max_kl - 0.5 * 0.1 * stats["step_norm"] ** 2
        assert 0.75 * max_kl < predicted <= max_kl
        kl = exact_mean_kl(policy, old_dist, obs)
        errors.append(abs(kl / predicted - 1))
        assert errors[-1] < 0.1, (kl, predicted)
        assert stats["surrogate_improvement"] == pytest.approx(stats["expected_improvement"], rel=0.1)
    assert errors[1] < errors[0]


def natural_step(policy, obs, actions, old_logprob, advantages, max_kl):
    params = list(policy.parameters())
    dist = policy(obs)
    old_dist = tuple(t.detach().clone() for t in dist)
    logprob, _ = policy.log_prob_entropy(dist, actions)
    g = trpo.flat_grad(trpo.surrogate(logprob, old_logprob, advantages), params, retain_graph=True)
    kl_grad = trpo.flat_grad(policy.kl(old_dist, dist).mean(), params, create_graph=True)
    x, _ = trpo.conjugate_gradient(lambda v: trpo.fisher_vector_product(kl_grad, params, v, 0.1), g, 10, 1e-10)
    xFx = x @ trpo.fisher_vector_product(kl_grad, params, x, 0.1)
    step = (torch.sqrt(2 * max_kl / xFx) * x).detach()

    def evaluate(flat):
        trpo.set_flat_params(policy, flat)
        with torch.no_grad():
            new_dist = policy(obs)
            new_logprob, _ = policy.log_prob_entropy(new_dist, actions)
            return trpo.surrogate(new_logprob, old_logprob, advantages), policy.kl(old_dist, new_dist).mean()

    return step, evaluate


def test_line_search_keeps_the_old_params_when_the_direction_cannot_improve():
    policy = tiny_policy("categorical", hidden=8)
    obs, actions, old_logprob, advantages = fixed_batch(policy, "categorical")
    step, evaluate = natural_step(policy, obs, actions, old_logprob, advantages, 0.01)
    old_params = trpo.flat_params(policy)
    result = trpo.line_search(evaluate, old_params, -step, advantages.mean().item(), 0.01, 0.8, 10)  # downhill
    assert not result.accepted
    assert result.backtracks == 10 and result.step_fraction == 0.0 and result.kl == 0.0
    assert torch.equal(result.params, old_params)


def test_line_search_backtracks_a_step_that_leaves_the_trust_region():
    policy = tiny_policy("gaussian", hidden=8)
    obs, actions, old_logprob, advantages = fixed_batch(policy, "gaussian")
    step, evaluate = natural_step(policy, obs, actions, old_logprob, advantages, 0.01)
    old_params = trpo.flat_params(policy)
    result = trpo.line_search(evaluate, old_params, 3.0 * step, advantages.mean().item(), 0.01, 0.8, 10)
    assert result.accepted and result.backtracks >= 1
    assert result.kl <= 0.01 and result.surrogate > advantages.mean().item()
    assert result.step_fraction == pytest.approx(0.8**result.backtracks)
    torch.testing.assert_close(result.params, old_params + result.step_fraction * 3.0 * step)


def test_line_search_on_a_known_quadratic():
    """L = sum(p), KL = 1/2 |p|^2 / 25: the full step [1, 1, 1, 1] has KL 0.08 = 4 delta with delta 0.02.
    0.8^3 = 0.512 still gives 1.05 delta; 0.8^4 = 0.4096 gives 0.67 delta: accepted after 4 backtracks."""
    calls = []

    def evaluate(p):
        calls.append(p)
        return p.sum(), 0.5 * (p @ p) / 25

    result = trpo.line_search(evaluate, torch.zeros(4), torch.ones(4), 0.0, 0.02, 0.8, 10)
    assert result.accepted and result.backtracks == 4 and len(calls) == 5
    assert result.kl == pytest.approx(0.5 * 4 * 0.4096**2 / 25)
    result = trpo.line_search(evaluate, torch.zeros(4), torch.ones(4), 0.0, 0.02, 0.8, 4)  # one try short
    assert not result.accepted and result.backtracks == 4 and torch.equal(result.params, torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------
# RunningMeanStd, RewardScaler
# ---------------------------------------------------------------------------------------------------------


def test_running_mean_std_matches_batch_statistics():
    rms = trpo.RunningMeanStd((1,), torch.device("cpu"))
    rms.update(torch.tensor([[0.0], [2.0]]))
    rms.update(torch.tensor([[4.0]]))
    assert rms.mean.item() == pytest.approx(2.0) and rms.var.item() == pytest.approx(8 / 3) and rms.count == 3
    # float64, as main() passes the observations (the statistics are kept in float64)
    data = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) \
        * torch.tensor([1.0, 5.0, 0.1], dtype=torch.float64) + 3.0
    rms = trpo.RunningMeanStd((3,), torch.device("cpu"))
    for chunk in data.split(7):  # uneven chunks, as N envs per step
        rms.update(chunk)
    assert rms.count == 1000
    torch.testing.assert_close(rms.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms.var, data.var(0, correction=0), rtol=1e-12, atol=1e-12)
    normalized = rms.normalize(data)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized.std(0, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    assert rms.normalize(torch.full((1, 3), 1e6)).max().item() == 10.0  # clipped
    copy = trpo.RunningMeanStd((3,), torch.device("cpu"))
    copy.load_state_dict(rms.state_dict())
    torch.testing.assert_close(copy.normalize(data), normalized, rtol=0, atol=0)


def test_reward_scaler_divides_without_centring_and_restarts_the_return_at_episode_end():
    gamma = 0.9
    g = torch.Generator().manual_seed(1)
    scaler = trpo.RewardScaler(2, gamma, torch.device("cpu"))
    returns = torch.zeros(2, dtype=torch.float64)
    for t in range(20):
        reward = torch.randn(2, generator=g, dtype=torch.float64) * 3 + 1
        done = torch.tensor([float(t % 5 == 4), float(t % 7 == 6)])
        scaled = scaler(reward[None], done[None])[0]  # a rollout of one step
        # divided by the std of the discounted return, never shifted: the sign (good or bad) is kept
        torch.testing.assert_close(scaled, (reward / (scaler.return_rms.var + 1e-8).sqrt()).clamp(-10, 10))
        assert torch.equal(scaled.sign(), reward.sign())
        returns = (returns * gamma + reward) * (1.0 - done)  # restarted at 0 where the episode ended
        torch.testing.assert_close(scaler.returns, returns)
    assert scaler.return_rms.count == 40  # one return per env and step
    # the first return of a fresh scaler has std 0: the reward is divided by sqrt(1e-8) and clipped to +-10
    for reward, clipped in ((3.0, 10.0), (-3.0, -10.0)):
        fresh = trpo.RewardScaler(1, gamma, torch.device("cpu"))
        assert fresh(torch.tensor([[reward]], dtype=torch.float64), torch.zeros(1, 1)).item() == clipped


# ---------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------

TINY = ["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
        "--vf-iters", "2"]


def run_dirs(cwd: Path):
    return sorted((cwd / "runs").glob("*")) if (cwd / "runs").exists() else []


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_smoke_train_save_and_evaluate(tmp_path, monkeypatch, capsys, env_id):
    monkeypatch.chdir(tmp_path)
    summary = trpo.main(["--env-id", env_id, *TINY, "--save-model", "--eval-episodes", "1"])
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert metrics[-1]["global_step"] == 256
    for key in ("approx_kl_k1", "approx_kl_k3", "entropy", "explained_variance", "policy_loss", "value_loss",
                "learning_rate", "sps", "episodic_return_100", "kl", "backtracks", "step_accepted",
                "surrogate_improvement", "expected_improvement", "cg_residual", "step_norm"):
        assert key in metrics[-1], key
    assert all(m["kl"] <= 0.01 for m in metrics)
    assert metrics[0]["learning_rate"] == pytest.approx(1e-3)

    checkpoint_path = run_dir / "trpo.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["script"] == "trpo" and checkpoint["args"]["env_id"] == env_id
    # on by default: the reset batch, every step's observations and the final observation of every episode
    ended = sum(m["episodes"] for m in metrics)
    assert (env_id == "CartPole-v1") == (ended > 0)  # CartPole episodes end inside 128 steps, Pendulum's do not
    assert checkpoint["obs_rms"]["count"].item() == 2 + 256 + ended
    assert checkpoint["return_rms"]["count"].item() == 256  # one discounted return per env step
    assert "eval_return_mean" in summary

    result = trpo.main(["--eval-checkpoint", str(checkpoint_path), "--eval-episodes", "2"])
    assert len(result["eval_returns"]) == 2
    assert f"eval {env_id}: return" in capsys.readouterr().out
    # evaluation reads the normalisation statistics, never updates them
    again = trpo.load_checkpoint(str(checkpoint_path))
    torch.testing.assert_close(again["obs_rms"]["mean"], checkpoint["obs_rms"]["mean"])
    returns = trpo.evaluate(again, 2, 0, torch.device("cpu"))
    np.testing.assert_array_equal(returns, trpo.evaluate(again, 2, 0, torch.device("cpu")))


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        trpo.main(["--env-id", "Pendulum-v1", *TINY])
        runs.append(read_metrics(run_dirs(tmp_path / name)[0]))
    for first, second in zip(*runs):
        for key in ("time", "sps"):
            first.pop(key), second.pop(key)
        assert first == second


class CountingEnv(gym.Env):
    """Observation = steps taken / 10, reward 1 every step, never terminates by itself; registered with a 4-step
    time limit, so every episode ends by truncation with final observation [0.4]."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, continuous=False):
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t / 10], np.float32), 1.0, False, False, {}


gym.register("TrpoCountingDiscrete-v0", entry_point=CountingEnv, max_episode_steps=4)
gym.register("TrpoCountingBox-v0", entry_point=lambda: CountingEnv(continuous=True), max_episode_steps=4)


class FrozenRunningMeanStd(trpo.RunningMeanStd):
    """Fixed statistics: observations (x - 0.2) / 0.2, rewards / 2 (RewardScaler's return_rms is one of these
    too, with a count so large that a rollout's returns move its variance by ~1e-13: RewardScaler merges them
    itself, without update()). With NORM_EPS patched to 0 the final observation [0.4] becomes exactly [1.0] and
    a reward of 1 0.5."""

    def __init__(self, shape, device):
        super().__init__(shape, device)
        if shape == ():
            self.var.fill_(4.0)
            self.count = 1e15
        else:
            self.mean.fill_(0.2)
            self.var.fill_(0.04)

    def update(self, batch):
        pass


@pytest.mark.parametrize("env_id,normalised", [("TrpoCountingDiscrete-v0", False), ("TrpoCountingBox-v0", True)])
def test_time_limit_is_bootstrapped_on_the_normalised_scale(tmp_path, monkeypatch, env_id, normalised):
    """At a time limit the reward GAE sees is r + gamma * V(s_final): without normalisation 1 + gamma V([0.4]);
    with it, the scaled reward 0.5 plus gamma * V of the normalised final observation [1.0]."""
    monkeypatch.chdir(tmp_path)
    critics, seen = [], []

    class SpyCritic(trpo.Critic):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            critics.append(self)

    def spy_gae(rewards, values, dones, last_value, gamma, gae_lambda):
        if not seen:  # first iteration: the critic has not been updated yet
            with torch.no_grad():
                v_final = critics[0](torch.tensor([[1.0 if normalised else 0.4]])).item()
            seen.append((rewards.clone(), dones.clone(), gamma * v_final))
        return original_gae(rewards, values, dones, last_value, gamma, gae_lambda)

    original_gae = trpo.compute_gae
    monkeypatch.setattr(trpo, "Critic", SpyCritic)
    monkeypatch.setattr(trpo, "compute_gae", spy_gae)
    monkeypatch.setattr(trpo, "RunningMeanStd", FrozenRunningMeanStd)
    monkeypatch.setattr(trpo, "NORM_EPS", 0.0)
    flags = [] if normalised else ["--no-norm-obs", "--no-norm-reward"]
    trpo.main(["--env-id", env_id, "--total-timesteps", "32", "--num-envs", "2", "--num-steps", "16",
               "--num-minibatches", "2", "--vf-iters", "1", *flags])
    rewards, dones, bootstrap = seen[0]
    ends = torch.zeros(16, 2)
    ends[3::4] = 1.0
    torch.testing.assert_close(dones, ends)
    reward = 0.5 if normalised else 1.0
    torch.testing.assert_close(rewards, reward + bootstrap * ends)
    assert abs(bootstrap) > 1e-3  # the check above would be vacuous if V(s_final) were 0


class BigObservationEnv(CountingEnv):
    """CountingEnv with float64 observations 1e6 + steps / 10: float32 cannot hold them (its spacing at 1e6 is
    1/16), so normalising a float32 copy gives other numbers than normalising the observation."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)  # t = 0
        return np.array([1e6]), {}

    def step(self, action):
        self.t += 1
        return np.array([1e6 + self.t / 10]), 1.0, False, False, {}


gym.register("TrpoBigObservation-v0", entry_point=BigObservationEnv, max_episode_steps=4)


class MillionRunningMeanStd(trpo.RunningMeanStd):
    """Fixed statistics: observations (x - 1e6) / 0.1."""

    def __init__(self, shape, device):
        super().__init__(shape, device)
        self.mean.fill_(1e6)
        self.var.fill_(0.01)

    def update(self, batch):
        pass


def test_evaluation_feeds_the_policy_what_training_feeds_it(tmp_path, monkeypatch):
    """The same raw observations, step by step of an episode, reach the policy as the same input in the rollout
    and in evaluate(): the float64 observation normalised with the float64 statistics, then cast."""
    monkeypatch.chdir(tmp_path)
    inputs = []

    class SpyPolicy(trpo.CategoricalPolicy):
        def forward(self, obs):
            inputs.append(obs.detach().clone())
            return super().forward(obs)

    monkeypatch.setattr(trpo, "make_policy", lambda obs_dim, action_space: SpyPolicy(obs_dim, action_space.n))
    monkeypatch.setattr(trpo, "RunningMeanStd", MillionRunningMeanStd)
    trpo.main(["--env-id", "TrpoBigObservation-v0", "--total-timesteps", "4", "--num-envs", "1", "--num-steps", "4",
               "--num-minibatches", "1", "--vf-iters", "1", "--no-norm-reward", "--save-model",
               "--eval-episodes", "1"])
    rollout = [x.reshape(1) for x in inputs if x.shape == (1, 1)]  # one env: [N = 1, obs_dim = 1] per step
    evaluation = [x for x in inputs if x.shape == (1,)]  # one observation at a time
    assert len(rollout) == len(evaluation) == 4  # both: the steps 0..3 of one episode
    for t, (seen_in_training, seen_in_evaluation) in enumerate(zip(rollout, evaluation)):
        assert torch.equal(seen_in_evaluation, seen_in_training), t
    assert rollout[3].item() == pytest.approx(3.0, rel=1e-6)  # (1e6 + 0.3 - 1e6) / sqrt(0.01 + 1e-8)
    rms = MillionRunningMeanStd((1,), torch.device("cpu"))
    assert not torch.equal(rms.normalize(torch.tensor([1e6 + 0.3], dtype=torch.float32)), rollout[3])  # not vacuous


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
        (["--env-id", "Blackjack-v1"], "this script needs a flat Box"),
        (["--num-minibatches", "3"], "does not divide the batch size 2048"),
        (["--vf-lr", "0"], "--vf-lr must be > 0"),
    ],
)
def test_bad_input_exits_before_training(tmp_path, argv, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "trpo.py"), *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damping", ["0", "-0.1"])
def test_cg_damping_must_be_positive(tmp_path, monkeypatch, damping):
    """F alone can be singular: without damping, CG can meet a direction of zero curvature."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        trpo.main([*TINY, "--cg-damping", damping])
    message = str(exit_info.value)
    assert message.startswith("error: --cg-damping must be > 0 ") and message.endswith(f"got {float(damping)}")
    assert "\n" not in message
    assert not (tmp_path / "runs").exists()


class OddSpacesEnv(CountingEnv):
    """CountingEnv with the observation or action space replaced, for the spaces this script refuses."""

    def __init__(self, observation_space=None, action_space=None):
        super().__init__()
        self.observation_space = observation_space or self.observation_space
        self.action_space = action_space or self.action_space


gym.register("TrpoMultiDiscrete-v0", entry_point=lambda: OddSpacesEnv(action_space=gym.spaces.MultiDiscrete([2, 3])))
gym.register("TrpoUnboundedBox-v0",
             entry_point=lambda: OddSpacesEnv(action_space=gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)))
gym.register("TrpoImageObs-v0",
             entry_point=lambda: OddSpacesEnv(observation_space=gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--env-id", "TrpoMultiDiscrete-v0"], "MultiDiscrete action space; this script needs Discrete or a bounded"),
        (["--env-id", "TrpoUnboundedBox-v0"], "unbounded Box action space"),
        (["--env-id", "TrpoImageObs-v0"], "this script needs a flat Box"),
        (["--max-kl", "0"], "--max-kl must be > 0"),
        (["--backtrack-coef", "1"], "--backtrack-coef must be in (0, 1)"),
        (["--total-timesteps", "100"], "smaller than one batch"),
    ],
)
def test_bad_input_in_process(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        trpo.main(argv)
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


def test_checkpoint_from_another_script_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"script": "ppo_continuous", "model": {}, "args": {}}, path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "trpo.py"), "--eval-checkpoint", str(path)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "written by ppo_continuous.py, not trpo.py" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_nan_value_loss_stops_with_iteration_and_minibatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def nan_value_loss(new_values, old_values, returns, clip_coef):
        return new_values.mean() * float("nan")

    monkeypatch.setattr(trpo, "value_loss", nan_value_loss)
    with pytest.raises(SystemExit, match=r"value_loss is nan at iteration 1, minibatch 1 "):
        trpo.main(["--env-id", "CartPole-v1", *TINY, "--save-model"])
    assert not list(tmp_path.glob("runs/*/trpo.pt"))


def test_nan_surrogate_stops_in_the_policy_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = trpo.surrogate
    monkeypatch.setattr(trpo, "surrogate", lambda new, old, adv: original(new, old, adv) * float("nan"))
    with pytest.raises(SystemExit, match=r"surrogate is nan at iteration 1, in the policy step"):
        trpo.main(["--env-id", "Pendulum-v1", *TINY, "--save-model"])
    assert not list(tmp_path.glob("runs/*/trpo.pt"))
