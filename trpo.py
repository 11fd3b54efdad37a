"""TRPO: natural gradient by conjugate gradient, a KL-bounded step and a backtracking line search, in one file.

Run:
    python trpo.py                                              # CartPole-v1, 500k steps, categorical policy
    python trpo.py --env-id Hopper-v4 --total-timesteps 1000000 # any bounded Box action space: Gaussian policy
    python trpo.py --eval-checkpoint runs/<run_name>/trpo.pt    # evaluate a saved agent
    python trpo.py --save-every 50                              # a checkpoint every 50 iterations, then, after a kill:
    python trpo.py --save-every 50 --resume runs/<run_name>/trpo.pt   # go on where it was
    torchrun --standalone --nproc-per-node 2 trpo.py --env-id Hopper-v4   # 2 processes, each with its own envs
    python trpo.py --help                                       # every flag, with its meaning

The policy head is chosen from the env: softmax over logits for a Discrete action space, a diagonal Gaussian with
a state-independent log-std for a bounded Box action space.

What it implements, by section of the article "PPO and TRPO -- Trust Region Policy Optimization":
    "Importance sampling"          r = pi_theta(a|s) / pi_old(a|s), L = E[r A]            -> surrogate
    "The constrained problem"      max L  s.t.  mean KL(pi_old || pi_theta) <= delta     -> trpo_update
                                   the mean KL, exactly, per state                        -> categorical_kl, gaussian_kl
    "Natural gradient"             KL ~ 1/2 dtheta^T F dtheta, F = E[grad log pi grad log pi^T];
                                   F v as the Hessian-vector product of the mean KL      -> fisher_vector_product
                                   solve F x = g without forming F                        -> conjugate_gradient
                                   step = sqrt(2 delta / (x^T F x)) * x                   -> trpo_update
                                   backtrack until KL <= delta and L improves, else keep  -> line_search
    "Parameter space lies"         Gaussian policy, KL measured in distribution space     -> GaussianPolicy, gaussian_kl
    "A complete PPO implementation" GAE (the same function as the PPO scripts)            -> compute_gae
    "Debugging checklist"          approx KL k1 / k3, explained variance        -> approx_kl, explained_variance
    "Common failure modes"         running observation / reward normalisation             -> RunningMeanStd, RewardScaler
The monotonic-improvement bound (Kakade & Langford 2002; Schulman et al. 2015) is why the constraint is on the KL:
    J(pi_new) >= L_{pi_old}(pi_new) - C * D_KL^max(pi_old || pi_new),   C = 4 eps gamma / (1 - gamma)^2
with eps the largest advantage magnitude. It is theory only here: as the article says, C is too pessimistic, so
TRPO swaps the penalty for the hard constraint above and the max KL for the mean KL (cheap to estimate).

Differences from Spinning Up's trpo and sb3-contrib's TRPO, each on purpose (the README says why):
    - vectorised envs with gymnasium 1.x SAME_STEP autoreset: a time-limit truncation is bootstrapped with
      gamma * V(final observation) (on the normalised scale when rewards are scaled), no update ever uses a
      transition across an autoreset;
    - observation and reward normalisation run inside the script, on statistics kept on the device, saved in the
      checkpoint and frozen when a checkpoint is evaluated (sb3 needs the VecNormalize file saved beside the model);
    - every piece of the update (CG, Fisher-vector product, line search) is a module-level function that the
      tests call directly, and each iteration logs what the line search did and why.
"""

from __future__ import annotations

import collections
import datetime
import gc
import glob
import importlib.util
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro

SCRIPT = "trpo"
NORM_CLIP = 10.0  # normalised observations and scaled rewards are clipped to +-10 (cleanrl, Stable-Baselines3)
NORM_EPS = 1e-8  # added to variances before the square root (gymnasium's normalisation wrappers)


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name runs/<env>__<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """if set, cuDNN picks deterministic kernels (`torch.backends.cudnn.deterministic = True`)"""
    cuda: bool = False
    """run the networks, the rollout buffer and the normalisation on the GPU if there is one (else a notice, CPU)"""
    torch_threads: int = 1
    """CPU threads torch may use; 1 is fastest for 64-unit MLPs on small batches (benchmarks/SPEED.md)"""
    track: bool = False
    """log to Weights & Biases (works with WANDB_MODE=offline; a wandb error never stops training)"""
    wandb_project_name: str = "trust-region-rl"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user); None: your default entity"""
    capture_video: bool = False
    """record episodes of env 0 to videos/<run_name>/ (needs moviepy, and pygame for classic control)"""
    save_model: bool = False
    """write runs/<run_name>/trpo.pt at the end (everything --resume needs), then evaluate it"""
    save_every: int = 0
    """also write that checkpoint every this many iterations (0: never), replacing the last one atomically"""
    resume: Optional[str] = None
    """a checkpoint to go on from, in its run's folder, with the same flags (--total-timesteps may be raised)"""
    eval_checkpoint: Optional[str] = None
    """if set: no training; load this checkpoint, run --eval-episodes episodes and print mean/std return"""
    eval_episodes: int = 10
    """episodes run by the evaluation after --save-model and by --eval-checkpoint (greedy: argmax / Gaussian mean)"""
    dist_timeout_s: float = 300.0
    """under torchrun: seconds a rank waits in a collective for the others before the run fails (a rank died)"""

    # Environment and rollout
    env_id: str = "CartPole-v1"
    """gymnasium id of an env with a flat Box observation and a Discrete or bounded 1-D Box action space"""
    total_timesteps: int = 500_000
    """environment steps in total, summed over the parallel envs and the ranks under torchrun (500k: the CartPole
    benchmark; MuJoCo: 1000000)"""
    num_envs: int = 2
    """environments (per rank under torchrun), stepped one after another (SameStepVectorEnv); rl-baselines3-zoo's
    TRPO settings use n_envs 2"""
    num_steps: int = 1024
    """steps per env per rollout; batch = num_envs * num_steps = 2048, sb3-contrib TRPO's n_steps 2048
    (rl-baselines3-zoo MuJoCo: 2 envs x 1024); Spinning Up uses 4000. Per rank under torchrun: x ranks"""
    gamma: float = 0.99
    """discount factor (sb3-contrib and Spinning Up: 0.99)"""
    gae_lambda: float = 0.95
    """GAE lambda: 0 is one-step TD, 1 the Monte-Carlo return (sb3-contrib: 0.95; Spinning Up: lam 0.97)"""
    norm_obs: bool = True
    """normalise observations by running mean/std, clipped to +-10 (sb3 VecNormalize, which rl-baselines3-zoo
    turns on for TRPO on MuJoCo, though its statistics skip episodes' final observations and ours count them);
    the statistics are saved in the checkpoint and frozen at evaluation"""
    norm_reward: bool = True
    """divide rewards by the running std of the discounted return, clipped to +-10 (sb3 VecNormalize)"""

    # Policy step: natural gradient, trust region, line search
    max_kl: float = 0.01
    """delta, the bound on the mean KL(pi_old || pi_theta) (article: ~0.01; sb3-contrib target_kl 0.01;
    Spinning Up delta 0.01)"""
    norm_adv: bool = True
    """normalise advantages to zero mean and unit std over the batch (sb3-contrib normalize_advantage=True;
    Spinning Up does it too); the one policy step sees the whole batch"""
    cg_iters: int = 10
    """conjugate-gradient iterations, each one Fisher-vector product (Spinning Up cg_iters 10;
    sb3-contrib cg_max_steps 15; rl-baselines3-zoo MuJoCo 25)"""
    cg_damping: float = 0.1
    """lambda of F + lambda I, > 0: keeps CG well posed where F is singular (sb3-contrib and Spinning Up: 0.1)"""
    backtrack_coef: float = 0.8
    """each rejected step is shrunk by this factor (sb3-contrib line_search_shrinking_factor 0.8, Spinning Up
    backtrack_coeff 0.8; the article's 'halving' is 0.5)"""
    backtrack_iters: int = 10
    """step sizes tried: full, coef, coef^2, ...; then the old parameters are kept (sb3-contrib
    line_search_max_iter 10, Spinning Up backtrack_iters 10)"""

    # Value function: a separate network fitted by Adam
    vf_lr: float = 1e-3
    """Adam step size of the critic (sb3-contrib learning_rate 1e-3, Spinning Up vf_lr 1e-3)"""
    vf_iters: int = 10
    """epochs of minibatch Adam on the critic per iteration (sb3-contrib n_critic_updates 10;
    rl-baselines3-zoo MuJoCo 20; Spinning Up: 80 full-batch steps)"""
    num_minibatches: int = 16
    """critic minibatches per epoch; must divide the batch (16 x 128 = 2048: sb3-contrib batch_size 128); under
    torchrun each rank splits its own batch, and a minibatch step averages the ranks' gradients"""


