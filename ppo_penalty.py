"""PPO-Penalty: PPO with an adaptive KL penalty instead of the clip, in one file, for Discrete and Box actions.

Run:
    python ppo_penalty.py                                    # CartPole-v1, 500k steps, ppo_discrete.py's settings
    python ppo_penalty.py --env-id HalfCheetah-v4 --total-timesteps 1000000 --learning-rate 3e-4 \
        --num-envs 1 --num-steps 2048 --update-epochs 10 --num-minibatches 32 --ent-coef 0.0
                                                             # MuJoCo: cleanrl's ppo_continuous.py settings
    python ppo_penalty.py --kl-target 0.003 --init-beta 10   # a tighter trust region, a stiffer start
    python ppo_penalty.py --eval-checkpoint runs/<run_name>/ppo_penalty.pt   # evaluate a saved agent
    python ppo_penalty.py --save-every 50                    # a checkpoint every 50 iterations, then, after a kill:
    python ppo_penalty.py --save-every 50 --resume runs/<run_name>/ppo_penalty.pt   # go on where it was
    python ppo_penalty.py --help                             # every flag, with its meaning
    torchrun --standalone --nproc-per-node 2 ppo_penalty.py  # 2 processes: --num-envs, --num-steps per process
    python benchmarks/plot_beta.py runs/<run_name>/metrics.jsonl --out beta.png   # the adaptive-KL figure

What it implements, by section of the article "PPO and TRPO -- Trust Region Policy Optimization":
    "PPO-Penalty: the adaptive cousin"  L^KL = E[r A] - beta E[KL(pi_old || pi_theta)]  -> kl_penalty_loss
                                        exact KL of the old and new action distributions -> categorical_kl,
                                                                                            gaussian_kl
                                        beta doubled above 1.5 x target, halved below
                                        target / 1.5, after every iteration              -> update_beta
    "Importance sampling"               ratio r_t = pi_theta(a|s) / pi_old(a|s)          -> kl_penalty_loss
    "A complete PPO implementation"     GAE (lambda=0: TD, lambda=1: Monte Carlo)         -> compute_gae
                                        loss = -L^KL + c_vf L^V - c_ent H, grad clipping -> main (update)
    "Debugging checklist"               approx KL, k1 = -log r and k3 = (r-1) - log r,
                                        logged beside the exact KL                       -> approx_kl
                                        explained variance 1 - Var(R - V) / Var(R)        -> explained_variance
                                        advantage normalisation per minibatch             -> normalize_advantages
    "Common failure modes"              continuous control: learnable log-std; critic
                                        blow-up: normalise rewards (running stats)        -> Agent, RunningMeanStd,
                                                                                            RewardScaler
    "Hyperparameter cheat sheet"        linear LR annealing, grad-norm clip               -> Args, main
    "TRPO vs PPO: head to head"         "trivially parallelisable": ranks under torchrun  -> setup_distributed,
                                        each with its envs, gradients averaged over ranks,   average_gradients
                                        beta from the KL of every rank's batch

The ratio is never clipped here: the trust region comes only from the penalty, which is the point of having
this script beside ppo_discrete.py. The logged `clipfrac` is a diagnostic of what PPO-Clip would have clipped.

Policies: Discrete actions -> categorical head (logits). Box actions with finite bounds -> diagonal Gaussian
with a state-independent log-std; actions are sampled unclipped (the log-probs and KLs are those of the
Gaussian) and clipped to the bounds only when passed to env.step. For Box actions the observations are
normalised and the rewards scaled by running statistics kept on the device (as cleanrl's ppo_continuous.py
does with wrappers), saved in the checkpoint and frozen at evaluation.

Same differences from cleanrl as ppo_discrete.py: time-limit truncations are bootstrapped with
gamma * V(final observation) (on the normalised scale for Box envs), the logged losses are means over the
whole update, and the KLs are measured on the whole batch after the update.
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
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro

SCRIPT = "ppo_penalty"

# beta is kept inside [BETA_MIN, BETA_MAX] so that repeated halving or doubling can never reach 0 (then
# 2 * 0 = 0 forever: the penalty could never come back) or inf (inf * KL = nan at KL = 0). At 1e-4 the
# penalty is negligible against a surrogate of size ~1 (normalised advantages) at any sane KL; at 1e4 it
# pins the policy to pi_old. Either bound is left again after log2(1e4 / beta) ~ 13 iterations at most.
BETA_MIN, BETA_MAX = 1e-4, 1e4
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
    """run the networks and the rollout buffer on the GPU if there is one (falls back to the CPU with a notice)"""
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
    """write runs/<run_name>/ppo_penalty.pt at the end (everything --resume needs), then evaluate it"""
    save_every: int = 0
    """also write that checkpoint every this many iterations (0: never), replacing the last one atomically"""
    resume: Optional[str] = None
    """a checkpoint to go on from, in its run's folder, with the same flags (--total-timesteps may be raised)"""
    eval_checkpoint: Optional[str] = None
    """if set: no training; load this checkpoint, run --eval-episodes episodes and print mean/std return"""
    eval_episodes: int = 10
    """episodes run by the evaluation after --save-model and by --eval-checkpoint (greedy / mean actions)"""
    dist_timeout_s: float = 300.0
    """under torchrun: seconds a rank waits in a collective for the others before the run fails (a rank died)"""

    # Algorithm. Defaults: ppo_discrete.py's (= cleanrl's ppo.py) for CartPole-v1. For MuJoCo pass cleanrl's
    # ppo_continuous.py settings on the command line (see the docstring at the top of the file).
    env_id: str = "CartPole-v1"
    """gymnasium id of an env with a flat Box observation and Discrete or finite-bounded 1-D Box actions"""
    total_timesteps: int = 500_000
    """environment steps in total, summed over the parallel envs (and over the ranks under torchrun)"""
    learning_rate: float = 2.5e-4
    """Adam step size (typical 1e-4 to 3e-4; cleanrl uses 3e-4 for MuJoCo)"""
    num_envs: int = 4
    """parallel environments (per rank under torchrun); Discrete envs, and a single Box env, step one after another
    in this process (SameStepVectorEnv); more Box envs (MuJoCo) run in subprocesses (AsyncVectorEnv)"""
    num_steps: int = 128
    """steps per env per rollout; batch size = num_envs * num_steps (per rank; x ranks under torchrun)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over training"""
    gamma: float = 0.99
    """discount factor (typical 0.99 to 0.999); also the discount of the reward-scaling returns (Box envs)"""
    gae_lambda: float = 0.95
    """GAE lambda: 0 is one-step TD, 1 is the Monte-Carlo return (typical 0.9 to 0.99)"""
    num_minibatches: int = 4
    """minibatches per epoch; must divide the batch size (per rank under torchrun)"""
    update_epochs: int = 4
    """passes over each batch (typical 3 to 10)"""
    norm_adv: bool = True
    """normalise advantages to zero mean and unit std per minibatch"""
    init_beta: float = 1.0
    """beta of the first iteration, in [1e-4, 1e4]; the PPO paper notes the start matters little, as beta adapts
    by a factor 2 per iteration"""
    kl_target: float = 0.01
    """the KL per update beta steers towards (the article's delta ~ 0.01; the PPO paper tried 0.003, 0.01, 0.03)"""
    clip_coef: float = 0.2
    """NOT a ratio clip (nothing clips the ratio here): the band |r - 1| > clip_coef counted by the logged
    clipfrac diagnostic, and the value clip of --clip-vloss; named as in the clip scripts so their commands run"""
    clip_vloss: bool = True
    """clip the value update to +-clip_coef around the rollout's values, as in PPO2 (in return units)"""
    ent_coef: float = 0.01
    """weight of the entropy bonus c_ent (typical 0 to 0.01; cleanrl uses 0 for MuJoCo)"""
    vf_coef: float = 0.5
    """weight of the value loss c_vf (typical 0.5 to 1)"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this (typical 0.5 to 1)"""