# ----------------------------------------------------------------------------------------------------------
# Pure functions shared with the PPO scripts: copied verbatim from ppo_discrete.py (tests/test_contract.py)
# ----------------------------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), backwards over a rollout.

    rewards, values, dones: [T, N]. dones[t] = 1 when the episode ended with transition t (terminated, or
    truncated with gamma * V(final obs) already added to rewards[t]); then nothing flows back across t.
    last_value: [N], V of the observation after step T-1.

        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t            (TD error)
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
        returns = A + V                                                 (the value target)

    Example, one env, gamma = 0.5, lambda = 1, values 0:
        rewards [[1], [1], [1]], dones [[0], [1], [0]], last_value [2]
        t=2: 1 + 0.5*2 = 2;  t=1: episode ends, 1;  t=0: 1 + 0.5*1 = 1.5  ->  advantages [[1.5], [1.], [2.]]
    """
    not_done = 1.0 - dones
    next_values = torch.cat([values[1:], last_value.unsqueeze(0)])  # V_{t+1}: [T, N]
    deltas = rewards + gamma * next_values * not_done - values  # all T TD errors at once
    decay = gamma * gae_lambda * not_done
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(last_value)
    # Row views made once (unbind): indexing three tensors every step costs about as much as the step's arithmetic.
    deltas_t, decays_t, advantages_t = deltas.unbind(0), decay.unbind(0), advantages.unbind(0)
    for t in reversed(range(rewards.shape[0])):
        next_advantage = deltas_t[t] + decays_t[t] * next_advantage
        advantages_t[t].copy_(next_advantage)  # advantages_t[t] is a view: this writes row t of advantages
    return advantages, advantages + values


def normalize_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std; applied per minibatch, as the article's checklist asks."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def approx_kl(new_logprob: torch.Tensor, old_logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sample estimates of KL(pi_old || pi_theta) from actions drawn from pi_old (Schulman's k1 and k3).

    k1 = mean(-log r): unbiased, but single samples can be negative.
    k3 = mean((r - 1) - log r): unbiased and >= 0 per sample (log r <= r - 1); the one the article prefers.
    (The "one-sample" k2 = mean(0.5 * (log r)^2) that the article warns about is biased; it is not used.)
    """
    logratio = new_logprob - old_logprob
    k1 = (-logratio).mean()
    k3 = (logratio.exp() - 1.0 - logratio).mean()
    return k1, k3


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_coef: Optional[float]
) -> torch.Tensor:
    """0.5 * MSE to the returns; with clip_coef, the PPO2 clipped form.

    Clipped: V_clip = V_old + clip(V_new - V_old, -c, c), loss = 0.5 * mean(max((V_new - R)^2, (V_clip - R)^2)),
    so a minibatch cannot move a value prediction more than c (in return units) past where it helps.
    """
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped.mean()
    clipped_values = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped).mean()


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """1 - Var(y_true - y_pred) / Var(y_true): 1 is a perfect critic, 0 no better than a constant, < 0 worse.
    NaN when Var(y_true) == 0 (nothing to explain)."""
    var_true = y_true.var(correction=0)
    ev = 1.0 - (y_true - y_pred).var(correction=0) / var_true
    return torch.where(var_true == 0, torch.full_like(ev, float("nan")), ev)