# ----------------------------------------------------------------------------------------------------------
# The article's functions: tensors in, tensors out. Other scripts carry identical copies (tests/test_contract.py)
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


def kl_penalty_loss(
    new_logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative adaptive-KL objective -L^KL (to minimise), with its two parts.

    L^KL = mean(r A) - beta * mean(KL(pi_old || pi_theta)),  r = exp(new_logprob - old_logprob).
    kl: [B] exact KL per state (categorical_kl / gaussian_kl). Returns (loss, surrogate, penalty) with
    surrogate = mean(r A), penalty = beta * mean(KL), loss = penalty - surrogate. The ratio is not clipped:
    the gradient is the plain importance-sampling one, pulled back towards pi_old by the penalty. At
    theta = theta_old the KL and its gradient are 0, so the gradient is the policy gradient's.

    Example: r = 1.5, A = 2, KL = 0.1, beta = 4 -> surrogate 3.0, penalty 0.4, loss -2.6.
    """
    ratio = (new_logprob - old_logprob).exp()
    surrogate = (ratio * advantages).mean()
    penalty = beta * kl.mean()
    return penalty - surrogate, surrogate, penalty


def update_beta(beta: float, kl: float, kl_target: float) -> float:
    """The adaptive rule (Schulman et al. 2017, sec. 4), applied after every iteration:

        kl > 1.5 * kl_target  ->  beta * 2      (policy moved too far: penalise harder)
        kl < kl_target / 1.5  ->  beta / 2      (policy barely moved: let it move more)
        otherwise             ->  beta

    Both comparisons are strict: a kl exactly at kl_target * 1.5 or kl_target / 1.5 (computed as written
    here) leaves beta unchanged. The result is clamped to [BETA_MIN, BETA_MAX] = [1e-4, 1e4], so beta stays
    finite and positive whatever the KLs; a NaN kl compares False both ways and leaves beta unchanged.
    Example: beta 1, kl_target 0.01: kl 0.02 -> 2; kl 0.012 -> 1; kl 0.005 -> 0.5.
    """
    if kl > kl_target * 1.5:
        beta = beta * 2.0
    elif kl < kl_target / 1.5:
        beta = beta / 2.0
    return min(max(beta, BETA_MIN), BETA_MAX)


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


class Agent(nn.Module):
    """Separate actor and critic MLPs (64-64 tanh), as in cleanrl's ppo.py and ppo_continuous.py.

    The actor's last layer starts at std 0.01, so the first policy is near uniform (Discrete) or centred at 0
    (Box). Box: a state-independent log-std per action dimension, starting at 0 (std 1), learnt by gradient
    (the article's "learnable log-std").

    A policy is handed around as one tensor of distribution parameters per state, `params` [B, P]: the
    logits (P = A) or the mean and the log-std side by side (P = 2 D). The rollout buffer stores pi_old's
    params, so the exact KL to pi_old needs no copy of the old network.
    """

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int = 64):
        super().__init__()
        self.discrete = discrete
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, act_dim), std=0.01),
        )
        if not discrete:
            self.actor_logstd = nn.Parameter(torch.zeros(act_dim))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # [B]

    def dist_params(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.actor(obs)  # logits [B, A] or mean [B, D]
        if self.discrete:
            return out
        return torch.cat([out, self.actor_logstd.expand_as(out)], dim=-1)  # [B, 2D]: mean, log-std

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dist_params(obs), self.value(obs)  # params [B, P], value [B]

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """a ~ pi(.|s) for each row of obs [B, obs_dim]: [B] action indices, or [B, D] unclipped Gaussian actions."""
        params = self.dist_params(obs)
        if self.discrete:
            return sample_categorical(params)
        mean, log_std = params.chunk(2, dim=-1)
        return mean + log_std.exp() * torch.randn_like(mean)

    def greedy(self, params: torch.Tensor) -> torch.Tensor:
        """The evaluation action: the most likely one (argmax of the logits, or the Gaussian's mean)."""
        return params.argmax(dim=-1) if self.discrete else params.chunk(2, dim=-1)[0]

    def logprob_entropy(self, params: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(a|s) [B] and entropy [B]."""
        if self.discrete:
            return categorical_logprob_entropy(params, actions)
        mean, log_std = params.chunk(2, dim=-1)
        return gaussian_log_prob(mean, log_std, actions), gaussian_entropy(log_std)

    def kl(self, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        """Exact KL(pi_old(.|s) || pi_new(.|s)) per state [B]."""
        if self.discrete:
            return categorical_kl(old_params, new_params)
        return gaussian_kl(*old_params.chunk(2, dim=-1), *new_params.chunk(2, dim=-1))


# ----------------------------------------------------------------------------------------------------------
# Training: the article's PPO-Penalty loop
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
        obs_dim, act_dim, discrete = check_env(args.env_id)
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

    envs = make_envs(args, run_name, discrete)
    agent = Agent(obs_dim, act_dim, discrete).to(device)
    if world_size > 1:  # the networks start the same on every rank (seed above); then each rank samples its own
        torch.manual_seed(args.seed + rank)
    # fused=True: one kernel for the whole Adam step instead of several per parameter (the same arithmetic)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    beta = args.init_beta
    if not discrete:
        action_low = torch.as_tensor(envs.single_action_space.low, dtype=torch.float32, device=device)  # [D]
        action_high = torch.as_tensor(envs.single_action_space.high, dtype=torch.float32, device=device)  # [D]
    # Box envs: observation normalisation and reward scaling, statistics on the device. The reward is divided by
    # the running std of each env's discounted return (not of the reward), as gymnasium's NormalizeReward does.
    obs_rms = RunningMeanStd((obs_dim,), device) if not discrete else None
    reward_scaler = RewardScaler(args.num_envs, args.gamma, device) if not discrete else None

    def observe(raw: np.ndarray) -> torch.Tensor:
        """The envs' observations [n, obs_dim] -> what the networks see: float32 on the device; Box envs:
        normalised with the running statistics (which the caller updates)."""
        if obs_rms is None:
            return torch.as_tensor(raw, dtype=torch.float32, device=device)
        return obs_rms.normalize(raw)

    # Rollout buffer, preallocated on the device and overwritten every iteration.
    T, N = args.num_steps, args.num_envs
    obs = torch.zeros((T, N, obs_dim), device=device)  # what the policy saw (normalised for Box envs)
    if discrete:
        actions = torch.zeros((T, N), dtype=torch.long, device=device)
    else:
        actions = torch.zeros((T, N, act_dim), device=device)  # the unclipped Gaussian samples
    raw_rewards = torch.zeros((T, N), dtype=torch.float64, device=device)  # as the envs return them
    dones = torch.zeros((T, N), device=device)  # 1 where the episode ended with transition t
    truncated_at = torch.zeros((T, N), device=device)  # 1 where it ended by time limit (not terminated)
    final_obs = torch.zeros((T, N, obs_dim), device=device)  # the last observation of those episodes, as V sees it

    # Episode statistics stay on the host, as the envs report them (unscaled returns).
    ended_return, ended_length = np.full((T, N), np.nan), np.zeros((T, N), dtype=np.int64)
    last_100 = collections.deque(maxlen=100)

    raw_obs, _ = envs.reset(seed=args.seed + rank * N)  # [N, obs_dim], numpy; env i of rank r: seed + r N + i
    if obs_rms is not None:
        obs_rms_agreed = obs_rms.state_dict()  # torchrun: the statistics every rank holds, merged after each rollout
        obs_rms.update(raw_obs)
    next_obs = observe(raw_obs)
    global_step, start_time, first_iteration = 0, time.time(), 1

    def training_state(iteration: int) -> dict:
        """Everything --resume needs to go on after `iteration` (beta: the next iteration's); every rank's envs and
        RNGs (a collective). Box envs only: the normalisers and each rank's part of them."""
        mine = {"rng": rng_state(), "envs": vector_env_state(envs), "next_obs": next_obs.cpu()}
        if obs_rms is not None:
            mine.update(obs_rms_agreed=obs_rms_agreed, returns=reward_scaler.returns.cpu())
        return {"script": SCRIPT, "args": asdict(args), "model": cpu_weights(agent), "optimizer": optimizer.state_dict(),
                "beta": float(beta),
                "obs_rms": obs_rms.state_dict() if obs_rms is not None else None,
                "return_rms": reward_scaler.return_rms.state_dict() if reward_scaler is not None else None,
                "iteration": iteration, "global_step": global_step, "time": time.time() - start_time,
                "last_100": list(last_100), "wandb_id": logger.wandb_id,
                "ranks": gather_objects(mine, world_size)}

    if resume is not None:  # go on from the checkpoint: the same state, so the same run (restore_vector_env_state says so if not)
        agent.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        beta = resume["beta"]
        if obs_rms is not None:
            obs_rms.load_state_dict(resume["obs_rms"])
            reward_scaler.return_rms.load_state_dict(resume["return_rms"])
        first_iteration, global_step = resume["iteration"] + 1, resume["global_step"]
        start_time -= resume["time"]
        last_100.extend(resume["last_100"])
        mine = resume["ranks"][rank]
        if obs_rms is not None:
            obs_rms_agreed = mine["obs_rms_agreed"]
        if restore_vector_env_state(envs, mine["envs"]):
            next_obs = mine["next_obs"].to(device)
            if reward_scaler is not None:
                reward_scaler.returns.copy_(mine["returns"])
        else:  # new episodes: their first observations, normalised with the restored statistics (Box envs)
            next_obs = observe(raw_obs)
        set_rng_state(mine["rng"])

    for iteration in range(first_iteration, num_iterations + 1):
        lr = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations if args.anneal_lr else 1.0)
        optimizer.param_groups[0]["lr"] = lr
        ended_return.fill(np.nan)
        truncated_at.zero_()

        # ---- rollout: T steps of N envs, each action sampled from pi_old at its step ----
        with torch.inference_mode():  # no autograd here: the rollout only collects data
            for step in range(T):
                obs[step] = next_obs
                action = agent.sample(next_obs)  # [N] or [N, D], a ~ pi_old(.|s)
                actions[step] = action
                # Box: clipped only for the env; the update needs log pi_old of the sample the policy really drew.
                env_action = action if discrete else torch.clamp(action, action_low, action_high)

                raw_obs, reward, terminated, truncated, info = envs.step(env_action.cpu().numpy())
                raw_rewards[step] = torch.as_tensor(reward, device=device)
                dones[step] = torch.as_tensor(terminated | truncated, device=device)
                if "_final_obs" in info:  # an episode ended in some env
                    # The last observations of the episodes that ended (raw_obs holds their reset ones); Box
                    # envs count them in the statistics too, before the reset ones: they are real states of the
                    # env (as in ppo_continuous.py, where counting them was measured: benchmarks/RESULTS.md).
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
        if obs_rms is not None:  # during the rollout each rank normalised with its own statistics; now every rank's
            obs_rms_agreed = merge_statistics_over_ranks(obs_rms, obs_rms_agreed, world_size)

        # ---- pi_old's distribution parameters, log-probs and values for the whole batch, one forward pass ----
        # (the parameters did not change during the rollout, so this is the policy that sampled the actions)
        b_obs = obs.reshape(batch_size, obs_dim)
        b_actions = actions.reshape((batch_size,) + actions.shape[2:])
        with torch.no_grad():
            b_old_params, b_values = agent(b_obs)  # [B, P], [B]
            b_logprobs = agent.logprob_entropy(b_old_params, b_actions)[0]
            values = b_values.reshape(T, N)
            # Box envs: divided by the std of the running discounted return (RewardScaler).
            if reward_scaler is not None:
                return_rms_before = reward_scaler.return_rms.state_dict()
                rewards = reward_scaler(raw_rewards, dones).float()
                merge_statistics_over_ranks(reward_scaler.return_rms, return_rms_before, world_size)  # torchrun
            else:
                rewards = raw_rewards.float()
            # A time limit is not a terminal state: the return goes on past it. Adding gamma * V(final obs)
            # to the last reward lets GAE stop at dones[t] = 1 as it does for a true terminal. For Box envs
            # rewards and V are both on the scaled scale, so the sum is consistent.
            rewards += args.gamma * truncated_at * agent.value(final_obs)
            advantages, returns = compute_gae(rewards, values, dones, agent.value(next_obs), args.gamma, args.gae_lambda)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

        # ---- update: update_epochs passes over the batch in num_minibatches shuffled minibatches, one beta ----
        stats = []  # one [7] tensor per minibatch, in the order of `names` below
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb_inds = b_inds[start : start + minibatch_size]
                new_params, new_values = agent(b_obs[mb_inds])
                new_logprob, entropy = agent.logprob_entropy(new_params, b_actions[mb_inds])
                kl = agent.kl(b_old_params[mb_inds], new_params)  # [M], exact KL(pi_old || pi_theta) per state
                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:  # over the global minibatch: every rank's part of it
                    mb_advantages = normalize_advantages_over_ranks(mb_advantages, world_size)
                pg_loss, surrogate, penalty = kl_penalty_loss(new_logprob, b_logprobs[mb_inds], mb_advantages, kl, beta)
                v_loss = value_loss(new_values, b_values[mb_inds], b_returns[mb_inds],
                                    args.clip_coef if args.clip_vloss else None)
                entropy_mean = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_mean + args.vf_coef * v_loss  # -L^KL - c_ent H + c_vf L^V
                # diagnostic only: the share of samples PPO-Clip would have clipped (nothing is clipped here)
                clipfrac = ((new_logprob - b_logprobs[mb_inds]).exp().sub(1.0).abs() > args.clip_coef).float().mean()

                optimizer.zero_grad()
                loss.backward()
                average_gradients(agent.parameters(), world_size)  # torchrun: the global minibatch's gradient
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                stats.append(torch.stack([pg_loss, v_loss, entropy_mean, clipfrac, loss, surrogate, penalty]).detach())

        # ---- diagnostics on the whole batch after the update: one host sync per iteration ----
        with torch.no_grad():
            new_params, _ = agent(b_obs)
            kl_exact = agent.kl(b_old_params, new_params).mean()  # the measured KL that steers beta
            kl_k1, kl_k3 = approx_kl(agent.logprob_entropy(new_params, b_actions)[0], b_logprobs)
            # torchrun: over the global batch, so every rank steers beta by the same KL to the same value
            kl_exact, kl_k1, kl_k3 = mean_over_ranks(torch.stack([kl_exact, kl_k1, kl_k3]), world_size)
            ev = explained_variance(gather_over_ranks(b_values, world_size), gather_over_ranks(b_returns, world_size))
        names = ("policy_loss", "value_loss", "entropy", "clipfrac", "loss", "surrogate", "kl_penalty")
        # [update_epochs * num_minibatches, 7]; torchrun: a NaN on any rank reaches every rank
        stats = mean_over_ranks(torch.stack(stats), world_size)
        bad = (~torch.isfinite(stats)).nonzero()
        if len(bad) or not torch.isfinite(kl_exact):
            logger.close()
            envs.close()
            stop_signal.restore()
            if len(bad):
                minibatch, column = bad[0].tolist()
                value = stats[minibatch, column].item()
                where = f"{names[column]} is {value} at iteration {iteration}, minibatch {minibatch + 1}"
            else:
                where = f"kl_exact is {kl_exact.item()} at iteration {iteration}, after the update"
            raise SystemExit(f"error: {where} (step {global_step}); stopping, nothing saved")
        means = stats.mean(0).tolist()
        ended, ended_lengths = gather_episodes(ended_return, ended_length, device, world_size)  # every rank's
        last_100.extend(ended.tolist())
        elapsed = time.time() - start_time
        logger.log({
            "iteration": iteration,
            "global_step": global_step,
            "time": elapsed,
            "sps": global_step / elapsed,
            "learning_rate": lr,
            **dict(zip(names, means)),
            "beta": beta,  # the beta this iteration's update used
            "kl_target": args.kl_target,
            "kl_exact": kl_exact.item(),
            "approx_kl_k1": kl_k1.item(),
            "approx_kl_k3": kl_k3.item(),
            "explained_variance": ev.item(),
            "update_minibatches": len(stats),
            "episodes": len(ended),
            "episodic_return": float(ended.mean()) if len(ended) else None,
            "episodic_length": float(ended_lengths.mean()) if len(ended) else None,
            "episodic_return_100": float(np.mean(last_100)) if last_100 else None,
        })
        beta = update_beta(beta, kl_exact.item(), args.kl_target)  # for the next iteration
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
        "beta": beta,
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
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be > 0, got {args.learning_rate}")
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes", "torch_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches != 0:
        raise ValueError(
            f"--num-minibatches {args.num_minibatches} does not divide the batch size "
            f"{batch_size} (= --num-envs {args.num_envs} x --num-steps {args.num_steps})"
        )
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        raise ValueError("minibatches of 1 sample cannot be normalised (--norm-adv): use fewer --num-minibatches")
    if args.total_timesteps < batch_size:
        raise ValueError(f"--total-timesteps {args.total_timesteps} is smaller than one batch ({batch_size} steps)")
    if not 0 < args.gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not 0 <= args.gae_lambda <= 1:
        raise ValueError(f"--gae-lambda must be in [0, 1], got {args.gae_lambda}")
    if not (math.isfinite(args.kl_target) and args.kl_target > 0):
        raise ValueError(f"--kl-target must be > 0, got {args.kl_target}")
    if not BETA_MIN <= args.init_beta <= BETA_MAX:
        raise ValueError(f"--init-beta must be in [{BETA_MIN:g}, {BETA_MAX:g}], got {args.init_beta}")
    if args.clip_coef <= 0:
        raise ValueError(f"--clip-coef must be > 0, got {args.clip_coef}")
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


def ignore_stop_signals(thunk):
    """An env factory for AsyncVectorEnv's worker processes that makes them ignore SIGINT and SIGTERM, which a
    terminal's Ctrl-C sends to every process of the job: the main process stops the run and closes them. In the
    process that wraps it (where AsyncVectorEnv also builds one env, to read its spaces) it changes nothing."""
    main_pid = os.getpid()

    def make_env():
        if os.getpid() != main_pid:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return thunk()

    return make_env


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


class ResumableEnv(gym.Wrapper):
    """One env of an AsyncVectorEnv whose state the main process can read and set (see
    ResumableEpisodeStatistics): AsyncVectorEnv.call(name, ...) calls this wrapper's method in the env's process."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index = index  # which entry of a list of every env's states is this env's

    def get_state(self) -> Optional[dict]:
        return env_state(self.env)

    def set_state(self, states: list) -> None:
        restore_env_state(self.env, states[self.index])


class ResumableEpisodeStatistics(gym.wrappers.vector.RecordEpisodeStatistics):
    """gymnasium's RecordEpisodeStatistics over an AsyncVectorEnv of ResumableEnvs, with the vector env's
    get_state/set_state: every env's state, read and set in its own process, and the running episode returns and
    lengths (its episode clocks restart: info["episode"]["t"] is not used here)."""

    def get_state(self) -> Optional[dict]:
        states = self.env.call("get_state")
        if any(state is None for state in states):
            return None
        return {"envs": list(states), "episode_return": torch.from_numpy(self.episode_returns.copy()),
                "episode_length": torch.from_numpy(self.episode_lengths.astype(np.int64))}

    def set_state(self, state: dict) -> None:
        self.env.call("set_state", state["envs"])
        self.episode_returns[:] = state["episode_return"].numpy()
        self.episode_lengths[:] = state["episode_length"].numpy()


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


def make_envs(args: Args, run_name: Optional[str], discrete: bool) -> gym.vector.VectorEnv:
    """Vector env with SAME_STEP autoreset: when an episode ends, step() returns the first observation of the
    next episode and puts the last one in info["final_obs"]. So obs[t] -> obs[t+1] is never a fake transition
    from one episode into the next, and a truncated episode can be bootstrapped from its real final obs. Ended
    episodes' returns and lengths come in info["episode"] (RecordEpisodeStatistics' keys).
    Discrete envs, and a single Box env, step one after another in this process (SameStepVectorEnv). More than
    one Box env run each in its own process (AsyncVectorEnv), as in ppo_continuous.py: MuJoCo physics is most of
    a step's cost, and this way the envs step on several cores at once. The Discrete envs this script runs
    (classic control) take less time to step than a round trip through a worker's pipe, so subprocesses would
    only slow them down. Either way the same seeds give the same transitions: the logged metrics do not depend on
    where the envs step (a test compares them)."""
    if args.capture_video:
        render_offscreen_if_headless(args.env_id)

    def make_one(index: int):
        def thunk():
            if args.capture_video and index == 0 and run_name is not None:  # env 0 of rank 0
                env = gym.make(args.env_id, render_mode="rgb_array")
                return gym.wrappers.RecordVideo(env, f"videos/{run_name}", disable_logger=True)
            return gym.make(args.env_id)

        return thunk

    env_fns = [make_one(i) for i in range(args.num_envs)]
    if discrete or args.num_envs == 1:
        return SameStepVectorEnv(env_fns)
    def resumable(index: int):  # in the worker: the env, with get_state/set_state for --save-every and --resume
        return lambda: ResumableEnv(env_fns[index](), index)

    # Ctrl-C reaches the workers too; main() stops them
    envs = gym.vector.AsyncVectorEnv([ignore_stop_signals(resumable(i)) for i in range(args.num_envs)],
                                     autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return ResumableEpisodeStatistics(envs)


def check_env(env_id: str) -> tuple[int, int, bool]:
    """(obs_dim, act_dim, discrete) of env_id, or ValueError saying why this script cannot train on it.
    act_dim: the number of actions (Discrete) or the action vector's length (Box)."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as err:  # unknown id, wrong version, missing extra (box2d, mujoco, ...)
        raise ValueError(f"cannot make env {env_id!r}: {err}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"{env_id} observations are {obs_space}; this script needs a flat Box (a vector)")
    if isinstance(act_space, gym.spaces.Discrete):
        return obs_space.shape[0], int(act_space.n), True
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        raise ValueError(
            f"{env_id} has a {type(act_space).__name__} action space {act_space}; this script needs Discrete "
            "or a 1-D Box"
        )
    if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
        raise ValueError(f"{env_id} has an unbounded Box action space {act_space}; this script clips actions "
                         "to finite bounds")
    return obs_space.shape[0], act_space.shape[0], False


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

        print(
            f"iter {metrics['iteration']:>4}/{self.num_iterations} step {metrics['global_step']:>8} | "
            f"return {show('episodic_return', '8.1f')} (last 100: {show('episodic_return_100', '8.1f')}) | "
            f"beta {metrics['beta']:.3g} kl {show('kl_exact', '.4f')} (k3 {show('approx_kl_k3', '.4f')}) "
            f"ent {show('entropy', '.3f')} ev {show('explained_variance', '5.2f')} | sps {metrics['sps']:.0f} | "
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
    """Returns of `episodes` full episodes of the saved agent acting greedily (argmax of the logits, or the
    Gaussian's mean clipped to the action bounds). Box envs: observations normalised with the saved
    statistics, frozen (evaluation never updates them); returns are the env's raw rewards."""
    env_id = checkpoint["args"]["env_id"]
    obs_dim, act_dim, discrete = check_env(env_id)
    agent = Agent(obs_dim, act_dim, discrete).to(device)
    agent.load_state_dict(checkpoint["model"])
    obs_rms = None
    if not discrete:
        obs_rms = RunningMeanStd((obs_dim,), device)
        obs_rms.load_state_dict(checkpoint["obs_rms"])
    env = gym.make(env_id)
    if not discrete:
        low = torch.as_tensor(env.action_space.low, dtype=torch.float32, device=device)
        high = torch.as_tensor(env.action_space.high, dtype=torch.float32, device=device)
    returns = np.zeros(episodes)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            # as in training: the env's observation, as it comes, into the normaliser (float64 for MuJoCo)
            if obs_rms is not None:
                obs_t = obs_rms.normalize(obs[None])  # [1, obs_dim]
            else:
                obs_t = torch.as_tensor(obs[None], dtype=torch.float32, device=device)
            with torch.no_grad():
                action = agent.greedy(agent.dist_params(obs_t))[0]
            if discrete:
                obs, reward, terminated, truncated, _ = env.step(int(action))
            else:
                obs, reward, terminated, truncated, _ = env.step(torch.clamp(action, low, high).cpu().numpy())
            returns[episode] += reward
            done = terminated or truncated
    env.close()
    return returns


if __name__ == "__main__":
    main()