def categorical_logprob_entropy(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|s) of the given actions and the entropy of pi(.|s), from logits [B, A] and actions [B].
    Written out instead of torch.distributions.Categorical: the same numbers, no distribution object per call."""
    log_probs = logits.log_softmax(dim=-1)  # [B, A]
    logprob = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [B]
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # [B]
    return logprob, entropy


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """One action per row of logits [B, A], drawn from softmax(logits), by the Gumbel-max trick:
    argmax(logits + g) with Gumbel noise g = -log(E), E ~ Exp(1). The same distribution as torch.multinomial
    of the softmax, with fewer ops."""
    gumbel = -torch.empty_like(logits).exponential_().log()
    return (logits + gumbel).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Pure functions of this script: the distributions' log-probs and KLs, and the TRPO solver pieces
# ----------------------------------------------------------------------------------------------------------


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of a diagonal Gaussian N(mean, exp(log_std)^2), summed over the last (action) dimension.

    The action dimensions are drawn independently, so the joint density is the product of the per-dimension
    densities and its log the sum of
        log N(a; mu, sigma) = -(a - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2.
    mean, actions: [..., D]; log_std: [D] (state-independent) or [..., D]. Returns [...].
    Written out instead of torch.distributions.Normal: the same numbers, no distribution object per call.

    Example: mean [0, 0], log_std [0, 0], action [1, 0] -> -0.5 - log(2 pi) = -2.3379.
    """
    z = (actions - mean) * (-log_std).exp()  # (a - mu) / sigma: the action in standard deviations from the mean
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(dim=-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, summed over the last (action) dimension:
    H = sum_d (log sigma_d + (1 + log 2 pi) / 2). It does not depend on the mean; with a state-independent
    log_std it is the same for every state. Example: log_std [0] -> 1.4189; log_std [0, log 2] -> 3.5310."""
    return (log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(dim=-1)


def categorical_kl(old_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_old || pi_new) = sum_a p_old(a) (log p_old(a) - log p_new(a)) per row of logits [B, A] -> [B].

    Example: p_old = (0.5, 0.5), p_new = (0.25, 0.75) -> 0.5 log 2 + 0.5 log(2/3) = 0.1438.
    """
    old_log_probs = old_logits.log_softmax(dim=-1)  # [B, A]
    new_log_probs = new_logits.log_softmax(dim=-1)  # [B, A]
    return (old_log_probs.exp() * (old_log_probs - new_log_probs)).sum(dim=-1)


def gaussian_kl(
    old_mean: torch.Tensor, old_log_std: torch.Tensor, new_mean: torch.Tensor, new_log_std: torch.Tensor
) -> torch.Tensor:
    """Exact KL(pi_old || pi_new) of two diagonal Gaussians, summed over the last dimension: [B, D] -> [B].

    Per dimension: log(sigma_new / sigma_old) + (sigma_old^2 + (mu_old - mu_new)^2) / (2 sigma_new^2) - 1/2.
    Example: mu 0 -> 1 with sigma 1 -> 1: 0 + (1 + 1) / 2 - 1/2 = 0.5 per dimension. The article's "parameter
    space lies" pair, N(0, 0.01) vs N(0, 10), read as standard deviations: close parameters, yet
    KL = log(10 / 0.01) + 0.01^2 / (2 * 10^2) - 1/2 = 6.41 nats.
    """
    variance_ratio = (2.0 * (old_log_std - new_log_std)).exp()  # sigma_old^2 / sigma_new^2
    mean_term = (old_mean - new_mean) ** 2 * (-2.0 * new_log_std).exp()  # (mu_old - mu_new)^2 / sigma_new^2
    return (new_log_std - old_log_std + 0.5 * (variance_ratio + mean_term) - 0.5).sum(dim=-1)


def surrogate(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The importance-sampled surrogate L(theta) = mean(r A), r = pi_theta(a|s) / pi_old(a|s) = exp(new - old).

    At theta = theta_old, r = 1, so grad L = mean(A grad log pi): the policy gradient, the gradient of the
    expected return J. Only the gradients match: L(theta_old) = mean(A) (0 with --norm-adv), while J(theta_old)
    is the expected return itself. The article ("Importance sampling") is loose there: it says "the same value
    and gradient"; only the gradient holds, which is all a step needs. TRPO maximises L; no clip.

    Example: new - old = log 2 on one sample with A = 3, and 0 on one with A = -1 -> mean(6, -1) = 2.5.
    """
    ratio = (new_logprob - old_logprob).exp()
    return (ratio * advantages).mean()


def flat_params(module: nn.Module) -> torch.Tensor:
    """All parameters of `module`, in .parameters() order, as one detached 1-D tensor (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def set_flat_params(module: nn.Module, flat: torch.Tensor) -> None:
    """Write a 1-D tensor laid out as flat_params(module) back into the parameters, in place.
    Inverse of flat_params: set_flat_params(m, flat_params(m)) changes nothing."""
    total = sum(p.numel() for p in module.parameters())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries, the module has {total} parameters")
    offset = 0
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def flat_grad(
    output: torch.Tensor,
    params: Sequence[torch.Tensor],
    retain_graph: Optional[bool] = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """d output / d params for a scalar output, concatenated into one 1-D tensor in the order of `params`.
    A parameter the output does not depend on gets zeros. create_graph=True builds the graph of the gradient
    itself, so that it can be differentiated again (what fisher_vector_product needs); retain_graph keeps the
    forward graph for another gradient (None: as torch.autograd.grad, i.e. equal to create_graph)."""
    grads = torch.autograd.grad(output, params, retain_graph=retain_graph, create_graph=create_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def fisher_vector_product(
    kl_grad: torch.Tensor, params: Sequence[torch.Tensor], vector: torch.Tensor, damping: float
) -> torch.Tensor:
    """(F + damping I) v without forming F: the Hessian-vector product of the mean KL, by double backprop.

    kl_grad: flat_grad(mean_kl, params, create_graph=True), where mean_kl = mean_s KL(pi_old(.|s) || pi_theta(.|s))
             with pi_old held fixed (detached) and evaluated at theta = theta_old.
    params:  the policy parameters, in the order kl_grad was taken in.
    vector:  v, 1-D, same length as kl_grad.

    At theta_old the KL and its gradient are 0 and its Hessian is the Fisher matrix,
        d^2 KL / d theta^2 = F = E_s E_{a ~ pi_old}[grad log pi(a|s) grad log pi(a|s)^T]
    (article, "Natural gradient": KL ~ 1/2 dtheta^T F dtheta). Since kl_grad . v is a scalar,
        F v = grad_theta (kl_grad . v),
    one more backward pass per product: "two autograd passes", the first shared by every product of a CG solve.
    damping * v is added (F + damping I), as Spinning Up and sb3-contrib do, so CG never meets a zero
    curvature direction (F is singular wherever parameters do not change the policy on the batch).
    """
    hessian_vector = flat_grad(kl_grad @ vector, params, retain_graph=True)
    return hessian_vector + damping * vector


def conjugate_gradient(
    Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, n_steps: int = 10, residual_tol: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve A x = b for symmetric positive-definite A, given only v -> A v. Returns (x, r^T r).

    Conjugate gradient from x = 0 (so the first residual r = b - A x is b):
        alpha = r^T r / p^T A p;  x += alpha p;  r -= alpha A p;  p = r + (r_new^T r_new / r^T r) p
    at most n_steps products A p, stopping as soon as the squared residual norm r^T r = |b - A x|^2 is <= residual_tol
    (checked before each product, so an exact solution costs no further product). The second return value is that
    squared residual norm at exit. In exact arithmetic CG solves an n x n system in n steps, and in k steps when A
    has k distinct eigenvalues. TRPO calls it with A = F + damping I and b = g (article, "Conjugate gradient").

    CG assumes A positive definite. On a direction of non-positive curvature (p^T A p <= 0, or not finite) it
    stops with the current x instead of dividing by p^T A p: for the first step that is x = 0, whose TRPO step is
    0, which the line search then rejects. With damping > 0 (check_args) F + damping I is positive definite, so
    only rounding or a non-finite F v gets there; where p^T A p > 0 every number is what it was without the check.

    Example: A = diag(2, 2), b = [2, 4] -> one product: alpha = 20 / 40, x = [1, 2], r = 0.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = r @ r
    for _ in range(n_steps):
        if rdotr <= residual_tol:
            break
        Ap = Avp(p)
        curvature = p @ Ap
        if not 0.0 < curvature.item() < math.inf:  # NaN fails this too
            break
        alpha = rdotr / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        new_rdotr = r @ r
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x, rdotr


class LineSearchResult(NamedTuple):
    params: torch.Tensor  # the accepted flat parameters, or the old ones
    accepted: bool  # False: no step size satisfied both conditions, the old parameters are kept
    backtracks: int  # times the step was shrunk before acceptance; backtrack_iters when nothing was accepted
    step_fraction: float  # coef ** backtracks of the full step that was taken (0.0 when none)
    surrogate: float  # L at the returned parameters
    kl: float  # mean KL(pi_old || pi) at the returned parameters (0.0 when the old ones are kept)


def line_search(
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    old_params: torch.Tensor,
    full_step: torch.Tensor,
    surrogate_old: float,
    max_kl: float,
    backtrack_coef: float,
    backtrack_iters: int,
) -> LineSearchResult:
    """Backtracking line search along the natural-gradient step (article, "Natural gradient", trick 2).

    Tries theta = theta_old + coef^j * full_step for j = 0, 1, ..., backtrack_iters - 1 and accepts the first one
    whose measured mean KL is <= max_kl AND whose surrogate is strictly above surrogate_old. The quadratic model
    behind full_step can be loose in both respects; the check keeps the update inside the trust region and never
    lets it make the surrogate worse. If no j passes, returns old_params (accepted False): no update this time.

    evaluate(flat_params) -> (L, mean KL) at those parameters; it may load them into the policy (the caller loads
    result.params afterwards). Costs one evaluation per try, usually one in all.
    """
    for backtracks in range(backtrack_iters):
        step_fraction = backtrack_coef**backtracks
        params = old_params + step_fraction * full_step
        surrogate_new, kl = (float(v) for v in evaluate(params))
        if kl <= max_kl and surrogate_new > surrogate_old:  # False for NaN too: a NaN step is never taken
            return LineSearchResult(params, True, backtracks, step_fraction, surrogate_new, kl)
    return LineSearchResult(old_params, False, backtrack_iters, 0.0, surrogate_old, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Running normalisation of observations and rewards (the article's "Common failure modes")
# ----------------------------------------------------------------------------------------------------------


class RunningMeanStd:
    """Running mean and variance of a stream of batches: float64 tensors on `device`.

    update(batch) merges a batch [B, *shape] with Chan et al.'s parallel formula (the batch form of Welford's
    update), so after any sequence of batches mean and var are those of all the data seen (var with
    correction 0). Before the first batch: mean 0, var 1, count 0, so normalize() is the identity.
    With n samples so far, n_b in the batch and w = n_b / (n + n_b) the batch's weight:

        delta = mean_b - mean
        mean' = mean + w * delta
        var'  = (1 - w) * var + w * var_b + w * (1 - w) * delta^2

    update() and normalize() run at every env step, so they compute on compute_array views of the tensors
    (numpy on the CPU, the same memory); the tensors are what is saved, loaded and read. Input of any float
    dtype, tensor or numpy array; copy.deepcopy and pickle give an independent, working copy.

    Example: update([[1.], [3.]]) then update([[5.]]) -> mean 3, var 8/3 (those of [1, 3, 5]).
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.var = torch.ones(shape, dtype=torch.float64, device=device)
        self.count = 0.0  # a Python float: exact up to 2^53 samples, and no tensor op per update
        self._make_views()

    def _make_views(self) -> None:
        """What update() and normalize() compute on: numpy views of mean and var on the CPU (the same memory),
        the tensors themselves elsewhere. mean and var are only ever changed in place, so the views stay valid."""
        self._views = compute_array(self.mean, self.mean.device), compute_array(self.var, self.var.device)

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle copy the tensors; views of the old tensors must not come along
        return {key: value for key, value in self.__dict__.items() if key != "_views"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_views()

    def update(self, batch) -> None:
        """Merge batch [B, *shape] (a tensor or a numpy array; float64 for full precision) into the statistics,
        in place."""
        mean, var = self._views
        batch = compute_array(batch, self.mean.device)
        n = batch.shape[0]
        if n == 1:  # one observation (one env, every step): it is the batch's mean, and var_b = 0 drops out
            batch_mean, batch_var = batch[0], None
        else:
            batch_mean = batch.mean(0)
            batch_var = ((batch - batch_mean) ** 2).mean(0)
        self.count += n
        w = n / self.count
        delta = batch_mean - mean
        mean += w * delta
        var *= 1.0 - w
        if batch_var is not None:
            var += w * batch_var
        var += (w * (1.0 - w)) * delta**2

    def normalize(self, x) -> torch.Tensor:
        """(x - mean) / sqrt(var + 1e-8), clipped to +-10, as a float32 tensor on the device. x: a tensor or a
        numpy array. Reads the statistics, never updates them."""
        mean, var = self._views
        z = ((compute_array(x, self.mean.device) - mean) / (var + NORM_EPS) ** 0.5).clip(-NORM_CLIP, NORM_CLIP)
        if isinstance(z, np.ndarray):
            return torch.from_numpy(z.astype(np.float32))
        return z.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies, as tensors only, so a checkpoint holding it loads with torch.load(weights_only=True)."""
        return {
            "mean": self.mean.to("cpu", copy=True),
            "var": self.var.to("cpu", copy=True),
            "count": torch.tensor(self.count, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies in, into the statistics' own tensors (later in-place updates never write into `state`)."""
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])
        self.count = float(state["count"])


class RewardScaler:
    """Divides each reward by the running std of the discounted return, clips to +-10 (Engstrom et al. 2020's
    "reward scaling"; the article's fix for "critic predictions explode").

    Per env, G_t = r_t + gamma * G_{t-1} accumulates over the current episode and restarts at 0 after the
    episode ends (terminated or truncated: the next reward belongs to a new episode). Reward t is divided by the
    std of every G seen up to and including step t (all envs, all earlier calls). The rewards are only divided,
    never shifted, so their sign (and what is good or bad) is kept.

    One call scales a whole rollout [T, N] and gives what T calls of one step each would give: the scaled
    rewards are first needed by GAE, after the rollout, and scaling step by step inside the rollout would cost
    a dozen small tensor ops per env step.

    Example, one env, gamma 0.5: rewards [[2], [2]] -> returns 2, 3 -> stds 0 (one return) and 0.5 ->
    scaled [[10], [4]] (2 / sqrt(0 + 1e-8), clipped to 10; then 2 / 0.5).
    """

    def __init__(self, num_envs: int, gamma: float, device: torch.device):
        self.gamma = gamma
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=device)  # [N], carried across calls
        self.return_rms = RunningMeanStd((), device)

    def __call__(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        """rewards, dones: [T, N] tensors of any dtype, in step order; returns the scaled rewards [T, N] as float64
        on the scaler's device (the returns and their statistics are computed in float64)."""
        rewards = rewards.to(self.returns.device, torch.float64)  # the loop below writes into views of float64
        T, N = rewards.shape
        returns = torch.empty_like(rewards)  # G_t: [T, N]
        # T dependent steps on N numbers each: on compute_array views (numpy on the CPU), as RunningMeanStd does
        r, keep, running, out = (
            compute_array(x, rewards.device) for x in (rewards, 1.0 - dones.to(rewards.dtype), self.returns, returns)
        )
        g = running
        for t in range(T):
            g = r[t] + self.gamma * g  # r_t + gamma * G_{t-1}
            out[t] = g
            g = g * keep[t]
        running[...] = g  # into self.returns
        # Statistics after each step t: those before the call merged with returns[: t + 1]. Written with prefix
        # sums of the deviations from the old mean, so every step's variance comes out at once, without the
        # cancellation of E[x^2] - E[x]^2: M2 = n_old * var_old + sum(d^2) - sum(d)^2 / n.
        rms = self.return_rms
        counts = rms.count + N * torch.arange(1, T + 1, dtype=torch.float64, device=rewards.device)  # [T]
        deviations = returns - rms.mean  # [T, N]
        sum_dev = deviations.sum(dim=1).cumsum(0)  # [T]
        sum_sq = deviations.square().sum(dim=1).cumsum(0)  # [T]
        var = (rms.count * rms.var + sum_sq - sum_dev.square() / counts) / counts  # [T]
        rms.mean += sum_dev[-1] / counts[-1]  # in place: RunningMeanStd computes on views of these tensors
        rms.var.copy_(var[-1])
        rms.count += T * N
        return (rewards / (var + NORM_EPS).sqrt().unsqueeze(1)).clamp(-NORM_CLIP, NORM_CLIP)


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias (implementation detail 2 of Huang et al. 2022)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, out_dim: int, out_std: float, hidden: int = 64) -> nn.Sequential:
    """64-64 tanh MLP (Spinning Up's and sb3's default for TRPO), orthogonal init, last layer gain out_std."""
    return nn.Sequential(
        layer_init(nn.Linear(in_dim, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, out_dim), std=out_std),
    )


class CategoricalPolicy(nn.Module):
    """pi(a|s) = softmax(logits(s)) for a Discrete action space. The distribution is passed around as the tuple
    (logits [B, A],), so that both policies share one interface: forward, log_prob_entropy, kl, sample, mode.
    The last layer starts at gain 0.01 so the first policy is near uniform."""

    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.net = mlp(obs_dim, n_actions, out_std=0.01)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.net(obs),)

    def log_prob_entropy(self, dist: tuple[torch.Tensor, ...], actions: torch.Tensor):
        return categorical_logprob_entropy(dist[0], actions)

    def kl(self, old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return categorical_kl(old[0], new[0])

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """a ~ pi(.|s) for each row of obs [B, obs_dim]: [B] action indices."""
        return sample_categorical(self(obs)[0])

    def mode(self, dist: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return dist[0].argmax(dim=-1)

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        return action.cpu().numpy()


class GaussianPolicy(nn.Module):
    """pi(a|s) = N(mu(s), diag(sigma)^2) for a bounded Box action space, with a state-independent log sigma
    (a free parameter, starting at 0: sigma = 1, as in sb3 and cleanrl). The distribution is (mean [B, D],
    log_std [B, D]). Samples are stored and scored unclipped; only the action sent to the env is clipped to the
    bounds (sb3 does the same; the article's tanh squashing would change log pi and is not used here)."""

    def __init__(self, obs_dim: int, action_space: gym.spaces.Box):
        super().__init__()
        action_dim = action_space.shape[0]
        self.net = mlp(obs_dim, action_dim, out_std=0.01)
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean = self.net(obs)
        return mean, self.log_std.expand_as(mean)

    def log_prob_entropy(self, dist: tuple[torch.Tensor, ...], actions: torch.Tensor):
        mean, log_std = dist
        return gaussian_log_prob(mean, log_std, actions), gaussian_entropy(log_std)

    def kl(self, old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return gaussian_kl(old[0], old[1], new[0], new[1])

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """a ~ pi(.|s) for each row of obs [B, obs_dim]: [B, D], unclipped."""
        mean, log_std = self(obs)
        return mean + log_std.exp() * torch.randn_like(mean)

    def mode(self, dist: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return dist[0]

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        return action.clamp(self.low, self.high).cpu().numpy()


Policy = Union[CategoricalPolicy, GaussianPolicy]


def make_policy(obs_dim: int, action_space: gym.Space) -> Policy:
    """The policy head the action space calls for."""
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalPolicy(obs_dim, int(action_space.n))
    return GaussianPolicy(obs_dim, action_space)


class Critic(nn.Module):
    """V(s): a separate 64-64 tanh MLP (not sharing layers with the policy, so the policy step moves only the
    policy and the Fisher matrix is the policy's alone)."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, out_std=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)  # [B]


# ----------------------------------------------------------------------------------------------------------
# The TRPO policy step
# ----------------------------------------------------------------------------------------------------------


def trpo_update(
    policy: Policy,
    obs: torch.Tensor,
    actions: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    max_kl: float,
    cg_iters: int,
    cg_damping: float,
    backtrack_coef: float,
    backtrack_iters: int,
    residual_tol: float = 1e-10,
    world_size: int = 1,
) -> dict:
    """One TRPO step on a batch: maximise L = mean(r A) s.t. mean KL(pi_old || pi_theta) <= max_kl.

    obs [B, obs_dim], actions [B] or [B, D], old_logprob [B] (log pi_old of the actions, pi_old = policy as
    it is on entry), advantages [B]. Steps (article, "TRPO"):
        g    = grad L(theta_old)                                      policy gradient
        x    ~ (F + damping I)^-1 g, by conjugate_gradient on fisher_vector_product
        step = sqrt(2 delta / (x^T F x)) x                            1/2 step^T F step = delta: the quadratic
                                                                      model of the KL sits on the boundary (F
                                                                      damped here too, as Spinning Up and
                                                                      sb3-contrib do: a slightly shorter step)
        line_search: accept theta_old + coef^j step for the first j with KL <= delta and L improved, else keep.
    Leaves the accepted parameters in `policy`. Raises FloatingPointError naming the first non-finite quantity
    among L, |g| and x^T F x. Returns the diagnostics as python numbers (what main logs).

    Under torchrun (world_size > 1, a process group set up) each rank passes its own part of the batch, the same
    size on every rank. g, every F v and the line search's L and KL are then means over the ranks
    (mean_over_ranks, one all-reduce each): those of the whole batch, the same numbers on every rank, so every
    rank solves the same system, takes the same step and accepts or rejects it alike. That is the article's
    "CG needs sync": one all-reduce per conjugate-gradient iteration (benchmarks/SCALING.md measures it).
    """
    params = [p for p in policy.parameters()]
    dist = policy(obs)
    # pi_old, fixed: only pi_theta moves in KL(pi_old || pi_theta). A copy, not a view: the Gaussian's log_std
    # is the parameter itself, which the line search overwrites in place.
    old_dist = tuple(t.detach().clone() for t in dist)
    logprob, entropy = policy.log_prob_entropy(dist, actions)
    surrogate_old = surrogate(logprob, old_logprob, advantages)  # L(theta_old) = mean(A)
    g = mean_over_ranks(flat_grad(surrogate_old, params, retain_graph=True), world_size)  # torchrun: whole batch's
    surrogate_old = mean_over_ranks(surrogate_old.detach(), world_size)
    mean_kl = policy.kl(old_dist, dist).mean()  # 0 at theta_old, but its Hessian there is F
    kl_grad = flat_grad(mean_kl, params, create_graph=True)  # first of the "two autograd passes", shared

    def fvp(v: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(fisher_vector_product(kl_grad, params, v, cg_damping), world_size)  # torchrun: sync

    x, residual = conjugate_gradient(fvp, g, cg_iters, residual_tol)  # natural-gradient direction F^-1 g
    xFx = x @ fvp(x)
    checks = torch.stack([surrogate_old.detach(), g.norm(), xFx.detach()])
    bad = (~torch.isfinite(checks)).nonzero()
    if len(bad):
        name = ("surrogate", "policy_gradient_norm", "xFx")[bad[0].item()]
        raise FloatingPointError(f"{name} is {checks[bad[0].item()].item()}")
    full_step = torch.sqrt(2.0 * max_kl / (xFx.detach() + 1e-8)) * x.detach()  # + 1e-8 as in the article: g = 0
    expected_full = (g @ full_step).item()  # first-order promise g^T step of the full step

    old_params = flat_params(policy)

    def evaluate(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        set_flat_params(policy, flat)
        with torch.no_grad():
            new_dist = policy(obs)
            new_logprob, _ = policy.log_prob_entropy(new_dist, actions)
            both = torch.stack([surrogate(new_logprob, old_logprob, advantages), policy.kl(old_dist, new_dist).mean()])
            surrogate_new, kl = mean_over_ranks(both, world_size)  # torchrun: every rank accepts or rejects alike
            return surrogate_new, kl

    result = line_search(evaluate, old_params, full_step, surrogate_old.item(), max_kl, backtrack_coef,
                         backtrack_iters)
    set_flat_params(policy, result.params)
    with torch.no_grad():
        new_logprob, _ = policy.log_prob_entropy(policy(obs), actions)
        kl_k1, kl_k3 = mean_over_ranks(torch.stack(approx_kl(new_logprob, old_logprob)), world_size)
        entropy = mean_over_ranks(entropy.mean().detach(), world_size)
    return {
        "policy_loss": -result.surrogate,  # -L after the step; L(theta_old) = mean(A), 0 with --norm-adv
        "entropy": entropy.item(),  # of pi_old, the policy that collected the batch
        "kl": result.kl,  # exact mean KL(pi_old || pi_new) over the batch's states after the step
        "approx_kl_k1": kl_k1.item(),
        "approx_kl_k3": kl_k3.item(),
        "step_accepted": result.accepted,
        "backtracks": result.backtracks,
        "surrogate_improvement": result.surrogate - surrogate_old.item(),  # actual L(new) - L(old)
        "expected_improvement": result.step_fraction * expected_full,  # g^T (the step taken)
        "cg_residual": residual.item(),  # |g - (F + damping I) x|^2 when CG stopped
        "step_norm": result.step_fraction * full_step.norm().item(),  # |theta_new - theta_old|
    }


# ----------------------------------------------------------------------------------------------------------
# Training: the article's TRPO loop
# ----------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = tyro.cli(Args, args=argv)
    torch.set_num_threads(args.torch_threads)
    device = pick_device(args.cuda)

    if args.eval_checkpoint is not None:
        try:
            checkpoint = load_checkpoint(args.eval_checkpoint)
            returns = evaluate(checkpoint, args.eval_episodes, args.seed, device)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        print(f"eval {checkpoint['args']['env_id']}: return {returns.mean():.2f} +- {returns.std():.2f} "
              f"over {args.eval_episodes} episodes")
        return {"eval_returns": returns}

    # Every check happens before anything is written, so bad input leaves no run folder behind.
    try:
        check_args(args)
        resume = load_resume(args)  # None without --resume
        obs_dim, action_space = check_env(args.env_id)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    # torchrun: one process per rank, each with its own envs; the batch and minibatch sizes below are per rank.
    rank, world_size, device = setup_distributed(device, args.dist_timeout_s)  # plain python: (0, 1, device)
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // (batch_size * world_size)
    if num_iterations == 0:  # the same on every rank: all stop here, before any collective
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is smaller than one batch of all "
                         f"{world_size} ranks ({batch_size * world_size} steps)")
    if resume is not None and len(resume["ranks"]) != world_size:
        raise SystemExit(f"error: {args.resume} holds {len(resume['ranks'])} ranks' envs; this run has {world_size}")
    run_name = run_dir = None  # only rank 0 writes: the run folder, metrics, wandb, videos, checkpoints
    if rank == 0:
        print(budget_line(args.total_timesteps, batch_size * world_size))
        if resume is None:
            run_name, run_dir = make_run_dir(args.env_id, args.exp_name, args.seed)  # a new folder, never another run's
        else:  # the resumed run's own folder
            run_dir = os.path.dirname(os.path.abspath(args.resume))
            run_name = os.path.basename(run_dir)
        write_json(os.path.join(run_dir, "args.json"), asdict(args))
    logger = Logger(args, run_dir, run_name, num_iterations, resume)  # without a run_dir (ranks > 0) it writes and prints nothing
    stop_signal = StopSignal()  # Ctrl-C or SIGTERM: finish the iteration, then save and close as at the end

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    envs = make_envs(args, run_name)
    policy = make_policy(obs_dim, action_space).to(device)
    critic = Critic(obs_dim).to(device)
    if world_size > 1:  # the networks start the same on every rank (seed above); then each rank samples its own
        torch.manual_seed(args.seed + rank)
    # Only the critic has an optimiser: the policy moves by the natural-gradient step alone.
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.vf_lr, eps=1e-5, fused=True)
    obs_rms = RunningMeanStd((obs_dim,), device) if args.norm_obs else None
    reward_scaler = RewardScaler(args.num_envs, args.gamma, device) if args.norm_reward else None

    # Rollout buffer, preallocated on the device and overwritten every iteration.
    T, N = args.num_steps, args.num_envs
    action_shape = action_space.shape  # () for Discrete, (D,) for Box
    obs = torch.zeros((T, N, obs_dim), device=device)  # normalised, as the policy saw them
    actions = torch.zeros((T, N, *action_shape), dtype=torch.long if action_shape == () else torch.float32,
                          device=device)
    raw_rewards = torch.zeros((T, N), dtype=torch.float64, device=device)  # as the envs return them
    dones = torch.zeros((T, N), device=device)  # 1 where the episode ended with transition t
    truncated_at = torch.zeros((T, N), device=device)  # 1 where it ended by time limit (not terminated)
    final_obs = torch.zeros((T, N, obs_dim), device=device)  # the last observation of those episodes, normalised

    # Episode statistics stay on the host, as SameStepVectorEnv reports them (raw, unscaled returns).
    ended_return, ended_length = np.full((T, N), np.nan), np.zeros((T, N), dtype=np.int64)
    last_100 = collections.deque(maxlen=100)

    def observe(raw: np.ndarray) -> torch.Tensor:
        """The envs' observations [n, obs_dim] -> what the networks see: float32 on the device; with --norm-obs
        normalised with the running statistics (which the caller updates)."""
        if obs_rms is None:
            return torch.as_tensor(raw, dtype=torch.float32, device=device)
        return obs_rms.normalize(raw)

    raw_obs, _ = envs.reset(seed=args.seed + rank * N)  # [N, obs_dim] numpy; env i of rank r: seed + r N + i
    obs_rms_agreed = obs_rms.state_dict() if obs_rms is not None else None  # torchrun: merged after each rollout
    if obs_rms is not None:
        obs_rms.update(raw_obs)
    next_obs = observe(raw_obs)
    global_step, start_time, first_iteration = 0, time.time(), 1

    def training_state(iteration: int) -> dict:
        """Everything --resume needs to go on after `iteration`; every rank's envs and RNGs (a collective)."""
        return {"script": SCRIPT, "args": asdict(args), "policy": cpu_weights(policy), "critic": cpu_weights(critic),
                "critic_optimizer": critic_optimizer.state_dict(),
                "obs_rms": obs_rms.state_dict() if obs_rms is not None else None,
                "return_rms": reward_scaler.return_rms.state_dict() if reward_scaler is not None else None,
                "iteration": iteration, "global_step": global_step, "time": time.time() - start_time,
                "last_100": list(last_100), "wandb_id": logger.wandb_id,
                "ranks": gather_objects({"rng": rng_state(), "envs": vector_env_state(envs), "next_obs": next_obs.cpu(),
                                         "obs_rms_agreed": obs_rms_agreed,
                                         "returns": reward_scaler.returns.cpu() if reward_scaler is not None else None},
                                        world_size)}

    if resume is not None:  # go on from the checkpoint: the same state, so the same run (restore_vector_env_state says so if not)
        policy.load_state_dict(resume["policy"])
        critic.load_state_dict(resume["critic"])
        critic_optimizer.load_state_dict(resume["critic_optimizer"])
        if obs_rms is not None:
            obs_rms.load_state_dict(resume["obs_rms"])
        if reward_scaler is not None:
            reward_scaler.return_rms.load_state_dict(resume["return_rms"])
        first_iteration, global_step = resume["iteration"] + 1, resume["global_step"]
        start_time -= resume["time"]
        last_100.extend(resume["last_100"])
        mine = resume["ranks"][rank]
        obs_rms_agreed = mine["obs_rms_agreed"]
        if restore_vector_env_state(envs, mine["envs"]):
            next_obs = mine["next_obs"].to(device)
            if reward_scaler is not None:
                reward_scaler.returns.copy_(mine["returns"])
        else:  # new episodes: their first observations, normalised with the restored statistics
            next_obs = observe(raw_obs)
        set_rng_state(mine["rng"])

    for iteration in range(first_iteration, num_iterations + 1):
        ended_return.fill(np.nan)
        truncated_at.zero_()

        # ---- rollout: T steps of N envs, each action sampled from pi_old at its step ----
        with torch.inference_mode():  # no autograd here: the rollout only collects data
            for step in range(T):
                obs[step] = next_obs
                action = policy.sample(next_obs)  # [N] or [N, D], a ~ pi_old(.|s)
                actions[step] = action

                raw_obs, reward, terminated, truncated, info = envs.step(policy.env_action(action))
                raw_rewards[step] = torch.as_tensor(reward, device=device)
                dones[step] = torch.as_tensor(terminated | truncated, device=device)
                if "_final_obs" in info:  # an episode ended in some env
                    # The last observations of the episodes that ended (raw_obs holds their reset ones) count in
                    # the statistics too, before the reset ones: they are real states of the env (as in
                    # ppo_continuous.py, where counting them was measured: benchmarks/RESULTS.md).
                    ended = info["_final_obs"]
                    ended_final = np.stack(info["final_obs"][ended])  # [n_ended, obs_dim]
                    if obs_rms is not None:
                        obs_rms.update(ended_final)
                if obs_rms is not None:
                    obs_rms.update(raw_obs)  # the observations the policy will act on (reset ones included)
                next_obs = observe(raw_obs)
                if "_final_obs" in info:
                    time_limit = truncated & ~terminated  # a subset of ended
                    if time_limit.any():
                        mask = torch.as_tensor(time_limit, device=device)
                        truncated_at[step] = mask
                        # normalised with the statistics next_obs was normalised with: V sees its usual input
                        final_obs[step, mask] = observe(ended_final[time_limit[ended]])  # the time-limit ones
                    ended_return[step, ended] = info["episode"]["r"][ended]
                    ended_length[step, ended] = info["episode"]["l"][ended]
        global_step += T * N * world_size  # every rank's steps
        if obs_rms is not None:  # each rank normalised with its own statistics; now they all hold every rank's
            obs_rms_agreed = merge_statistics_over_ranks(obs_rms, obs_rms_agreed, world_size)

        # ---- pi_old's log-probs and the critic's values for the whole batch, one forward pass each ----
        b_obs, b_actions = obs.reshape(batch_size, obs_dim), actions.reshape(batch_size, *action_shape)
        with torch.no_grad():
            b_logprobs, _ = policy.log_prob_entropy(policy(b_obs), b_actions)
            b_values = critic(b_obs)
            values = b_values.reshape(T, N)
            # With --norm-reward, divided by the std of the running discounted return (sb3's VecNormalize):
            # rewards of any size give value targets of order 1.
            if reward_scaler is None:
                rewards = raw_rewards.float()
            else:
                return_rms_before = reward_scaler.return_rms.state_dict()
                rewards = reward_scaler(raw_rewards, dones).float()
                merge_statistics_over_ranks(reward_scaler.return_rms, return_rms_before, world_size)  # torchrun
            # A time limit is not a terminal state: the return goes on past it. Adding gamma * V(final obs) to
            # the last reward lets GAE stop at dones[t] = 1 as it does for a true terminal. Both the reward and V
            # are on the scaled reward scale, and final_obs is normalised like every observation V sees.
            rewards += args.gamma * truncated_at * critic(final_obs)
            advantages, returns = compute_gae(rewards, values, dones, critic(next_obs), args.gamma, args.gae_lambda)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

        # ---- policy: one natural-gradient step on the whole batch ----
        # The PPO scripts' per-minibatch normalisation; TRPO's one "minibatch" is the batch (all ranks' parts of it).
        policy_advantages = normalize_advantages_over_ranks(b_advantages, world_size) if args.norm_adv else b_advantages
        try:
            policy_stats = trpo_update(
                policy, b_obs, b_actions, b_logprobs, policy_advantages, args.max_kl, args.cg_iters,
                args.cg_damping, args.backtrack_coef, args.backtrack_iters, world_size=world_size,
            )
        except FloatingPointError as err:
            logger.close()
            envs.close()
            stop_signal.restore()
            raise SystemExit(
                f"error: {err} at iteration {iteration}, in the policy step on the whole batch "
                f"(step {global_step}); stopping, nothing saved"
            ) from None

        # ---- critic: vf_iters epochs of num_minibatches minibatches of Adam on 0.5 * (V - R)^2 ----
        v_losses = []  # one scalar tensor per minibatch; checked once, after the loop (one host sync)
        for epoch in range(args.vf_iters):
            permutation = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = permutation[start : start + minibatch_size]
                v_loss = value_loss(critic(b_obs[mb]), b_values[mb], b_returns[mb], None)  # plain MSE, no clip
                critic_optimizer.zero_grad()
                v_loss.backward()
                average_gradients(critic.parameters(), world_size)  # torchrun: the global minibatch's gradient
                critic_optimizer.step()
                v_losses.append(v_loss.detach())
        v_losses = mean_over_ranks(torch.stack(v_losses), world_size)  # a NaN on any rank reaches every rank
        bad = (~torch.isfinite(v_losses)).nonzero()
        if len(bad):
            minibatch = bad[0].item()
            logger.close()
            envs.close()
            stop_signal.restore()
            raise SystemExit(
                f"error: value_loss is {v_losses[minibatch].item()} at iteration {iteration}, "
                f"minibatch {minibatch + 1} (step {global_step}); stopping, nothing saved"
            )

        # ---- diagnostics: one line per iteration ----
        ev = explained_variance(gather_over_ranks(b_values, world_size), gather_over_ranks(b_returns, world_size))
        ended, ended_lengths = gather_episodes(ended_return, ended_length, device, world_size)  # every rank's
        last_100.extend(ended.tolist())
        elapsed = time.time() - start_time
        logger.log({
            "iteration": iteration,
            "global_step": global_step,
            "time": elapsed,
            "sps": global_step / elapsed,
            "learning_rate": args.vf_lr,  # the critic's; the policy's step size is set by the KL bound
            **policy_stats,
            "value_loss": v_losses.mean().item(),
            "explained_variance": ev.item(),
            "episodes": len(ended),
            "episodic_return": float(ended.mean()) if len(ended) else None,
            "episodic_length": float(ended_lengths.mean()) if len(ended) else None,
            "episodic_return_100": float(np.mean(last_100)) if last_100 else None,
        })
        if args.save_every and iteration % args.save_every == 0:
            state = training_state(iteration)  # every rank takes part
            if rank == 0:
                save_checkpoint(os.path.join(run_dir, f"{SCRIPT}.pt"), state)
        if any_rank(stop_signal.requested, device, world_size):  # torchrun: all ranks stop after the same iteration
            break

    final_state = training_state(iteration) if args.save_model else None  # before the envs close: theirs is in it
    envs.close()
    teardown_distributed(world_size)
    if rank > 0:  # rank 0 writes the summary and the model, and says where they are
        stop_signal.restore()
        return None
    summary = {
        "global_step": global_step,
        "time": time.time() - start_time,
        "episodic_return_100": float(np.mean(last_100)) if last_100 else None,
        "iterations": iteration,
        "stopped_by": stop_signal.signal_name,  # None: the run trained its whole budget
    }
    if args.save_model:
        path = os.path.join(run_dir, f"{SCRIPT}.pt")
        save_checkpoint(path, final_state)
        eval_returns = evaluate(load_checkpoint(path), args.eval_episodes, args.seed, device)
        print(f"saved {path}; eval return {eval_returns.mean():.2f} +- {eval_returns.std():.2f} "
              f"over {args.eval_episodes} episodes")
        summary["eval_return_mean"] = float(eval_returns.mean())
    write_json(os.path.join(run_dir, "summary.json"), summary)
    logger.close()
    final = summary["episodic_return_100"]
    ended = f"stopped by {stop_signal.signal_name} after iteration {iteration}" if stop_signal.requested else "done"
    print(f"{ended}: {global_step} steps in {summary['time']:.1f} s; mean return of the last 100 episodes "
          f"{'-' if final is None else f'{final:.2f}'}; metrics in {run_dir}/metrics.jsonl")
    stop_signal.restore()
    if stop_signal.requested:
        raise SystemExit(stop_signal.exit_code)
    return summary


# ==========================================================================================================
# Plumbing a reader may skip: argument checks, devices, the vector env, normaliser storage, logging,
# checkpoints and evaluation. Nothing below changes the algorithm; main() above is the article's loop.
# ==========================================================================================================


def check_args(args: Args) -> None:
    """Raise ValueError with one readable sentence for settings that cannot train."""
    if args.vf_lr <= 0:
        raise ValueError(f"--vf-lr must be > 0, got {args.vf_lr}")
    for name in ("num_envs", "num_steps", "num_minibatches", "vf_iters", "cg_iters", "backtrack_iters",
                 "eval_episodes", "torch_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches != 0:
        raise ValueError(
            f"--num-minibatches {args.num_minibatches} does not divide the batch size "
            f"{batch_size} (= --num-envs {args.num_envs} x --num-steps {args.num_steps})"
        )
    if args.total_timesteps < batch_size:
        raise ValueError(f"--total-timesteps {args.total_timesteps} is smaller than one batch ({batch_size} steps)")
    if not 0 < args.gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not 0 <= args.gae_lambda <= 1:
        raise ValueError(f"--gae-lambda must be in [0, 1], got {args.gae_lambda}")
    if args.max_kl <= 0:
        raise ValueError(f"--max-kl must be > 0, got {args.max_kl}")
    if args.cg_damping <= 0:
        raise ValueError(f"--cg-damping must be > 0 (F alone can be singular, and CG needs a positive-definite "
                         f"matrix), got {args.cg_damping}")
    if not 0 < args.backtrack_coef < 1:
        raise ValueError(f"--backtrack-coef must be in (0, 1), got {args.backtrack_coef}")
    if args.capture_video:
        missing = [m for m in ("moviepy", "pygame") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"--capture-video needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def pick_device(want_cuda: bool) -> torch.device:
    if want_cuda and not torch.cuda.is_available():
        print("--cuda: no CUDA device found, running on the CPU")
    return torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")


def make_run_dir(env_id: str, exp_name: str, seed: int) -> tuple[str, str]:
    """(run_name, run_dir) of a new folder runs/<env_id>__<exp_name>__<seed>__<integer>, cleanrl's form. The
    integer is the current Unix second, or the next free one: runs of a sweep started in the same second get
    folders of their own. Creating the folder is what claims the name (os.makedirs refuses one that exists),
    so no run ever writes into another's."""
    stamp = int(time.time())
    while True:
        run_name = f"{env_id}__{exp_name}__{seed}__{stamp}"
        run_dir = os.path.join("runs", run_name)
        try:
            os.makedirs(run_dir, exist_ok=False)
            return run_name, run_dir
        except FileExistsError:
            stamp += 1


def write_json(path: str, data: dict) -> None:
    """Write data to path as JSON, all or nothing: a run killed while writing leaves the old file or none,
    never half of one."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(f"{path}.tmp", path)


def budget_line(total_timesteps: int, batch_size: int) -> str:
    """What the run will train: whole iterations of one batch each, so --total-timesteps is rounded down."""
    iterations = total_timesteps // batch_size
    line = f"budget: {iterations} iterations x {batch_size} steps = {iterations * batch_size} steps"
    if total_timesteps % batch_size:
        line += (f" (notice: --total-timesteps {total_timesteps} is not a multiple of the batch; the last "
                 f"{total_timesteps % batch_size} steps are not trained)")
    return line


class StopSignal:
    """A clean stop on Ctrl-C (SIGINT) or SIGTERM (what cluster schedulers send before they kill a job). The
    first one only sets `requested`: the training loop finishes its iteration, then wraps up as at the end of a
    run (metrics, summary, model, envs, wandb). A second one exits at once, without a traceback. The exit code
    is 128 + the signal's number (130, 143), as a shell reports a process killed by it. Installed when made
    (in the main thread only: Python handles signals nowhere else); restore() puts the previous handlers back."""

    def __init__(self):
        self.signal_name: Optional[str] = None  # "SIGINT" or "SIGTERM" once one arrived
        self.exit_code = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\n{name} again: stopping now; the metrics logged so far are kept", flush=True)
            os._exit(128 + signum)
        self.signal_name, self.exit_code = name, 128 + signum
        print(f"\n{name}: stopping after this iteration (send it again to stop now)", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def setup_distributed(device: torch.device, timeout_s: float) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process. Started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK
    and LOCAL_WORLD_SIZE) it joins the process group: nccl when every rank of the machine has a GPU of its own,
    gloo otherwise (CPU ranks, or ranks sharing one GPU); each rank on a GPU takes GPU LOCAL_RANK (modulo the
    count). A collective that waits more than timeout_s for the other ranks (one of them died) raises instead
    of waiting forever, and the run ends with that error. Started by plain python: (0, 1, device), no group."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if torch.cuda.device_count() >= local_world_size:
            backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world_size, device


def teardown_distributed(world_size: int) -> None:
    """Leave the process group once every rank is done with it (torchrun; nothing with one process). The
    gc.collect() frees, while the interpreter is still whole, objects that gloo's threads may still reference:
    left to the interpreter's exit, they now and then abort the process ("terminate called without an active
    exception", SIGABRT; measured here in 4 of 14 two-rank runs on a loaded machine, none with it)."""
    if world_size == 1:
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def mean_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of x over the ranks (every rank gets the same result); x itself with one process. With equal
    batch sizes on every rank, the mean of per-rank means is the mean over the global batch."""
    if world_size == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / world_size


def gather_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's x concatenated along dim 0, in rank order (the same on every rank); x with one process."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def normalize_advantages_over_ranks(advantages: torch.Tensor, world_size: int) -> torch.Tensor:
    """normalize_advantages over the global minibatch, whose parts the ranks hold: its mean and (unbiased) std
    from one all-reduce, so K ranks with minibatches of M normalise as one process with K * M."""
    if world_size == 1:
        return normalize_advantages(advantages)
    # One all-reduce of the sum and the sum of squares instead of two passes (mean, then squared deviations):
    # summed in float64, the one-pass variance loses nothing unless |mean| is ~1e6 stds, never so for advantages.
    a = advantages.detach().double()
    sums = torch.stack([a.sum(), (a * a).sum()])
    dist.all_reduce(sums)
    n = advantages.numel() * world_size
    mean = sums[0] / n
    std = ((sums[1] - n * mean * mean) / (n - 1)).clamp(min=0.0).sqrt()
    return (advantages - mean.to(advantages.dtype)) / (std.to(advantages.dtype) + 1e-8)


def average_gradients(parameters, world_size: int) -> None:
    """Replace each gradient by its mean over the ranks: the gradient of the global minibatch's loss (each rank's
    loss is a mean over its equal part). One all-reduce of all gradients flattened into one buffer, as cleanrl's
    multi-GPU PPO does, rather than DistributedDataParallel: the networks stay plain modules called as before
    (DDP wraps them and renames their state_dict keys) and --compile compiles the same loss."""
    if world_size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank when flag is True on any: the ranks decide together (to stop after a signal)."""
    if world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)  # on the device: nccl moves only GPU tensors
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_episodes(ended_return: np.ndarray, ended_length: np.ndarray, device: torch.device,
                    world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns and lengths of the episodes that ended this iteration on any rank (rank order, the same on every
    rank). ended_return: [T, N], NaN where no episode ended; ended_length: [T, N]. Gathered as tensors of the
    same shape on every rank (all_gather_object left gloo ranks aborting at exit now and then)."""
    if world_size > 1:
        ended_return = gather_over_ranks(torch.as_tensor(ended_return, device=device), world_size).cpu().numpy()
        ended_length = gather_over_ranks(torch.as_tensor(ended_length, device=device), world_size).cpu().numpy()
    finished = ~np.isnan(ended_return)
    return ended_return[finished], ended_length[finished]


def merge_statistics_over_ranks(rms: RunningMeanStd, before: dict, world_size: int) -> dict:
    """Make rms, on every rank, the statistics of all ranks' data, and return them as a state_dict (the next
    `before`). `before` is rms.state_dict() from when the ranks last agreed. Each rank recovers the count, mean
    and var of what it merged in since (Chan's merge solved for the new part; exact up to float64 rounding), the
    ranks gather those, and every rank merges them into `before` in rank order: the same statistics everywhere,
    those of all the data. With one process: rms as it is."""
    if world_size == 1:
        return before
    n0, n1 = float(before["count"]), rms.count
    mean0, var0 = before["mean"].to(rms.mean.device), before["var"].to(rms.var.device)
    n = n1 - n0
    mean_new, var_new = torch.zeros_like(mean0), torch.zeros_like(var0)
    if n > 0:
        mean_new = (n1 * rms.mean - n0 * mean0) / n
        var_new = (n1 * rms.var - n0 * var0 - (n0 * n / n1) * (mean_new - mean0) ** 2) / n
    part = torch.cat([torch.tensor([n], dtype=torch.float64, device=mean0.device), mean_new.reshape(-1),
                      var_new.reshape(-1)])
    count, mean, var, d = n0, mean0, var0, mean0.numel()
    for row in gather_over_ranks(part[None], world_size):  # [world_size, 1 + 2d]
        n_b = row[0].item()
        if n_b == 0:
            continue
        mean_b, var_b = row[1 : 1 + d].view_as(mean), row[1 + d :].view_as(var)
        count, w, delta = count + n_b, n_b / (count + n_b), mean_b - mean
        mean = mean + w * delta
        var = (1.0 - w) * var + w * var_b + (w * (1.0 - w)) * delta**2
    rms.load_state_dict({"mean": mean, "var": var, "count": torch.tensor(count, dtype=torch.float64)})
    return rms.state_dict()


def compute_array(x, device: torch.device):
    """x (a tensor or a numpy array) in float64, as the running statistics below compute with it: a numpy array
    on the CPU, a tensor on `device` otherwise. Not a copy where x is a float64 CPU tensor or array already:
    the array then shares x's memory, so `array += y` changes x.

    Why numpy on the CPU: the statistics are updated at every env step on a few dozen numbers, where an op's cost
    is all call overhead, and a numpy call has less of it than a torch call (benchmarks/SPEED.md: what it buys
    a run). The code that uses these arrays is written with what numpy arrays and tensors share (+, -, *, /,
    **, [], .clip, .mean), so it runs unchanged on a GPU's tensors."""
    if device.type == "cpu":
        return np.asarray(x, dtype=np.float64)
    return torch.as_tensor(x, dtype=torch.float64, device=device)


class SameStepVectorEnv(gym.vector.VectorEnv):
    """N envs stepped one after another in this process, with SAME_STEP autoreset: when an episode ends, step()
    returns the first observation of the next episode and puts the last one in info["final_obs"] (an object
    array, set where info["_final_obs"]). So obs[t] -> obs[t+1] is never a fake transition from one episode into
    the next, and a truncated episode can be bootstrapped from its real final observation.

    It returns what gym.vector.SyncVectorEnv(env_fns, autoreset_mode=SAME_STEP) returns (a test compares the two
    step by step), except that the sub-envs' own info dicts are left out (nothing here reads them), and it
    reports the episodes that ended as gymnasium's RecordEpisodeStatistics does: info["episode"]["r"] and ["l"]
    where info["_episode"]. Each env gets its entry of the action array: a Python int for a Discrete space (the
    envs' action checks test those faster than numpy integers), the float32 row for a Box, as SyncVectorEnv
    hands it (MuJoCo's control cost squares the action, so float64 numbers would change the rewards' last bits).
    Why not SyncVectorEnv itself: its general machinery (info merging, batching dispatched on the space, copies)
    costs more per step than this plain loop (measured in benchmarks/SPEED.md).
    The same class in every script that steps gymnasium envs."""

    def __init__(self, env_fns: list):
        self.envs = [make() for make in env_fns]
        self.num_envs = n = len(self.envs)
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, n)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, n)
        self.metadata = {**self.envs[0].metadata, "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self.render_mode = self.envs[0].render_mode
        self._obs = np.zeros((n, *self.single_observation_space.shape), self.single_observation_space.dtype)
        self._episode_return, self._episode_length = [0.0] * n, [0] * n

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        """Resets every env; env i gets seed + i, as in SyncVectorEnv."""
        for i, env in enumerate(self.envs):
            self._obs[i], _ = env.reset(seed=None if seed is None else seed + i, options=options)
        self._episode_return, self._episode_length = [0.0] * self.num_envs, [0] * self.num_envs
        return self._obs.copy(), {}

    def step(self, actions: np.ndarray):
        n = self.num_envs
        rewards = np.zeros(n)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        info = {}
        if isinstance(self.single_action_space, gym.spaces.Discrete):
            actions = actions.tolist()
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            obs, reward, env_terminated, env_truncated, _ = env.step(action)
            rewards[i], terminated[i], truncated[i] = reward, env_terminated, env_truncated
            self._episode_return[i] += reward
            self._episode_length[i] += 1
            if env_terminated or env_truncated:
                if not info:  # the first episode to end in this step
                    info = {"final_obs": np.full(n, None, dtype=object), "_final_obs": np.zeros(n, dtype=bool),
                            "episode": {"r": np.zeros(n), "l": np.zeros(n, dtype=np.int64)},
                            "_episode": np.zeros(n, dtype=bool)}
                info["final_obs"][i], info["_final_obs"][i], info["_episode"][i] = obs, True, True
                info["episode"]["r"][i], info["episode"]["l"][i] = self._episode_return[i], self._episode_length[i]
                self._episode_return[i], self._episode_length[i] = 0.0, 0
                obs, _ = env.reset()
            self._obs[i] = obs
        return self._obs.copy(), rewards, terminated, truncated, info

    def get_state(self) -> Optional[dict]:
        """Everything needed to go on exactly (env_state of each env, the running episode statistics, the last
        observations), or None when an env is of a kind env_state cannot capture."""
        states = [env_state(env) for env in self.envs]
        if any(state is None for state in states):
            return None
        return {"envs": states, "obs": torch.from_numpy(self._obs.copy()),
                "episode_return": [float(r) for r in self._episode_return],  # numpy floats: not weights_only
                "episode_length": [int(n) for n in self._episode_length]}

    def set_state(self, state: dict) -> None:
        for env, env_saved in zip(self.envs, state["envs"]):
            restore_env_state(env, env_saved)
        self._obs[:] = state["obs"].numpy()
        self._episode_return, self._episode_length = list(state["episode_return"]), list(state["episode_length"])

    def close_extras(self, **kwargs) -> None:
        for env in self.envs:
            env.close()


def render_offscreen_if_headless(env_id: str) -> None:
    """MuJoCo draws its frames with OpenGL. Without a display, gymnasium's first choice (GLFW) gives no context
    and recording fails (or, in older stacks, writes black videos: cleanrl #468). So on a machine with no
    DISPLAY, and unless MUJOCO_GL says otherwise, render offscreen through EGL (Mesa provides it without a GPU;
    MUJOCO_GL=osmesa picks OSMesa instead). gymnasium reads MUJOCO_GL when the first frame is drawn, in
    whichever process draws it, so setting it before the envs exist is enough."""
    is_mujoco = env_id in gym.registry and "mujoco" in str(gym.registry[env_id].entry_point)
    headless = not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
    if is_mujoco and headless and "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl"
        print("--capture-video: no display, MuJoCo renders offscreen with EGL (MUJOCO_GL=egl)")


def make_envs(args: Args, run_name: Optional[str]) -> gym.vector.VectorEnv:
    """Vector env with SAME_STEP autoreset: when an episode ends, step() returns the first observation of the
    next episode and puts the last one in info["final_obs"]. So obs[t] -> obs[t+1] is never a fake transition
    from one episode into the next, and a truncated episode can be bootstrapped from its real final obs.
    The envs step one after another in this process (SameStepVectorEnv), even MuJoCo ones, unlike
    ppo_continuous.py's and ppo_penalty.py's several Box envs: at this script's 2 envs a worker process's pipe
    costs more than the second core gives back (benchmarks/SCALING.md, ppo_continuous.py at 1 and 2 envs)."""
    if args.capture_video:
        render_offscreen_if_headless(args.env_id)

    def make_one(index: int):
        def thunk():
            if args.capture_video and index == 0 and run_name is not None:  # env 0 of rank 0
                env = gym.make(args.env_id, render_mode="rgb_array")
                return gym.wrappers.RecordVideo(env, f"videos/{run_name}", disable_logger=True)
            return gym.make(args.env_id)

        return thunk

    return SameStepVectorEnv([make_one(i) for i in range(args.num_envs)])


def check_env(env_id: str) -> tuple[int, gym.Space]:
    """(obs_dim, action_space) of env_id, or ValueError saying why this script cannot train on it."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as err:  # unknown id, wrong version, missing extra (box2d, ...)
        raise ValueError(f"cannot make env {env_id!r}: {err}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if isinstance(act_space, gym.spaces.Box):
        if len(act_space.shape) != 1:
            raise ValueError(f"{env_id} has Box actions of shape {act_space.shape}; this script needs a 1-D Box")
        if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
            raise ValueError(
                f"{env_id} has an unbounded Box action space ({act_space}); this script needs finite bounds "
                "to clip the Gaussian's samples to"
            )
    elif not isinstance(act_space, gym.spaces.Discrete):
        raise ValueError(
            f"{env_id} has a {type(act_space).__name__} action space; this script needs Discrete or a bounded Box"
        )
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"{env_id} observations are {obs_space}; this script needs a flat Box (a vector)")
    return obs_space.shape[0], act_space


class Logger:
    """Every iteration: one line on stdout, one JSON line in runs/<run_name>/metrics.jsonl, and wandb with
    --track. A wandb error is printed once and turns wandb off; it never stops training."""

    def __init__(self, args: Args, run_dir: Optional[str], run_name: Optional[str], num_iterations: int,
                 resume: Optional[dict] = None):
        self.num_iterations = num_iterations  # for the stdout line: iteration i of n, the time left
        self.metrics_file = None
        if run_dir:  # a resumed run keeps the rows up to its checkpoint and appends the rest
            path = os.path.join(run_dir, "metrics.jsonl")
            if resume is not None:
                keep_metrics_until(path, resume["iteration"])
            self.metrics_file = open(path, "w" if resume is None else "a", buffering=1)
        self.wandb_run = self.wandb_id = None
        if args.track and run_dir:
            try:
                import wandb

                self.wandb_run = wandb.init(
                    project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                    config=asdict(args), dir=run_dir,
                    id=resume["wandb_id"] if resume else None, resume="allow" if resume else None,
                )
                self.wandb_id = self.wandb_run.id
            except Exception as err:  # any wandb failure (no login, no network, bad entity): keep training
                print(f"wandb disabled, training goes on: {type(err).__name__}: {err}")

    def log(self, metrics: dict) -> None:
        if self.metrics_file is None:  # a rank other than 0 under torchrun
            return
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps(clean) + "\n")
        def show(key, spec):
            return "-" if metrics[key] is None else format(metrics[key], spec)

        line_search = f"{metrics['backtracks']} backtracks" if metrics["step_accepted"] else "step REJECTED"
        print(
            f"iter {metrics['iteration']:>4}/{self.num_iterations} step {metrics['global_step']:>8} | "
            f"return {show('episodic_return', '6.1f')} (last 100: {show('episodic_return_100', '6.1f')}) | "
            f"kl {metrics['kl']:.4f} {line_search} ent {show('entropy', '.3f')} "
            f"ev {show('explained_variance', '5.2f')} | sps {metrics['sps']:.0f} | "
            f"{metrics['time']:.0f} s, ~{self.seconds_left(metrics):.0f} s left"
        )
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["global_step"])
            except Exception as err:  # see __init__: training matters more than the dashboard
                print(f"wandb disabled, training goes on: {type(err).__name__}: {err}")
                self.wandb_run = None

    def seconds_left(self, metrics: dict) -> float:
        """The iterations still to run at this run's speed so far (the batch is the same every iteration)."""
        steps_per_iteration = metrics["global_step"] / metrics["iteration"]
        return (self.num_iterations - metrics["iteration"]) * steps_per_iteration / metrics["sps"]

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                print(f"wandb finish failed: {type(err).__name__}: {err}")


def cpu_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() with every tensor on the CPU (the same tensors when they are there already), so that a
    checkpoint saved from a GPU run loads with torch.load(path, weights_only=True) on a machine without one."""
    return {name: tensor.cpu() for name, tensor in module.state_dict().items()}


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or ValueError saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one that needs unpickling arbitrary code
        raise ValueError(f"{path} is not a checkpoint that loads with weights_only=True: {err}") from None
    script = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if script != SCRIPT:
        raise ValueError(f"{path} was written by {script or 'something else'}.py, not {SCRIPT}.py")
    return checkpoint


def load_resume(args: Args) -> Optional[dict]:
    """The checkpoint --resume names, checked against these flags; None without --resume. ValueError (one line)
    for a file this script did not write, one without training state, a changed flag that would change the run,
    or a budget already trained."""
    if args.resume is None:
        return None
    checkpoint = load_checkpoint(args.resume)
    if "iteration" not in checkpoint:
        raise ValueError(f"{args.resume} holds no training state to resume (only weights)")
    saved = checkpoint["args"]
    changed = [name for name, value in asdict(args).items() if name not in RESUME_MAY_CHANGE and saved.get(name) != value]
    if changed:
        name = changed[0]
        raise ValueError(f"--resume: --{name.replace('_', '-')} was {saved.get(name)!r} in that run, now "
                         f"{getattr(args, name)!r}; a resumed run keeps its flags (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)")
    batch = args.num_envs * args.num_steps * len(checkpoint["ranks"])
    if checkpoint["iteration"] >= args.total_timesteps // batch:
        raise ValueError(f"--resume: that run has trained {checkpoint['global_step']} of --total-timesteps "
                         f"{args.total_timesteps} already; raise --total-timesteps to train on")
    return checkpoint


# Flags a resumed run may change: its budget and how it is saved, logged and run, never what it computes.
RESUME_MAY_CHANGE = {"total_timesteps", "resume", "save_every", "save_model", "track", "wandb_project_name",
                     "wandb_entity", "capture_video", "eval_checkpoint", "eval_episodes", "dist_timeout_s", "cuda",
                     "torch_threads", "env_threads"}


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """torch.save(checkpoint, path) such that a kill at any moment leaves the previous file or the new one, never
    a broken one: written to a temporary file in the same folder, flushed and fsynced, then renamed over path
    (os.replace: atomic on POSIX and Windows), then the folder fsynced so that the rename survives a crash.
    A temporary file left by a killed earlier write is removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def keep_metrics_until(path: str, iteration: int) -> None:
    """Drop the rows of a metrics.jsonl past `iteration` (logged after the checkpoint a run resumes from) and a
    last line cut off by a kill; rewritten atomically. Then the resumed run appends iteration + 1, ..."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by a kill: the last one
                    break
                if row["iteration"] > iteration:
                    break
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """The states of python's, numpy's and torch's global generators, as plain numbers and tensors (so that a
    checkpoint loads with weights_only=True)."""
    version, python_state, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": torch.tensor(python_state, dtype=torch.int64), "python_version": version,
            "python_gauss_next": gauss_next, "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached_gaussian),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss_next"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_state(generator: np.random.Generator) -> str:
    """A numpy Generator's state (PCG64's 128-bit integers included) as a JSON string."""
    return json.dumps(generator.bit_generator.state)


def set_generator_state(generator: np.random.Generator, state: str) -> None:
    generator.bit_generator.state = json.loads(state)


def env_state(env: gym.Env) -> Optional[dict]:
    """What one gymnasium env needs to go on exactly: its TimeLimit counter, its generator, and its physics
    (MuJoCo's integration state from mj_getState, the solver's warm start included; a classic-control env's
    `state` and the attributes its step reads). None for an env of another kind."""
    inner, time_limit = env.unwrapped, find_time_limit(env)
    if hasattr(inner, "model") and hasattr(inner, "data") and type(inner).__module__.startswith("gymnasium.envs.mujoco"):
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(inner.model, spec))
        mujoco.mj_getState(inner.model, inner.data, physics, spec)
        attributes = {"mujoco_integration_state": torch.from_numpy(physics)}
    elif type(inner).__module__.startswith("gymnasium.envs.classic_control"):
        attributes = {}
        for name in ("state", "steps_beyond_terminated", "last_u"):
            if hasattr(inner, name):
                value = getattr(inner, name)  # arrays and numpy scalars as tensors (weights_only); None, numbers as is
                is_array = isinstance(value, (np.ndarray, np.generic, tuple))
                attributes[name] = torch.from_numpy(np.array(value)) if is_array else value
    else:
        return None
    elapsed = None if time_limit is None else time_limit._elapsed_steps
    return {"elapsed_steps": elapsed, "np_random": generator_state(inner.np_random), "attributes": attributes}


def find_time_limit(env: gym.Env) -> Optional[gym.wrappers.TimeLimit]:
    """The TimeLimit wrapper in env's stack (it counts the episode's steps), or None."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env
        env = env.env
    return None


def restore_env_state(env: gym.Env, state: dict) -> None:
    inner, time_limit = env.unwrapped, find_time_limit(env)
    if time_limit is not None:
        time_limit._elapsed_steps = state["elapsed_steps"]
    set_generator_state(inner.np_random, state["np_random"])
    for name, value in state["attributes"].items():
        if name == "mujoco_integration_state":
            import mujoco

            mujoco.mj_setState(inner.model, inner.data, value.numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(inner.model, inner.data)  # the derived quantities of that state, as after a step
        else:
            if isinstance(value, torch.Tensor):
                value = value.numpy().copy()
                value = value if value.ndim else value[()]  # a numpy scalar back as one
            setattr(inner, name, value)


def vector_env_state(envs: gym.vector.VectorEnv) -> Optional[dict]:
    """The vector env's state (its get_state()), or None when it has none (resume then starts new episodes)."""
    return envs.get_state() if hasattr(envs, "get_state") else None


def restore_vector_env_state(envs: gym.vector.VectorEnv, state: Optional[dict]) -> bool:
    """Put the envs where the checkpoint left them; False, with a one-line notice, when they cannot be (then they
    start new episodes, and everything else still goes on exactly)."""
    if state is None or not hasattr(envs, "set_state"):
        print("--resume: these envs cannot be restored; the resumed run starts new episodes")
        return False
    envs.set_state(state)
    return True


def gather_objects(obj, world_size: int) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (all_gather_object: pickled in flight, under the group's
    timeout); [obj] in a plain run."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered



def evaluate(checkpoint: dict, episodes: int, seed: int, device: torch.device) -> np.ndarray:
    """Returns of `episodes` full episodes of the saved policy acting greedily (argmax of the logits, or the
    Gaussian's mean clipped to the bounds), on observations normalised as training normalises them, with the
    saved, frozen statistics."""
    env_id = checkpoint["args"]["env_id"]
    obs_dim, action_space = check_env(env_id)
    policy = make_policy(obs_dim, action_space).to(device)
    policy.load_state_dict(checkpoint["policy"])
    obs_rms = None
    if checkpoint["obs_rms"] is not None:
        obs_rms = RunningMeanStd((obs_dim,), device)
        obs_rms.load_state_dict(checkpoint["obs_rms"])  # frozen: never updated during evaluation
    env = gym.make(env_id)
    returns = np.zeros(episodes)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            if obs_rms is None:
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            else:  # as in training: the env's observation, not a float32 rounding of it, is normalised
                obs_t = obs_rms.normalize(obs)
            with torch.no_grad():
                action = policy.mode(policy(obs_t))
            obs, reward, terminated, truncated, _ = env.step(policy.env_action(action))
            returns[episode] += reward
            done = terminated or truncated
    env.close()
    return returns


if __name__ == "__main__":
    main()
