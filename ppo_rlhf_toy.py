"""RLHF on a toy task, in one file: SFT -> Bradley-Terry reward model -> PPO with a KL penalty to the reference
policy (or the critic-free GRPO, RLOO), and the direct methods DPO, IPO, KTO on the same preference pairs. The
reward is the learnt proxy or the hidden truth itself (a verifier). Everything is synthetic, so the truth is known.

Run:
    python ppo_rlhf_toy.py                                   # the whole pipeline (run time: benchmarks/RESULTS.md)
    python ppo_rlhf_toy.py --beta 0 --ppo-iterations 80      # no KL penalty: proxy rises, gold peaks then falls
    python ppo_rlhf_toy.py --adaptive-kl --kl-target 2       # beta adapted to a KL target (Ziegler et al. 2019)
    python ppo_rlhf_toy.py --algo grpo --reward gold --direct ipo kto   # GRPO on the verifier's reward; IPO, KTO
    python ppo_rlhf_toy.py --algo rloo                       # RLOO on the proxy reward, then DPO
    python ppo_rlhf_toy.py --save-model                      # also writes runs/<run_name>/ppo_rlhf_toy.pt
    python ppo_rlhf_toy.py --eval-checkpoint runs/<run_name>/ppo_rlhf_toy.pt   # evaluate a saved pipeline
    python ppo_rlhf_toy.py --help                            # every flag, with its meaning

The toy world (a program knows the truth; no model ever sees it):
    prompt   x   prompt_len distinct content tokens, e.g. [7 3 12 5]
    response y   up to max_response_len tokens, the last real one EOS, e.g. [3 12 9 EOS]
    gold reward  g(x, y) = #(distinct prompt tokens in y) - 0.5 #(tokens not in the prompt)
                           - 1.0 #(repeats of a prompt token already in y) - 2.0 [y has no EOS]
                 Best: every prompt token once, then EOS: g = prompt_len (4).
    behaviour    the demonstrator: 1..demo_max_len content tokens, each a not-yet-used prompt token with
                 probability 0.8, else a random non-prompt token, then EOS. Mediocre: g ~ 2.1 of a possible 4.
    Room to be gamed: the proxy only ever sees pi_ref's samples, through 1024 noisy preference pairs (a small
    labelling budget). The demonstrator never repeats a prompt token, so pi_ref rarely does, and on its samples
    longer responses with more prompt tokens are better. Far from pi_ref the proxy extrapolates, and unpenalised
    PPO finds where it is wrong: repeated prompt tokens, longer responses, off-prompt tokens it over-scores (which
    one depends on the seed). The proxy keeps rising while the gold reward falls, as in Gao et al. (2022).

Stages (each logs rows with a "stage" key to runs/<run_name>/metrics.jsonl and a line to stdout):
    sft  pi_ref = a tiny causal transformer LM fitted to demonstrations (cross-entropy on response tokens)
    rm   pairs of pi_ref samples labelled by sampling Bradley-Terry on the gold reward (noisy, like human labels);
         proxy reward r_phi = the SFT trunk + a scalar head, loss -log sigmoid(r_w - r_l), then normalised to
         mean 0, std 1 on pi_ref samples (Ziegler et al. 2019); held-out accuracy against labels and gold
    ppo  per-token reward -beta (log pi - log pi_ref) on every response token + r_phi(x, y) on the last one,
         GAE over tokens, PPO-Clip; value model initialised from the reward model; fixed or adaptive beta.
         Every iteration logs the proxy AND the gold reward, so over-optimisation (Gao et al. 2022) is measured.
         --algo grpo / rloo: no value model; --group-size responses per prompt, the group is the baseline.
         --reward gold: the gold reward is R(x, y) (a verifier), the proxy is only logged.
    dpo, ipo, kto  (--direct) the same preference pairs, straight into the policy: no reward model, no rollouts

What it implements, by section of the article "PPO and TRPO -- Trust Region Policy Optimization":
    "PPO inside RLHF: the three-stage pipeline"  SFT, Bradley-Terry RM, PPO          -> main, bradley_terry_loss
    "The RLHF objective"   J = E[R_phi(x, y) - beta KL(pi || pi_ref)], per token       -> token_rewards
    "Two trust regions"    the clip per update, the KL to pi_ref over the whole run     -> ppo_clip_loss, token_rewards
    "Adaptive KL penalty"  beta moved towards a KL target (Ziegler's controller)       -> AdaptiveKLController
    "Why RLHF is harder than CartPole"  learnt, noisy RM; low-variance GAE over tokens -> compute_gae, main
    "Where DPO, IPO and KTO fit"  DPO's contrastive loss on the pairs; IPO's squared    -> dpo_loss, ipo_loss,
                           loss to a target margin; KTO's single labelled responses       kto_loss, train_direct
    "... where a verifier provides reward"  --reward gold; the critic-free PPO family    -> group_advantages,
                           used with it today: GRPO, RLOO                                  leave_one_out_advantages,
                                                                                           grpo_loss, run_critic_free
    "A complete PPO implementation"  GAE, minimise -L^CLIP + c_vf L^V - c_ent H,       -> compute_gae, ppo_clip_loss,
                                     grad-norm clip                                     value_loss, run_ppo
    "Debugging checklist"  approx KL k1/k3, clip fraction, explained variance,
                           advantage whitening (over real tokens only)                -> approx_kl, explained_variance,
                                                                                        masked_whiten

Shared with the other scripts, copied verbatim: compute_gae (here T = response tokens, N = responses, dones[t] = 1
at the last real token), ppo_clip_loss, approx_kl, value_loss, explained_variance, sample_categorical. The losses
are called on the real tokens only (tensor[mask]), which makes their plain means the masked means.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT = "ppo_rlhf_toy"
PAD, EOS = 0, 1  # token ids
FIRST_CONTENT = 2  # content tokens (prompts and answers) are FIRST_CONTENT .. vocab_size - 1
OFF_PROMPT_COST = 0.5  # gold reward lost per response token that is not in the prompt
REPEAT_COST = 1.0  # gold reward lost per repeat of a prompt token already in the response
UNFINISHED_COST = 2.0  # gold reward lost by a response that has no EOS


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name runs/rlhf-toy__<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of python, numpy and torch: the data, the initial weights, the sampling"""
    torch_deterministic: bool = True
    """if set, cuDNN picks deterministic kernels (`torch.backends.cudnn.deterministic = True`)"""
    cuda: bool = False
    """run the models on the GPU if there is one (falls back to the CPU with a notice)"""
    torch_threads: int = 1
    """CPU threads torch may use (1 is right for models this small and a shared machine)"""
    track: bool = False
    """log to Weights & Biases (works with WANDB_MODE=offline; a wandb error never stops training)"""
    wandb_project_name: str = "trust-region-rl"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user); None: your default entity"""
    save_model: bool = False
    """write runs/<run_name>/ppo_rlhf_toy.pt at the end (the four models, the DPO policy, args), then evaluate it"""
    eval_checkpoint: Optional[str] = None
    """if set: no training; load this checkpoint and evaluate pi_ref, the PPO and the DPO policy"""
    eval_episodes: int = 1024
    """prompts (one sampled response each) of the final evaluation table and of --eval-checkpoint"""

    # The toy world
    vocab_size: int = 16
    """tokens: PAD, EOS and vocab_size - 2 content tokens"""
    prompt_len: int = 4
    """distinct content tokens per prompt; the best response has each once, so the best gold reward is prompt_len"""
    max_response_len: int = 10
    """tokens a response may have, EOS included; a response without EOS by then is unfinished"""
    demo_max_len: int = 6
    """the behaviour policy writes 1..demo_max_len content tokens (uniform), then EOS"""
    demo_hit_prob: float = 0.8
    """probability that the behaviour policy's next token is a not-yet-used prompt token (else a non-prompt one)"""

    # The transformer (policy, reference, reward and value models all have this shape)
    d_model: int = 64
    """width of the residual stream"""
    n_layers: int = 2
    """transformer blocks"""
    n_heads: int = 4
    """attention heads per block; must divide d_model"""

    # Stage 1: supervised fine-tuning on demonstrations
    sft_steps: int = 500
    """Adam steps of SFT; every step draws a fresh batch of demonstrations"""
    sft_batch_size: int = 128
    """demonstrations per SFT step"""
    sft_learning_rate: float = 1e-3
    """Adam step size of SFT (tuned on the toy)"""

    # Stage 2: Bradley-Terry reward model
    num_pairs: int = 1024
    """preference pairs (two pi_ref responses to one prompt) to train the reward model, and DPO, on. A small
    labelling budget on purpose: with 4096 pairs the reward model is good enough that --beta 0 only plateaus
    within 100 iterations instead of visibly over-optimising (Gao et al.: smaller RMs are over-optimised sooner)"""
    heldout_pairs: int = 512
    """further pairs, never trained on, for the reward model's held-out accuracy and DPO's held-out loss"""
    rm_epochs: int = 2
    """passes over the training pairs"""
    rm_batch_size: int = 64
    """pairs per reward-model step"""
    rm_learning_rate: float = 3e-4
    """Adam step size of the reward model (tuned on the toy: 1e-3 overfits the noisy labels)"""

    # Stage 3: the online method against a reward (defaults: trl's PPO and Ziegler et al. 2019 where they apply)
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    """the online method: ppo (value model, GAE over tokens, KL to pi_ref in the reward), grpo (group-normalised
    rewards, KL to pi_ref in the loss, no value model) or rloo (leave-one-out baseline, KL in the reward)"""
    reward: Literal["model", "gold"] = "model"
    """what the online method maximises: the learnt Bradley-Terry proxy (RLHF), or gold, the hidden true reward
    itself, as a verifier gives it (RL with a verifiable reward). The reward model is trained either way (it
    starts the value model and is always logged as the proxy)"""
    group_size: int = 8
    """grpo and rloo: responses sampled per prompt (a group); must divide --rollout-batch-size"""
    ppo_iterations: int = 60
    """iterations (rollout + update) of the online method"""
    rollout_batch_size: int = 256
    """responses per iteration (ppo: one per prompt; grpo, rloo: --group-size per prompt)"""
    learning_rate: float = 1e-4
    """Adam step size of the policy and the value model (tuned on the toy; approx KL per update ~0.015)"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over the PPO iterations"""
    num_minibatches: int = 4
    """minibatches (of whole responses) per epoch; must divide --rollout-batch-size, leaving two responses or more
    per minibatch with --norm-adv"""
    update_epochs: int = 4
    """passes over each rollout (trl: 4)"""
    gamma: float = 1.0
    """discount over the tokens of a response; 1 (trl, Ziegler) counts the final score fully at every token"""
    gae_lambda: float = 0.95
    """GAE lambda over tokens (trl: 0.95)"""
    norm_adv: bool = True
    """whiten advantages per minibatch over its real tokens (masked_whiten)"""
    clip_coef: float = 0.2
    """epsilon of the clipped surrogate (the article: 0.2; small in RLHF)"""
    clip_vloss: bool = True
    """clip the value update to +-clip_coef around the rollout's values, as in PPO2 and trl"""
    ent_coef: float = 0.0
    """weight of the entropy bonus; 0 as in trl: the KL to pi_ref already keeps the policy from collapsing"""
    vf_coef: float = 0.5
    """weight of the value loss (the value model is separate, so this only matters through the shared grad clip)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm of policy + value model to this (trl: 1.0)"""
    target_kl: Optional[float] = None
    """if set, stop the update at the first minibatch whose approx KL (k3, per token) to pi_old exceeds it"""
    temperature: float = 1.0
    """sampling temperature; the log-probs of the ratio and of the KL use the same temperature"""
    beta: float = 0.1
    """KL coefficient of the per-token penalty -beta (log pi - log pi_ref); with --adaptive-kl its initial value.
    In the article's range for real RLHF (0.01 to 0.2); here 0.05 lets the KL drift past 2 nats on some seeds,
    where the proxy is already being gamed, and 0 removes the penalty (over-optimisation)"""
    adaptive_kl: bool = False
    """move beta towards --kl-target with Ziegler et al.'s proportional controller (AdaptiveKLController)"""
    kl_target: float = 2.0
    """target KL(pi || pi_ref) per response, in nats, of --adaptive-kl (Ziegler et al. used 6 for 24-token texts)"""
    kl_horizon: int = 2000
    """horizon of --adaptive-kl, in responses (Ziegler: 10000); beta moves at most 20% x batch/horizon per iteration"""
    missing_eos_reward: float = -1.0
    """score given, instead of the reward model's, to a response without EOS (Ziegler et al. used -1)"""

    # Stage 4: the direct methods, each from pi_ref on the same preference pairs
    direct: tuple[Literal["dpo", "ipo", "kto"], ...] = ("dpo",)
    """the direct methods to run after the online one, each a policy of its own (--direct with nothing: none)"""
    dpo_beta: float = 0.1
    """DPO's beta: the strength of the implicit KL to pi_ref (Rafailov et al.: 0.1)"""
    ipo_tau: float = 0.5
    """IPO's tau: the loss pulls the margin of length-averaged log-ratios to 1 / (2 tau) (tuned on the toy:
    TRL's 0.1 asks for a margin of 5 nats per token, far past where the gold reward peaks here)"""
    kto_beta: float = 0.1
    """KTO's beta (Ethayarajh et al.: 0.1)"""
    kto_desirable_weight: float = 1.0
    """KTO's lambda_D; with paired data as here, as many desirable as undesirable responses, 1 and 1 (TRL)"""
    kto_undesirable_weight: float = 1.0
    """KTO's lambda_U"""
    direct_epochs: int = 8
    """passes over the training pairs, for each direct method"""
    direct_batch_size: int = 64
    """pairs per step (KTO: both responses of each pair, as single labelled responses)"""
    direct_learning_rate: float = 1e-4
    """Adam step size of the direct methods (tuned on the toy for DPO: 3e-4 over-optimises too, gold peaks then
    falls)"""
    direct_eval_every: int = 16
    """steps between evaluations (gold, proxy, KL on --rollout-batch-size fresh samples)"""


# ----------------------------------------------------------------------------------------------------------
# Pure functions: tensors in, tensors out. The tests import these.
# ----------------------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise reward-model loss -mean(log sigmoid(r_w - r_l)) (Bradley-Terry: P(w > l) = sigmoid(r_w - r_l)).

    Written with logsigmoid, which stays finite for large negative margins where log(sigmoid(.)) gives -inf.
    Its gradient raises r_chosen and lowers r_rejected, by sigmoid(r_l - r_w) / n each.

    Example: r_w = [2.], r_l = [0.] -> -log sigmoid(2) = log(1 + e^-2) = 0.1269; r_w = r_l -> log 2 = 0.6931.
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(
    pi_logp_chosen: torch.Tensor,
    pi_logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): the RLHF objective's optimal policy written in closed form, fitted to pairs.

    Inputs are sequence log-probs [B] (sums over the response tokens). The implicit reward of a response is
    beta * (log pi(y|x) - log pi_ref(y|x)); the loss is Bradley-Terry on it:
        loss = -mean(log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))))
    Returns (loss, chosen implicit rewards [B], rejected implicit rewards [B]); the rewards are detached.

    Example: pi == ref -> margin 0 -> loss log 2 = 0.6931. beta = 0.5, pi_w - ref_w = 2, pi_l - ref_l = 0:
    margin 1, loss log(1 + e^-1) = 0.3133.
    """
    chosen_rewards = beta * (pi_logp_chosen - ref_logp_chosen)
    rejected_rewards = beta * (pi_logp_rejected - ref_logp_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(
    pi_logp_chosen: torch.Tensor,
    pi_logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): a squared loss on the same margin as DPO, which stops at a finite target.

    Inputs are length-averaged log-probs [B] (the mean over a response's real tokens, as the IPO paper's
    experiments and TRL's loss_type="ipo" use; response_logps(..., average=True)). With the margin
        h = (pi_w - ref_w) - (pi_l - ref_l),      loss = mean((h - 1 / (2 tau))^2).
    DPO's -log sigmoid(beta h) keeps falling as h grows, so a pair labelled the same way every time is pushed
    apart without end (the overfitting the article mentions); IPO's loss is smallest at h = 1 / (2 tau) and
    pulls h back from beyond it. Returns (loss, chosen log-ratios [B], rejected log-ratios [B]), detached.

    Example: tau = 0.5 (target h = 1); pi_w - ref_w = 2, pi_l - ref_l = 0: h = 2, loss (2 - 1)^2 = 1.
    """
    chosen_logratios = pi_logp_chosen - ref_logp_chosen
    rejected_logratios = pi_logp_rejected - ref_logp_rejected
    h = chosen_logratios - rejected_logratios
    loss = (h - 1.0 / (2.0 * tau)).pow(2).mean()
    return loss, chosen_logratios.detach(), rejected_logratios.detach()


def kto_reference_point(pi_logp_mismatched: torch.Tensor, ref_logp_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_ref, an estimate of KL(pi || pi_ref) (Ethayarajh et al. 2024, section 4.1):
    the mean log-ratio of responses paired with prompts they were not written for (each response of the batch
    with another response's prompt), clamped at 0 (a KL is never negative) and detached (no gradient flows
    through it, as in the paper). Inputs: sequence log-probs [B] of the mismatched pairs. Returns a scalar.

    Example: pi [-3, -5], ref [-4, -5] -> mean(1, 0) = 0.5;  pi [-5], ref [-4] -> max(-1, 0) = 0.
    """
    return (pi_logp_mismatched - ref_logp_mismatched).mean().clamp(min=0.0).detach()


def kto_loss(
    pi_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    z_ref: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024): single responses labelled desirable or not, no pairs needed.

    pi_logp, ref_logp: sequence log-probs [B]; desirable: [B] bool; z_ref from kto_reference_point. With the
    implicit reward r = log pi(y|x) - log pi_ref(y|x), the value of a response is
        v = sigmoid(beta (r - z_ref))   if desirable    (gain: above the reference point)
        v = sigmoid(beta (z_ref - r))   if undesirable  (loss: below it)
    and loss = mean(w(y) (1 - v)) with w = desirable_weight (lambda_D) or undesirable_weight (lambda_U).
    Returns (loss, r [B] detached).

    Example: beta 1, z_ref 0, weights 1; a desirable response with r = 0: 1 - sigmoid(0) = 0.5; an undesirable
    one with r = -2: 1 - sigmoid(2) = 0.1192; their mean 0.3096.
    """
    logratios = pi_logp - ref_logp
    value = torch.where(desirable, torch.sigmoid(beta * (logratios - z_ref)), torch.sigmoid(beta * (z_ref - logratios)))
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    return (weight * (1.0 - value)).mean(), logratios.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage (Shao et al. 2024): each response's reward against the other answers to the same prompt,
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps),
    the group's mean replacing the critic as the baseline. rewards: [B], groups of group_size consecutive rows
    (the responses to one prompt). std is the unbiased one (TRL's). A group whose responses score the same has
    nothing to learn from: all its advantages are 0. Returns [B].

    Example: group_size 2, rewards [1, 3, 5, 5] -> [-0.7071, 0.7071, 0, 0] (std of [1, 3] is 1.414).
    """
    grouped = rewards.reshape(-1, group_size)  # reshape, not view: any strided [B] tensor will do
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (Ahmadian et al. 2024; Kool et al. 2019): each of the k responses to a prompt against
    the mean reward of the other k - 1, a baseline that does not depend on the sample itself, so the
    REINFORCE estimate stays unbiased. rewards: [B], groups of group_size (= k) consecutive rows. Returns [B].

    Example: k = 3, rewards [1, 2, 6]: baselines [4, 3.5, 1.5] -> [-3, -1.5, 4.5].
    """
    grouped = rewards.reshape(-1, group_size)  # reshape, not view: any strided [B] tensor will do
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def grpo_loss(
    new_logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_coef: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's objective (Shao et al. 2024, eq. 3), negated to minimise. Token log-probs [B, L] under pi_theta,
    pi_old and pi_ref; advantages [B], one per response, given to each of its tokens; mask [B, L].

    Per real token t:  r_t = pi_theta / pi_old,  L_t = min(r_t A, clip(r_t, 1-eps, 1+eps) A)   (PPO-Clip)
                       KL_t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1                 (k3, >= 0)
    loss = -mean over responses of (mean over the response's tokens of L_t - beta KL_t)
    The KL to pi_ref is a term of the loss, not of the reward as in PPO-RLHF (token_rewards), and there is
    no value model. Averaging per response first, as the paper does, gives a short response's tokens more
    weight than a long one's. Returns (loss, clip fraction over real tokens, mean KL_t), the last two detached.

    Example: one response of two tokens, all log-probs 0, A = 1: r = 1, KL = 0 -> loss -1, clipfrac 0.
    """
    real = mask.bool()
    ratio = (new_logprob - old_logprob).exp()
    surrogate = torch.min(ratio * advantages.unsqueeze(1),
                          ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef) * advantages.unsqueeze(1))
    log_ref_ratio = ref_logprob - new_logprob  # log(pi_ref / pi_theta)
    kl = log_ref_ratio.exp() - log_ref_ratio - 1.0
    per_token = torch.where(real, surrogate - beta * kl, 0.0)
    per_response = per_token.sum(dim=1) / real.sum(dim=1)  # every response has >= 1 real token
    clipfrac = ((ratio - 1.0).abs() > clip_coef)[real].float().mean()
    return -per_response.mean(), clipfrac.detach(), kl[real].mean().detach()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over the positions where mask is 1 (padding ignored, even if it holds inf or NaN).

    Example: values [[1, 2, 9]], mask [[1, 1, 0]] -> 1.5.
    """
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / (std + 1e-8) with mean and std over the real positions only; padding is returned as 0.

    The same arithmetic as normalize_advantages in the other scripts (unbiased std), so for two or more real
    tokens masked_whiten(x, mask)[mask] == normalize_advantages(x[mask]): whitening the padded batch is whitening
    the real tokens alone. One real token has no spread to estimate: where the unbiased std (and so
    normalize_advantages) gives NaN, its value comes out 0, its distance from the mean. run_ppo never whitens
    fewer than two tokens: check_args refuses minibatches of one response (which may be a lone EOS).

    Example: values [[1, 3, 100]], mask [[1, 1, 0]] -> mean 2, std 1.414 -> [[-0.7071, 0.7071, 0]].
    """
    mask = mask.bool()
    centred = torch.where(mask, values - masked_mean(values, mask), 0.0)
    std = (centred.pow(2).sum() / (mask.sum() - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std, from 2 tokens on
    return torch.where(mask, centred / (std + 1e-8), 0.0)


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """1.0 for the real tokens of each response, up to and including its first EOS; 0.0 for the padding after.
    A response without EOS is real to the end. responses: [B, L] -> [B, L] float.

    Example: [[5, EOS, PAD, PAD], [4, 6, 7, 8]] -> [[1, 1, 0, 0], [1, 1, 1, 1]].
    """
    eos = (responses == EOS).long()
    eos_before = eos.cumsum(dim=1) - eos  # EOS tokens strictly before each position
    return (eos_before == 0).float()


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs log softmax(logits)[token] of the given tokens, 0 on padding.

    logits: [B, L, V], already aligned (logits[:, t] is the distribution that produced tokens[:, t]) and already
    divided by the sampling temperature. tokens, mask: [B, L]. Returns [B, L]; sum(-1) is log pi(y | x).
    torch.where (not a product with the mask) so that whatever sits in the padded logits, NaN included, is ignored.

    Example: logits [[[0, 0], [9, 9]]] (two uniform steps), tokens [[1, 0]], mask [[1, 0]] -> [[-0.6931, 0]].
    """
    logprobs = logits.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, L]
    return torch.where(mask.bool(), logprobs, 0.0)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at every position [B, L], 0 on padding. logits: [B, L, V]."""
    log_probs = logits.log_softmax(dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return torch.where(mask.bool(), entropy, 0.0)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi(.|prefix) || pi_ref(.|prefix)) at every position [B, L], 0 on padding; logits: [B, L, V].
    Summed over a sampled response it is an unbiased, never negative, estimate of the sequence KL: lower variance
    than the sampled log-ratio (k1) the reward uses, so it is the one plotted (Gao et al.'s sqrt(KL) axis)."""
    log_p, log_q = logits.log_softmax(dim=-1), ref_logits.log_softmax(dim=-1)
    return torch.where(mask.bool(), (log_p.exp() * (log_p - log_q)).sum(dim=-1), 0.0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: the EOS, or the last position of a response without one.
    mask: [B, L] -> [B] long. Example: [[1, 1, 0], [1, 1, 1]] -> [1, 2]."""
    return mask.long().sum(dim=1) - 1


def episode_dones(mask: torch.Tensor) -> torch.Tensor:
    """dones [B, L] for compute_gae over tokens: 1.0 at the last real token of each response (the episode ends
    with that action), 0.0 elsewhere, padding included.
    Example: mask [[1, 1, 0], [1, 1, 1]] -> [[0, 1, 0], [0, 0, 1]]."""
    return torch.zeros_like(mask, dtype=torch.float).scatter(1, last_token_index(mask).unsqueeze(1), 1.0)


def token_rewards(
    score: torch.Tensor, logprob: torch.Tensor, ref_logprob: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards of the RLHF objective J = E[R(x, y) - beta KL(pi || pi_ref)] (Ziegler et al. 2019).

    Every real token t gets -beta * (log pi(y_t) - log pi_ref(y_t)) (the sampled KL, k1); the last real token
    (the EOS, or the last position of an unfinished response) also gets the sequence's score. Padding gets 0.
    score: [B]; logprob, ref_logprob, mask: [B, L]. The sum over t is R - beta * (log pi(y|x) - log pi_ref(y|x)).

    Example: score [2], logprob [[-1, -1, 0]], ref_logprob [[-2, -1, 0]], mask [[1, 1, 0]], beta 0.5
    -> [[-0.5, 2, 0]].
    """
    mask = mask.bool()
    rewards = torch.where(mask, -beta * (logprob - ref_logprob), 0.0)  # [B, L]
    last = last_token_index(mask).unsqueeze(1)  # [B, 1]
    return rewards.scatter_add(1, last, score.unsqueeze(1).to(rewards.dtype))


class AdaptiveKLController:
    """beta of the KL penalty, moved towards a target KL by Ziegler et al. (2019)'s proportional controller:

        e    = clip(KL / kl_target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    KL is the measured KL(pi || pi_ref) per response of the last batch and n_steps the responses in it. Above
    the target beta grows, below it shrinks, by at most 20% x n_steps / horizon per update.

    Example: beta 0.1, target 6, horizon 10000; KL 12 after 2000 responses -> e = 0.2, beta 0.1 * 1.04 = 0.104.
    """

    def __init__(self, init_beta: float, kl_target: float, horizon: int):
        self.value, self.kl_target, self.horizon = init_beta, kl_target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = float(np.clip(current_kl / self.kl_target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant beta with the AdaptiveKLController interface."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ----------------------------------------------------------------------------------------------------------
# The PPO functions, verbatim copies of ppo_discrete.py's (tests/test_contract.py keeps them identical).
# Here T = response tokens and N = responses: compute_gae gets [L, B] tensors.
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


def ppo_clip_loss(
    new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative clipped surrogate -L^CLIP (to minimise) and the clip fraction.

    r = pi_theta / pi_old = exp(new_logprob - old_logprob); L^CLIP = mean(min(r A, clip(r, 1-eps, 1+eps) A)).
    The min makes it pessimistic: for A > 0 the gradient vanishes once r > 1+eps, for A < 0 once r < 1-eps;
    inside the band it equals the plain importance-sampling gradient.
    clipfrac: share of samples with |r - 1| > eps (the checklist's "10-30% is healthy").

    Example: r = 1.5, A = 2, eps = 0.2 -> min(3.0, 1.2 * 2) = 2.4, loss -2.4, clipfrac 1.
    """
    ratio = (new_logprob - old_logprob).exp()
    surrogate = ratio * advantages
    clipped_surrogate = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef) * advantages
    loss = -torch.min(surrogate, clipped_surrogate).mean()
    clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return loss, clipfrac


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


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """One action per row of logits [B, A], drawn from softmax(logits), by the Gumbel-max trick:
    argmax(logits + g) with Gumbel noise g = -log(E), E ~ Exp(1). The same distribution as torch.multinomial
    of the softmax, with fewer ops."""
    gumbel = -torch.empty_like(logits).exponential_().log()
    return (logits + gumbel).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The toy world: prompts, the demonstrator, the gold reward
# ----------------------------------------------------------------------------------------------------------


def sample_prompts(n: int, prompt_len: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """n prompts [n, prompt_len] of distinct content tokens (ids FIRST_CONTENT .. vocab_size - 1)."""
    scores = torch.rand(n, vocab_size - FIRST_CONTENT, generator=generator)
    return scores.argsort(dim=1)[:, :prompt_len] + FIRST_CONTENT


def gold_reward(prompts: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden true reward g(x, y) [B]. prompts [B, P]; responses, mask [B, L].

    g = #(distinct prompt tokens in y) - 0.5 #(tokens not in the prompt) - 1.0 #(repeats of a prompt token)
        - 2.0 [no EOS]
    PAD or EOS inside a response count as tokens not in the prompt; the final EOS costs nothing.

    Example, prompt [7 3 12 5]:  y = [3 12 EOS] -> 2;  [3 9 EOS] -> 1 - 0.5 = 0.5;  [3 3 3 EOS] -> 1 - 2 = -1;
    [12 5 7 3 EOS] -> 4 (the best).
    """
    mask = mask.bool()
    last = last_token_index(mask).unsqueeze(1)
    finished = responses.gather(1, last).squeeze(1) == EOS  # [B]
    is_last = torch.zeros_like(mask).scatter(1, last, True)
    content = mask & ~(is_last & finished.unsqueeze(1))  # real tokens but the final EOS
    in_prompt = (responses.unsqueeze(2) == prompts.unsqueeze(1)).any(dim=2) & content  # [B, L]
    L = responses.shape[1]
    earlier = torch.ones(L, L, dtype=torch.bool, device=responses.device).tril(diagonal=-1)  # [t, s]: s < t
    seen_before = ((responses.unsqueeze(2) == responses.unsqueeze(1)) & earlier & content.unsqueeze(1)).any(dim=2)
    distinct = (in_prompt & ~seen_before).sum(dim=1)
    repeats = (in_prompt & seen_before).sum(dim=1)
    off_prompt = (content & ~in_prompt).sum(dim=1)
    score = distinct - OFF_PROMPT_COST * off_prompt - REPEAT_COST * repeats
    return score - UNFINISHED_COST * (~finished).float()


def behaviour_policy(
    prompts: torch.Tensor, max_response_len: int, demo_max_len: int, hit_prob: float, vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mediocre demonstrator. Returns responses [B, max_response_len] (content, EOS, then PAD) and the
    log-probability [B] the demonstrator gave each one (for the SFT loss floor: the best an LM can reach).

    Length k ~ uniform{1..demo_max_len}; each of the k tokens is, with probability hit_prob, a uniformly chosen
    prompt token not used yet (while any is left), else a uniform non-prompt content token; then EOS.
    """
    B, P = prompts.shape
    n_off = vocab_size - FIRST_CONTENT - P  # non-prompt content tokens
    off_allowed = torch.ones(B, vocab_size, dtype=torch.bool)
    off_allowed[:, :FIRST_CONTENT] = False
    off_allowed.scatter_(1, prompts, False)
    lengths = torch.randint(1, demo_max_len + 1, (B,), generator=generator)
    unused = torch.ones(B, P, dtype=torch.bool)
    responses = torch.full((B, max_response_len), PAD, dtype=torch.long)
    logprob = torch.zeros(B)
    for t in range(demo_max_len + 1):
        writing, stopping = lengths > t, lengths == t
        if t >= 1:  # P(stop now | written t so far) = P(k = t | k >= t) = 1 / (demo_max_len - t + 1)
            p_stop = 1.0 / (demo_max_len - t + 1)
            go_lp = math.log(1.0 - p_stop) if p_stop < 1 else 0.0
            logprob += torch.where(stopping, math.log(p_stop), torch.where(writing, go_lp, 0.0))
        remaining = unused.sum(dim=1)  # [B]
        use_prompt = (torch.rand(B, generator=generator) < hit_prob) & (remaining > 0)
        pick = torch.where(unused, torch.rand(B, P, generator=generator), -1.0).argmax(dim=1)  # a random unused one
        off_token = torch.where(off_allowed, torch.rand(B, vocab_size, generator=generator), -1.0).argmax(dim=1)
        token = torch.where(use_prompt, prompts.gather(1, pick.unsqueeze(1)).squeeze(1), off_token)
        token_lp = torch.where(
            use_prompt,
            math.log(hit_prob) - remaining.clamp(min=1).float().log(),
            torch.where(remaining > 0, math.log((1.0 - hit_prob) / n_off), -math.log(n_off)),
        )
        logprob += torch.where(writing, token_lp, 0.0)
        responses[:, t] = torch.where(writing, token, torch.where(stopping, EOS, PAD))
        unused &= ~(F.one_hot(pick, P).bool() & (writing & use_prompt).unsqueeze(1))
    return responses, logprob


# ----------------------------------------------------------------------------------------------------------
# The model: a tiny GPT (pre-LayerNorm causal transformer) with an LM head and a scalar head
# ----------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)) (GPT-2's pre-LN block), causal attention."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(D, dim=2)
        q, k, v = (z.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for z in (q, k, v))  # [B, h, S, d/h]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # position s sees positions <= s only
        x = x + self.proj(attended.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """Token + position embeddings, n_layers blocks, final LayerNorm, then two heads on the same trunk:
    lm_head (next-token logits: policy, reference) and scalar_head (one number per position: reward, value).
    Causal, so the outputs at a position never depend on the tokens after it (the padding)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.scalar_head = nn.Linear(d_model, 1)
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def trunk(self, seq: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(seq.shape[1], device=seq.device)
        x = self.tok_emb(seq) + self.pos_emb(positions)  # [B, S, D]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.trunk(seq))  # [B, S, V]

    def scalar(self, seq: torch.Tensor) -> torch.Tensor:
        return self.scalar_head(self.trunk(seq)).squeeze(-1)  # [B, S]


def response_logits(model: TinyLM, seq: torch.Tensor, prompt_len: int, temperature: float) -> torch.Tensor:
    """Logits [B, L, V] of the distributions that produced the response tokens seq[:, prompt_len:]: the output
    at position prompt_len - 1 + t predicts response token t. Divided by the sampling temperature, so the
    log-probs of the PPO ratio and of the KL are those of the distribution the tokens were sampled from."""
    return model(seq)[:, prompt_len - 1 : -1] / temperature


def response_values(model: TinyLM, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(x, y_<t) [B, L]: the scalar head at the same positions as response_logits (the state before token t)."""
    return model.scalar(seq)[:, prompt_len - 1 : -1]


def proxy_score(reward_model: TinyLM, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """r_phi(x, y) [B]: the reward model's scalar head read at the last real token of each response."""
    scores = reward_model.scalar(seq)  # [B, S]
    return scores.gather(1, (prompt_len + last_token_index(mask)).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def generate(model: TinyLM, prompts: torch.Tensor, max_response_len: int, temperature: float) -> torch.Tensor:
    """Sample one response per prompt, token by token at `temperature`; after its EOS a row gets PAD.
    prompts [B, P] -> responses [B, max_response_len]. (No KV cache: at this size recomputing is cheap.)"""
    seq = prompts
    finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    for _ in range(max_response_len):
        if finished.all():
            seq = torch.cat([seq, torch.full_like(prompts[:, :1], PAD)], dim=1)
            continue
        token = sample_categorical(model(seq)[:, -1] / temperature)  # [B]
        token = torch.where(finished, PAD, token)
        seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
        finished |= token == EOS
    return seq[:, prompts.shape[1]:]


# ----------------------------------------------------------------------------------------------------------
# The four stages: SFT, reward model, PPO, DPO
# ----------------------------------------------------------------------------------------------------------


def train_sft(args: Args, data_gen: torch.Generator, device: torch.device, logger: Logger) -> tuple[TinyLM, float]:
    """Stage 1: pi_ref = the LM fitted to fresh demonstrations every step (cross-entropy on response tokens,
    EOS included; the prompt is given, not learnt). Returns the model and the mean loss of the last 10% of steps."""
    model = make_model(args, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.sft_learning_rate)
    P, log_every = args.prompt_len, max(1, args.sft_steps // 10)
    losses, floors = [], []
    for step in range(1, args.sft_steps + 1):
        prompts = sample_prompts(args.sft_batch_size, P, args.vocab_size, data_gen)
        responses, demo_logprob = behaviour_policy(prompts, args.max_response_len, args.demo_max_len,
                                                   args.demo_hit_prob, args.vocab_size, data_gen)
        prompts, responses = prompts.to(device), responses.to(device)
        mask = response_mask(responses)
        logits = response_logits(model, torch.cat([prompts, responses], dim=1), P, 1.0)
        loss = -masked_mean(sequence_logprobs(logits, responses, mask), mask)  # per-token cross-entropy
        check_finite([loss.detach().reshape(1)], ("sft_loss",), f"SFT step {step}", per_minibatch=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        floors.append(-demo_logprob.sum().item() / mask.sum().item())  # the demonstrator's own per-token NLL
        if step % log_every == 0 or step == args.sft_steps:
            logger.log({"stage": "sft", "step": step, "sft_loss": float(np.mean(losses[-log_every:])),
                        "sft_loss_floor": float(np.mean(floors[-log_every:]))})
    return model, float(np.mean(losses[-max(1, args.sft_steps // 10):]))


@torch.no_grad()
def make_preferences(ref_policy: TinyLM, n_pairs: int, args: Args, data_gen: torch.Generator,
                     device: torch.device) -> dict:
    """Pairs of pi_ref responses to the same prompt; chosen ~ Bradley-Terry on the gold reward:
    P(a preferred to b) = sigmoid(g(x, a) - g(x, b)), so one more covered prompt token wins 73% of the time."""
    prompts = sample_prompts(n_pairs, args.prompt_len, args.vocab_size, data_gen).to(device)
    a = generate(ref_policy, prompts, args.max_response_len, 1.0)
    b = generate(ref_policy, prompts, args.max_response_len, 1.0)
    gold_a, gold_b = gold_reward(prompts, a, response_mask(a)), gold_reward(prompts, b, response_mask(b))
    a_wins = torch.rand(n_pairs, generator=data_gen).to(device) < torch.sigmoid(gold_a - gold_b)
    chosen = torch.where(a_wins.unsqueeze(1), a, b)
    rejected = torch.where(a_wins.unsqueeze(1), b, a)
    return {"prompts": prompts, "chosen": chosen, "rejected": rejected,
            "gold_margin": torch.where(a_wins, gold_a - gold_b, gold_b - gold_a)}  # > 0: the label agrees with gold


def pair_scores(reward_model: TinyLM, pairs: dict, idx: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r_phi of the chosen and of the rejected responses of pairs idx, in one forward pass: ([n], [n])."""
    prompts = pairs["prompts"][idx]
    responses = torch.cat([pairs["chosen"][idx], pairs["rejected"][idx]])
    seq = torch.cat([torch.cat([prompts, prompts]), responses], dim=1)
    scores = proxy_score(reward_model, seq, response_mask(responses), P)
    return scores[: len(idx)], scores[len(idx):]


def train_reward_model(
    sft_model: TinyLM, train: dict, heldout: dict, args: Args, logger: Logger
) -> tuple[TinyLM, dict]:
    """Stage 2: the proxy r_phi = SFT trunk + scalar head, fitted with the Bradley-Terry loss, then an affine
    rescaling of its head so that r_phi has mean 0 and std 1 on pi_ref's responses (Ziegler et al. 2019), which
    gives beta the same meaning whatever the RM's scale. Returns the model and its held-out statistics."""
    reward_model = copy.deepcopy(sft_model).requires_grad_(True)
    optimizer = torch.optim.Adam(reward_model.parameters(), lr=args.rm_learning_rate)
    n, P = len(train["prompts"]), args.prompt_len
    all_heldout = torch.arange(len(heldout["prompts"]), device=heldout["prompts"].device)
    for epoch in range(1, args.rm_epochs + 1):
        losses = []
        permutation = torch.randperm(n, device=train["prompts"].device)
        for batch, start in enumerate(range(0, n, args.rm_batch_size)):
            r_chosen, r_rejected = pair_scores(reward_model, train, permutation[start : start + args.rm_batch_size], P)
            loss = bradley_terry_loss(r_chosen, r_rejected)
            check_finite([loss.detach().reshape(1)], ("rm_loss",), f"reward-model epoch {epoch}, batch {batch + 1}",
                         per_minibatch=False)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            r_chosen, r_rejected = pair_scores(reward_model, heldout, all_heldout, P)
        margin, gold_margin = r_chosen - r_rejected, heldout["gold_margin"]
        decided = gold_margin != 0  # pairs whose gold rewards differ
        stats = {
            "rm_loss": float(np.mean(losses)),
            "rm_heldout_loss": bradley_terry_loss(r_chosen, r_rejected).item(),
            "rm_heldout_acc": (margin > 0).float().mean().item(),  # against the (noisy) labels
            "rm_heldout_acc_gold": ((margin > 0) == (gold_margin > 0))[decided].float().mean().item(),
            "label_ceiling_acc": ((gold_margin > 0).float() + 0.5 * (gold_margin == 0).float()).mean().item(),
        }
        logger.log({"stage": "rm", "epoch": epoch, **stats})
    with torch.no_grad():  # normalise on pi_ref's responses (both sides of every training pair)
        scores = torch.cat(pair_scores(reward_model, train, torch.arange(n, device=train["prompts"].device), P))
        mean, std = scores.mean(), scores.std()
        reward_model.scalar_head.weight /= std
        reward_model.scalar_head.bias.sub_(mean).div_(std)
    return reward_model, stats


@torch.no_grad()
def rollout(policy: TinyLM, ref_policy: TinyLM, reward_model: TinyLM, prompts: torch.Tensor, args: Args) -> dict:
    """Sample responses from the policy and score them: everything the online methods and the evaluations need,
    as tensors. "score" is the reward they maximise (--reward: the proxy or the gold one)."""
    P = prompts.shape[1]
    responses = generate(policy, prompts, args.max_response_len, args.temperature)  # [B, L]
    mask = response_mask(responses)  # [B, L]
    seq = torch.cat([prompts, responses], dim=1)  # [B, P + L]
    logits = response_logits(policy, seq, P, args.temperature)  # [B, L, V]
    ref_logits = response_logits(ref_policy, seq, P, args.temperature)
    logprobs = sequence_logprobs(logits, responses, mask)
    ref_logprobs = sequence_logprobs(ref_logits, responses, mask)
    finished = (responses == EOS).any(dim=1)
    # Ziegler et al.: a response that does not end properly gets a fixed score, not the RM's guess on it.
    proxy = torch.where(finished, proxy_score(reward_model, seq, mask, P), args.missing_eos_reward)
    gold = gold_reward(prompts, responses, mask)  # the verifier: a program that knows the truth
    return {
        "prompts": prompts, "responses": responses, "mask": mask, "seq": seq,
        "logprobs": logprobs, "ref_logprobs": ref_logprobs, "finished": finished, "proxy": proxy, "gold": gold,
        "score": gold if args.reward == "gold" else proxy,  # R(x, y): what the online method maximises
        "kl": token_kl(logits, ref_logits, mask).sum(dim=1),  # exact per token, summed: [B]
        "kl_k1": (logprobs - ref_logprobs).sum(dim=1),  # the sampled estimate the reward penalises: [B]
        "entropy": token_entropy(logits, mask),
    }


def run_ppo(policy: TinyLM, ref_policy: TinyLM, reward_model: TinyLM, args: Args, data_gen: torch.Generator,
            device: torch.device, logger: Logger) -> dict:
    """Stage 3: PPO on the per-token RLHF reward. The value model starts as a copy of the reward model (as in
    InstructGPT): policy, reference, reward and value are the article's "four model copies" (three with
    --reward gold, where the verifier replaces the reward model)."""
    value_model = copy.deepcopy(reward_model).requires_grad_(True)
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    kl_ctl = (AdaptiveKLController(args.beta, args.kl_target, args.kl_horizon) if args.adaptive_kl
              else FixedKLController(args.beta))
    B, P = args.rollout_batch_size, args.prompt_len
    minibatch_size = B // args.num_minibatches
    names = ("policy_loss", "value_loss", "entropy", "clipfrac", "loss")
    start_time, tokens_seen, summary = time.time(), 0, {}
    for iteration in range(1, args.ppo_iterations + 1):
        lr = args.learning_rate * (1.0 - (iteration - 1.0) / args.ppo_iterations if args.anneal_lr else 1.0)
        optimizer.param_groups[0]["lr"] = lr
        beta = kl_ctl.value

        # ---- rollout: B responses from pi_old, scored by the proxy (and, for the log only, by the gold reward) ----
        prompts = sample_prompts(B, P, args.vocab_size, data_gen).to(device)
        batch = rollout(policy, ref_policy, reward_model, prompts, args)
        responses, mask, seq = batch["responses"], batch["mask"], batch["seq"]
        logprobs = batch["logprobs"]  # [B, L], log pi_old(y_t) at the sampling temperature
        real = mask.bool()
        tokens_seen += int(mask.sum().item())
        with torch.no_grad():
            values = torch.where(real, response_values(value_model, seq, P), 0.0)  # [B, L]
            rewards = token_rewards(batch["score"], logprobs, batch["ref_logprobs"], mask, beta)  # [B, L]
            dones = episode_dones(mask)  # [B, L]
            # compute_gae runs over time: tokens are the time axis [L, B]. Every response ends at its dones = 1, so
            # nothing flows back from the padding and last_value is never used.
            advantages, returns = compute_gae(rewards.T, values.T, dones.T, torch.zeros(B, device=device),
                                              args.gamma, args.gae_lambda)
            advantages, returns = advantages.T, returns.T  # [B, L]

        # ---- update: update_epochs passes over num_minibatches minibatches of whole responses ----
        stats, stop = [], False
        for epoch in range(args.update_epochs):
            permutation = torch.randperm(B, device=device)
            for start in range(0, B, minibatch_size):
                mb = permutation[start : start + minibatch_size]
                m = real[mb]  # the real tokens: every loss below is a mean over them only
                logits = response_logits(policy, seq[mb], P, args.temperature)
                new_logprob = sequence_logprobs(logits, responses[mb], mask[mb])
                if args.target_kl is not None:
                    _, kl_now = approx_kl(new_logprob.detach()[m], logprobs[mb][m])
                    if kl_now.item() > args.target_kl:
                        stop = True
                        break
                mb_advantages = masked_whiten(advantages[mb], m) if args.norm_adv else advantages[mb]
                pg_loss, clipfrac = ppo_clip_loss(new_logprob[m], logprobs[mb][m], mb_advantages[m], args.clip_coef)
                new_values = response_values(value_model, seq[mb], P)
                v_loss = value_loss(new_values[m], values[mb][m], returns[mb][m],
                                    args.clip_coef if args.clip_vloss else None)
                entropy_mean = masked_mean(token_entropy(logits, m), m)
                loss = pg_loss - args.ent_coef * entropy_mean + args.vf_coef * v_loss  # -L^CLIP - c_ent H + c_vf L^V

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                stats.append(torch.stack([pg_loss, v_loss, entropy_mean, clipfrac, loss]).detach())
            if stop:
                break

        # ---- diagnostics on the whole batch, after the update ----
        with torch.no_grad():
            new_logprob = sequence_logprobs(response_logits(policy, seq, P, args.temperature), responses, mask)
            kl_k1, kl_k3 = approx_kl(new_logprob[real], logprobs[real])
            ev = explained_variance(values[real], returns[real])
        if stats:
            check_finite(stats, names, f"PPO iteration {iteration}")
        means = torch.stack(stats).mean(0).tolist() if stats else [None] * len(names)
        rollout_stats = summarise(batch)
        elapsed = time.time() - start_time
        episode_returns = rewards.sum(dim=1)  # proxy score - beta * sampled KL: the RLHF objective per response
        summary = {
            "stage": "ppo",
            "iteration": iteration,
            "episodes": iteration * B,
            "global_step": tokens_seen,
            "sps": tokens_seen / elapsed,
            "learning_rate": lr,
            "beta": beta,
            **rollout_stats,
            **dict(zip(names, means)),
            "approx_kl_k1": kl_k1.item(),
            "approx_kl_k3": kl_k3.item(),
            "explained_variance": ev.item(),
            "update_minibatches": len(stats),
            "episodic_return": episode_returns.mean().item(),
            "episodic_length": rollout_stats["response_length"],
        }
        logger.log(summary)
        kl_ctl.update(rollout_stats["kl_ref_k1"], B)  # Ziegler: the KL of the batch the rewards were computed on
    return summary


def run_critic_free(policy: TinyLM, ref_policy: TinyLM, reward_model: TinyLM, args: Args, data_gen: torch.Generator,
                    device: torch.device, logger: Logger) -> dict:
    """Stage 3 without a critic: GRPO (Shao et al. 2024) or RLOO (Ahmadian et al. 2024). Each iteration samples
    --group-size responses to each of B / group_size prompts; the other answers to the same prompt are the
    baseline, so there is no value model (three model copies: policy, reference, reward; two with --reward gold).

    GRPO: advantage = the reward normalised within its group (group_advantages), on every token of the response;
    PPO-Clip per token with the KL to pi_ref as a loss term (grpo_loss).
    RLOO: reward = R - beta (log pi - log pi_ref) of the whole response (token_rewards summed, the KL in the
    reward as in PPO-RLHF); advantage = reward - the mean of the other k - 1 (leave_one_out_advantages); the
    whole response is one action: ppo_clip_loss on sequence log-probs. The paper's RLOO is REINFORCE, one
    gradient step per batch; TRL's takes the clipped ratio over several epochs. We take TRL's, so every online
    method here gets the same --update-epochs x --num-minibatches steps per batch; with --update-epochs 1
    --num-minibatches 1 the ratio is 1 and the gradient is the paper's REINFORCE gradient exactly."""
    params = list(policy.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    kl_ctl = (AdaptiveKLController(args.beta, args.kl_target, args.kl_horizon) if args.adaptive_kl
              else FixedKLController(args.beta))
    B, G, P = args.rollout_batch_size, args.group_size, args.prompt_len
    minibatch_size = B // args.num_minibatches
    names = ("policy_loss", "entropy", "clipfrac", "loss")
    start_time, tokens_seen, summary = time.time(), 0, {}
    for iteration in range(1, args.ppo_iterations + 1):
        lr = args.learning_rate * (1.0 - (iteration - 1.0) / args.ppo_iterations if args.anneal_lr else 1.0)
        optimizer.param_groups[0]["lr"] = lr
        beta = kl_ctl.value

        # ---- rollout: G responses to each of B / G prompts, group g in rows g*G .. g*G + G - 1 ----
        prompts = sample_prompts(B // G, P, args.vocab_size, data_gen).to(device).repeat_interleave(G, dim=0)
        batch = rollout(policy, ref_policy, reward_model, prompts, args)
        responses, mask, seq = batch["responses"], batch["mask"], batch["seq"]
        logprobs, ref_logprobs = batch["logprobs"], batch["ref_logprobs"]  # [B, L]
        real = mask.bool()
        tokens_seen += int(mask.sum().item())
        if args.algo == "grpo":
            episode_returns = batch["score"]  # the KL is not in GRPO's reward
            advantages = group_advantages(episode_returns, G)  # [B]
        else:
            episode_returns = token_rewards(batch["score"], logprobs, ref_logprobs, mask, beta).sum(dim=1)  # [B]
            advantages = leave_one_out_advantages(episode_returns, G)

        # ---- update: update_epochs passes over num_minibatches minibatches of whole responses ----
        stats, stop = [], False
        for epoch in range(args.update_epochs):
            permutation = torch.randperm(B, device=device)
            for start in range(0, B, minibatch_size):
                mb = permutation[start : start + minibatch_size]
                m = real[mb]
                logits = response_logits(policy, seq[mb], P, args.temperature)
                new_logprob = sequence_logprobs(logits, responses[mb], mask[mb])  # [mb, L]
                if args.target_kl is not None:
                    _, kl_now = approx_kl(new_logprob.detach()[m], logprobs[mb][m])
                    if kl_now.item() > args.target_kl:
                        stop = True
                        break
                if args.algo == "grpo":
                    pg_loss, clipfrac, _ = grpo_loss(new_logprob, logprobs[mb], ref_logprobs[mb], advantages[mb],
                                                     mask[mb], args.clip_coef, beta)
                else:
                    pg_loss, clipfrac = ppo_clip_loss(new_logprob.sum(dim=1), logprobs[mb].sum(dim=1),
                                                      advantages[mb], args.clip_coef)
                entropy_mean = masked_mean(token_entropy(logits, m), m)
                loss = pg_loss - args.ent_coef * entropy_mean

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                stats.append(torch.stack([pg_loss, entropy_mean, clipfrac, loss]).detach())
            if stop:
                break

        # ---- diagnostics on the whole batch, after the update ----
        with torch.no_grad():
            new_logprob = sequence_logprobs(response_logits(policy, seq, P, args.temperature), responses, mask)
            kl_k1, kl_k3 = approx_kl(new_logprob[real], logprobs[real])
        if stats:
            check_finite(stats, names, f"{args.algo.upper()} iteration {iteration}")
        means = torch.stack(stats).mean(0).tolist() if stats else [None] * len(names)
        rollout_stats = summarise(batch)
        summary = {
            "stage": args.algo, "iteration": iteration, "episodes": iteration * B, "global_step": tokens_seen,
            "sps": tokens_seen / (time.time() - start_time), "learning_rate": lr, "beta": beta, **rollout_stats,
            **dict(zip(names, means)), "approx_kl_k1": kl_k1.item(), "approx_kl_k3": kl_k3.item(),
            "update_minibatches": len(stats),
            # the share of groups whose responses all score the same: no signal in them (GRPO and RLOO alike)
            "flat_groups": (batch["score"].view(-1, G).std(dim=1) == 0).float().mean().item(),
            "episodic_return": episode_returns.mean().item(), "episodic_length": rollout_stats["response_length"],
        }
        logger.log(summary)
        kl_ctl.update(rollout_stats["kl_ref_k1"], B)
    return summary


def response_logps(model: TinyLM, prompts: torch.Tensor, responses: torch.Tensor, P: int,
                   average: bool = False) -> torch.Tensor:
    """log pi(y | x) [n] of whole responses at temperature 1, as the direct methods define it: the sum over the
    real tokens, or with average=True their mean (IPO's length-averaged log-prob)."""
    mask = response_mask(responses)
    logits = response_logits(model, torch.cat([prompts, responses], dim=1), P, 1.0)
    logps = sequence_logprobs(logits, responses, mask).sum(dim=1)
    return logps / mask.sum(dim=1) if average else logps


def pair_logps(model: TinyLM, pairs: dict, idx: torch.Tensor, P: int,
               average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi of the chosen and of the rejected responses of pairs idx, one forward pass: ([n], [n])."""
    prompts = pairs["prompts"][idx]
    responses = torch.cat([pairs["chosen"][idx], pairs["rejected"][idx]])
    logps = response_logps(model, torch.cat([prompts, prompts]), responses, P, average)
    return logps[: len(idx)], logps[len(idx):]


def direct_loss(method: str, policy: TinyLM, ref_policy: TinyLM, pairs: dict, idx: torch.Tensor,
                args: Args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of one direct method on pairs idx, and the chosen and rejected responses' implicit rewards (their
    log-ratios to pi_ref, detached: the held-out accuracy compares them).
    dpo, ipo: the pairs as pairs (dpo_loss on summed log-probs, ipo_loss on length-averaged ones).
    kto: the pairs unpaired, as TRL does with paired data: chosen = desirable, rejected = undesirable; z_ref from
    the same responses under the prompt of the next pair of the batch (mismatched)."""
    P = args.prompt_len
    average = method == "ipo"
    pi_chosen, pi_rejected = pair_logps(policy, pairs, idx, P, average)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logps(ref_policy, pairs, idx, P, average)
    if method == "dpo":
        loss, _, _ = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, args.dpo_beta)
    elif method == "ipo":
        loss, _, _ = ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, args.ipo_tau)
    else:
        responses = torch.cat([pairs["chosen"][idx], pairs["rejected"][idx]])  # [2n, L]
        other_prompts = pairs["prompts"][idx.roll(1)]  # pair i's responses under pair i-1's prompt
        with torch.no_grad():  # z_ref carries no gradient
            mismatched = torch.cat([other_prompts, other_prompts])
            z_ref = kto_reference_point(response_logps(policy, mismatched, responses, P),
                                        response_logps(ref_policy, mismatched, responses, P))
        desirable = torch.arange(2 * len(idx), device=idx.device) < len(idx)
        loss, _ = kto_loss(torch.cat([pi_chosen, pi_rejected]), torch.cat([ref_chosen, ref_rejected]), desirable,
                           z_ref, args.kto_beta, args.kto_desirable_weight, args.kto_undesirable_weight)
    return loss, (pi_chosen - ref_chosen).detach(), (pi_rejected - ref_rejected).detach()


def train_direct(method: str, ref_policy: TinyLM, reward_model: TinyLM, train: dict, heldout: dict, args: Args,
                 data_gen: torch.Generator, device: torch.device, logger: Logger) -> tuple[TinyLM, dict]:
    """Stage 4: one direct method (DPO, IPO or KTO) from pi_ref on the reward model's training pairs: no reward
    model, no rollouts, two model copies (policy, reference). Every --direct-eval-every steps, the gold and proxy
    rewards and KL(pi || pi_ref) of fresh samples (the reward model only measures, it does not train)."""
    policy = copy.deepcopy(ref_policy).requires_grad_(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.direct_learning_rate)
    n, P = len(train["prompts"]), args.prompt_len
    all_heldout = torch.arange(len(heldout["prompts"]), device=device)
    step, losses, summary = 0, [], {}
    steps_per_epoch = math.ceil(n / args.direct_batch_size)
    for epoch in range(1, args.direct_epochs + 1):
        permutation = torch.randperm(n, device=device)
        for start in range(0, n, args.direct_batch_size):
            loss, _, _ = direct_loss(method, policy, ref_policy, train,
                                     permutation[start : start + args.direct_batch_size], args)
            step += 1
            check_finite([loss.detach().reshape(1)], (f"{method}_loss",), f"{method.upper()} step {step}",
                         per_minibatch=False)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % args.direct_eval_every == 0 or step == args.direct_epochs * steps_per_epoch:
                with torch.no_grad():
                    heldout_loss, chosen_r, rejected_r = direct_loss(method, policy, ref_policy, heldout,
                                                                     all_heldout, args)
                prompts = sample_prompts(args.rollout_batch_size, P, args.vocab_size, data_gen).to(device)
                summary = {
                    "stage": method, "step": step, "epoch": epoch, "loss": float(np.mean(losses)),
                    "heldout_loss": heldout_loss.item(),
                    "heldout_acc": (chosen_r > rejected_r).float().mean().item(),  # implicit reward vs labels
                    **summarise(rollout(policy, ref_policy, reward_model, prompts, args)),
                }
                logger.log(summary)
                losses = []
    return policy, summary


# ----------------------------------------------------------------------------------------------------------
# The pipeline: the four stages in order, then the evaluation of their policies
# ----------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = tyro.cli(Args, args=argv)
    torch.set_num_threads(args.torch_threads)
    device = pick_device(args.cuda)

    if args.eval_checkpoint is not None:
        try:
            checkpoint = load_checkpoint(args.eval_checkpoint)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if "stopped_in_stage" in checkpoint:  # saved by a run stopped before it had all four models
            raise SystemExit(f"error: {args.eval_checkpoint} is from a run stopped in stage "
                             f"{checkpoint['stopped_in_stage']}; evaluating needs the models of a finished run")
        saved = Args(**{**checkpoint["args"], "eval_episodes": args.eval_episodes, "seed": args.seed,
                        "temperature": args.temperature})
        models = {}
        for name in [key for key in checkpoint if key == "reward_model" or key.endswith("_policy")]:
            models[name] = make_model(saved, device)
            models[name].load_state_dict(checkpoint[name])
        torch.manual_seed(args.seed)
        trained = {name[: -len("_policy")].upper(): model for name, model in models.items()
                   if name.endswith("_policy") and name != "ref_policy"}  # PPO (or GRPO, RLOO), DPO, IPO, KTO
        results = evaluate_policies({"pi_ref (SFT)": models["ref_policy"], **trained}, models["ref_policy"],
                                    models["reward_model"], saved, device)
        print_table(results, saved)
        return {"eval": results}

    # Every check happens before anything is written, so bad input leaves no run folder behind.
    try:
        check_args(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    direct = ", ".join(method.upper() for method in args.direct) or "no direct method"
    print(f"budget: SFT {args.sft_steps} steps x {args.sft_batch_size} demonstrations, reward model "
          f"{args.rm_epochs} epochs over {args.num_pairs} pairs, {args.algo.upper()} on the {args.reward} reward "
          f"{args.ppo_iterations} iterations x {args.rollout_batch_size} responses, {direct} "
          f"{args.direct_epochs} epochs over the same pairs")
    run_name, run_dir = make_run_dir("rlhf-toy", args.exp_name, args.seed)  # a new folder, never another run's
    write_json(os.path.join(run_dir, "args.json"), asdict(args))
    stop_signal = StopSignal()  # Ctrl-C or SIGTERM: the stage ends after its next logged row (RunStopped)
    logger = Logger(args, run_dir, run_name, stop_signal)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    data_gen = torch.Generator().manual_seed(args.seed)  # prompts, demonstrations, preference labels
    start_time = time.time()

    ref_policy = reward_model = online_policy = None  # what a stopped run has trained so far
    direct_policies = {}
    try:
        ref_policy, sft_loss = train_sft(args, data_gen, device, logger)
        ref_policy.requires_grad_(False)
        train_pairs = make_preferences(ref_policy, args.num_pairs, args, data_gen, device)
        heldout_pairs = make_preferences(ref_policy, args.heldout_pairs, args, data_gen, device)
        reward_model, rm_stats = train_reward_model(ref_policy, train_pairs, heldout_pairs, args, logger)
        reward_model.requires_grad_(False)
        online_policy = copy.deepcopy(ref_policy).requires_grad_(True)
        run_online = run_ppo if args.algo == "ppo" else run_critic_free
        online_last = run_online(online_policy, ref_policy, reward_model, args, data_gen, device, logger)
        for method in args.direct:
            # each direct method starts from the same fresh seeds, so its result depends neither on the online
            # method's flags (a beta sweep shares it) nor on which other direct methods ran
            torch.manual_seed(args.seed + 1)
            direct_gen = torch.Generator().manual_seed(args.seed + 1)
            direct_policies[method], _ = train_direct(method, ref_policy, reward_model, train_pairs, heldout_pairs,
                                                      args, direct_gen, device, logger)
    except NonFiniteLoss as err:
        logger.close()
        stop_signal.restore()
        raise SystemExit(f"error: {err}; stopping, nothing saved") from None
    except RunStopped as stopped:
        # Wrap up what exists: the metrics so far, a summary naming the stage, the models trained before it.
        summary = {"stage": "summary", "time": time.time() - start_time, "stopped_by": stop_signal.signal_name,
                   "stopped_in_stage": stopped.stage}
        trained = {"ref_policy": ref_policy, "reward_model": reward_model, f"{args.algo}_policy": online_policy,
                   **{f"{method}_policy": policy for method, policy in direct_policies.items()}}
        if args.save_model:
            path = os.path.join(run_dir, f"{SCRIPT}.pt")
            torch.save({"script": SCRIPT, "args": asdict(args), "stopped_in_stage": stopped.stage,
                        **{name: cpu_weights(model) for name, model in trained.items() if model is not None}}, path)
            print(f"saved {path} (the models trained before the stop)")
        write_json(os.path.join(run_dir, "summary.json"), summary)
        logger.close()
        print(f"stopped by {stop_signal.signal_name} in stage {stopped.stage} after {summary['time']:.1f} s; "
              f"metrics in {run_dir}/metrics.jsonl")
        stop_signal.restore()
        raise SystemExit(stop_signal.exit_code) from None

    policies = {args.algo: online_policy, **direct_policies}  # by method: ppo (or grpo, rloo), dpo, ipo, kto
    results = evaluate_policies({"pi_ref (SFT)": ref_policy, **{m.upper(): p for m, p in policies.items()}},
                                ref_policy, reward_model, args, device)
    print_table(results, args)
    rows = {"demonstrator": results["demonstrator"], "ref": results["pi_ref (SFT)"],
            **{method: results[method.upper()] for method in policies}}
    summary = {
        "stage": "summary",
        "time": time.time() - start_time,
        "sft_loss": sft_loss,
        **rm_stats,
        "algo": args.algo,
        "reward": args.reward,
        "beta_final": online_last.get("beta"),
        **{f"{key}_{name}": row.get(key) for name, row in rows.items()
           for key in ("gold_reward", "proxy_reward", "kl_ref", "response_length") if key in row},
        # the models each method holds while it trains (the article's "four model copies" for PPO): the policy
        # and pi_ref; the reward model unless the gold reward is the reward; PPO's value model
        **{f"models_{method}": 2 + (method == "ppo") + (method == args.algo and args.reward == "model")
           for method in policies},
    }
    logger.log(summary)
    if args.save_model:
        path = os.path.join(run_dir, f"{SCRIPT}.pt")
        torch.save({"script": SCRIPT, "args": asdict(args), "ref_policy": cpu_weights(ref_policy),
                    "reward_model": cpu_weights(reward_model),
                    **{f"{method}_policy": cpu_weights(policy) for method, policy in policies.items()}}, path)
        checkpoint = load_checkpoint(path)
        reloaded = make_model(args, device)
        reloaded.load_state_dict(checkpoint[f"{args.algo}_policy"])
        name = f"{args.algo.upper()} (reloaded)"
        check = evaluate_policies({name: reloaded}, ref_policy, reward_model, args, device)
        print(f"saved {path}; reloaded {args.algo.upper()} policy: gold {check[name]['gold_reward']:.3f} over "
              f"{args.eval_episodes} prompts")
        summary[f"eval_gold_reward_{args.algo}_reloaded"] = check[name]["gold_reward"]
    write_json(os.path.join(run_dir, "summary.json"), summary)
    logger.close()
    finals = ", ".join(f"{method.upper()} {summary[f'gold_reward_{method}']:.2f}" for method in policies)
    print(f"done: {3 + len(args.direct)} stages in {summary['time']:.1f} s; gold reward pi_ref "
          f"{summary['gold_reward_ref']:.2f} -> {finals} (best possible {args.prompt_len}); metrics in "
          f"{run_dir}/metrics.jsonl")
    stop_signal.restore()
    if stop_signal.requested:  # a signal during the final evaluation: everything is written, say so by the code
        raise SystemExit(stop_signal.exit_code)
    return summary


# ==========================================================================================================
# Plumbing a reader may skip: argument checks, devices, the vector env, normaliser storage, logging,
# checkpoints and evaluation. Nothing below changes the algorithm; main() above is the article's loop.
# ==========================================================================================================


def check_args(args: Args) -> None:
    """Raise ValueError with one readable sentence for settings that cannot train."""
    for name in ("learning_rate", "sft_learning_rate", "rm_learning_rate", "direct_learning_rate", "temperature",
                 "dpo_beta", "ipo_tau", "kto_beta", "kl_target", "clip_coef"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("eval_episodes", "torch_threads", "d_model", "n_layers", "n_heads", "sft_steps", "sft_batch_size",
                 "num_pairs", "heldout_pairs", "rm_epochs", "rm_batch_size", "ppo_iterations", "rollout_batch_size",
                 "num_minibatches", "update_epochs", "kl_horizon", "direct_epochs", "direct_batch_size",
                 "direct_eval_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if len(set(args.direct)) != len(args.direct):
        raise ValueError(f"--direct names a method twice: {' '.join(args.direct)}")
    if args.algo != "ppo":
        if args.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 for --algo {args.algo} (a group's other responses are the "
                             f"baseline), got {args.group_size}")
        if args.rollout_batch_size % args.group_size != 0:
            raise ValueError(f"--group-size {args.group_size} does not divide --rollout-batch-size "
                             f"{args.rollout_batch_size}")
    if args.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {args.beta}")
    if args.d_model % args.n_heads != 0:
        raise ValueError(f"--n-heads {args.n_heads} does not divide --d-model {args.d_model}")
    if args.rollout_batch_size % args.num_minibatches != 0:
        raise ValueError(f"--num-minibatches {args.num_minibatches} does not divide --rollout-batch-size "
                         f"{args.rollout_batch_size}")
    if args.norm_adv and args.rollout_batch_size // args.num_minibatches < 2:
        raise ValueError(f"--rollout-batch-size {args.rollout_batch_size} / --num-minibatches {args.num_minibatches}"
                         " leaves one response per minibatch, which may be a single token (EOS): --norm-adv whitens"
                         " advantages over a minibatch's tokens and needs two responses or more per minibatch")
    if args.prompt_len < 1 or args.vocab_size - FIRST_CONTENT <= args.prompt_len:
        raise ValueError(f"--prompt-len {args.prompt_len} needs 1 <= prompt-len < vocab-size - {FIRST_CONTENT} "
                         f"(= {args.vocab_size - FIRST_CONTENT} content tokens), so that some are not in the prompt")
    if not 1 <= args.demo_max_len < args.max_response_len:
        raise ValueError(f"--demo-max-len {args.demo_max_len} must be in [1, --max-response-len "
                         f"{args.max_response_len}) so that every demonstration ends with EOS")
    if not 0 < args.demo_hit_prob < 1:
        raise ValueError(f"--demo-hit-prob must be in (0, 1), got {args.demo_hit_prob}")
    if not 0 < args.gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not 0 <= args.gae_lambda <= 1:
        raise ValueError(f"--gae-lambda must be in [0, 1], got {args.gae_lambda}")
    if args.target_kl is not None and args.target_kl <= 0:
        raise ValueError(f"--target-kl must be > 0 (or None), got {args.target_kl}")


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


def make_model(args: Args, device: torch.device) -> TinyLM:
    return TinyLM(args.vocab_size, args.prompt_len + args.max_response_len, args.d_model, args.n_layers,
                  args.n_heads).to(device)


class RunStopped(Exception):
    """A Ctrl-C or SIGTERM ended the run in `stage` ("sft", "rm", "ppo" or "dpo"), after its last logged row."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


class NonFiniteLoss(Exception):
    """A loss became NaN or inf; the message names the quantity, the stage and the step."""


def check_finite(stats: list[torch.Tensor], names: tuple[str, ...], where: str, per_minibatch: bool = True) -> None:
    """stats: one tensor [len(names)] per minibatch (or a single one); raise NonFiniteLoss naming the first
    non-finite entry: the quantity, `where` (stage and step) and, with per_minibatch, the minibatch."""
    stacked = torch.stack(stats)
    bad = (~torch.isfinite(stacked)).nonzero()
    if len(bad):
        minibatch, column = bad[0].tolist()
        tail = f", minibatch {minibatch + 1}" if per_minibatch else ""
        raise NonFiniteLoss(f"{names[column]} is {stacked[minibatch, column].item()} at {where}{tail}")


def summarise(batch: dict) -> dict:
    """Batch means of a rollout: the numbers every stage reports."""
    return {
        "gold_reward": batch["gold"].mean().item(),
        "proxy_reward": batch["proxy"].mean().item(),
        "kl_ref": batch["kl"].mean().item(),
        "kl_ref_k1": batch["kl_k1"].mean().item(),
        "entropy": masked_mean(batch["entropy"], batch["mask"]).item(),
        "response_length": batch["mask"].sum(dim=1).mean().item(),
        "eos_rate": batch["finished"].float().mean().item(),
        "repeats_per_response": repeat_count(batch["prompts"], batch["responses"], batch["mask"]).float().mean().item(),
    }


def repeat_count(prompts: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Repeats of prompt tokens per response [B] (the hack the proxy cannot see): prompt tokens in y minus
    distinct prompt tokens in y."""
    in_prompt = (responses.unsqueeze(2) == prompts.unsqueeze(1)) & mask.bool().unsqueeze(2)  # [B, L, P]
    return in_prompt.sum(dim=(1, 2)) - in_prompt.any(dim=1).sum(dim=1)


class Logger:
    """Every row: one line on stdout, one JSON line in runs/<run_name>/metrics.jsonl, and wandb with --track
    (keys prefixed by the stage). A wandb error is printed once and turns wandb off; it never stops training.
    With a stop_signal that a Ctrl-C or SIGTERM has set, log() raises RunStopped after writing the row."""

    def __init__(self, args: Args, run_dir: str, run_name: str, stop_signal: Optional["StopSignal"] = None):
        self.metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "w", buffering=1)
        self.wandb_run = None
        self.rows, self.start_time = 0, time.time()
        self.stop_signal = stop_signal
        if args.track:
            try:
                import wandb

                self.wandb_run = wandb.init(
                    project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                    config=asdict(args), dir=run_dir,
                )
            except Exception as err:  # any wandb failure (no login, no network, bad entity): keep training
                print(f"wandb disabled, training goes on: {type(err).__name__}: {err}")

    def log(self, metrics: dict) -> None:
        metrics = {**metrics, "time": time.time() - self.start_time}  # seconds since the run started
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps(clean) + "\n")
        print(format_line(clean))
        self.rows += 1
        if self.wandb_run is not None:
            try:
                stage = metrics["stage"]
                self.wandb_run.log({f"{stage}/{k}": v for k, v in clean.items() if v is not None and k != "stage"},
                                   step=self.rows)
            except Exception as err:  # see __init__: training matters more than the dashboard
                print(f"wandb disabled, training goes on: {type(err).__name__}: {err}")
                self.wandb_run = None
        if self.stop_signal is not None and self.stop_signal.requested and metrics["stage"] != "summary":
            raise RunStopped(metrics["stage"])  # every stage logs once per iteration: it ends here, cleanly

    def close(self) -> None:
        self.metrics_file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                print(f"wandb finish failed: {type(err).__name__}: {err}")


def format_line(metrics: dict) -> str:
    """The stdout line of one metrics row, by stage."""
    def show(key, spec):
        return "-" if metrics.get(key) is None else format(metrics[key], spec)

    stage = metrics["stage"]
    if stage == "sft":
        return (f"sft  step {metrics['step']:>5} | loss {show('sft_loss', '.4f')} "
                f"(demonstrator's own: {show('sft_loss_floor', '.4f')})")
    if stage == "rm":
        return (f"rm   epoch {metrics['epoch']:>3} | train loss {show('rm_loss', '.4f')} | held-out: loss "
                f"{show('rm_heldout_loss', '.4f')} acc {show('rm_heldout_acc', '.3f')} (vs gold order "
                f"{show('rm_heldout_acc_gold', '.3f')}; gold itself gets {show('label_ceiling_acc', '.3f')})")
    if stage in ("ppo", "grpo", "rloo", "dpo", "ipo", "kto"):
        online = stage in ("ppo", "grpo", "rloo")
        head = f"{stage:<4} iter {metrics['iteration']:>4}" if online else f"{stage:<4} step {metrics['step']:>4}"
        tail = (f" | kl {show('approx_kl_k3', '.4f')} clip {show('clipfrac', '.3f')} ev "
                f"{show('explained_variance', '5.2f')} beta {show('beta', '.4f')}" if online
                else f" | loss {show('loss', '.4f')} held-out acc {show('heldout_acc', '.3f')}")
        return (f"{head} | gold {show('gold_reward', '6.3f')} proxy {show('proxy_reward', '6.3f')} "
                f"KL(pi||ref) {show('kl_ref', '6.2f')} ent {show('entropy', '.3f')} len "
                f"{show('response_length', '.2f')}{tail}")
    methods = [m for m in ("ppo", "grpo", "rloo", "dpo", "ipo", "kto") if f"gold_reward_{m}" in metrics]
    return (f"summary | gold: demonstrator {show('gold_reward_demonstrator', '.3f')}, pi_ref "
            f"{show('gold_reward_ref', '.3f')}, "
            + ", ".join(f"{m.upper()} {show(f'gold_reward_{m}', '.3f')}" for m in methods))


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


def evaluate_policies(policies: dict, ref_policy: TinyLM, reward_model: TinyLM, args: Args,
                      device: torch.device) -> dict:
    """Gold, proxy, KL, ... of each policy on the same --eval-episodes prompts (fixed by --seed), plus the
    demonstrator's gold reward on them. Returns {name: summary}."""
    generator = torch.Generator().manual_seed(args.seed + 1_000_003)
    prompts = sample_prompts(args.eval_episodes, args.prompt_len, args.vocab_size, generator)
    demos, _ = behaviour_policy(prompts, args.max_response_len, args.demo_max_len, args.demo_hit_prob,
                                args.vocab_size, generator)
    demo_mask = response_mask(demos)
    results = {"demonstrator": {"gold_reward": gold_reward(prompts, demos, demo_mask).mean().item(),
                                "response_length": demo_mask.sum(dim=1).mean().item(),
                                "samples": [show_sample(prompts[i], demos[i]) for i in range(min(3, len(prompts)))]}}
    for name, policy in policies.items():
        batch = rollout(policy, ref_policy, reward_model, prompts.to(device), args)
        samples = [show_sample(prompts[i], batch["responses"][i]) for i in range(min(3, len(prompts)))]
        results[name] = {**summarise(batch), "samples": samples}
    return results


def show_sample(prompt: torch.Tensor, response: torch.Tensor) -> str:
    """A prompt and a response as letters (content token FIRST_CONTENT -> a, the next -> b, ...), EOS as '.',
    padding dropped. Example: prompt [7 3 12 5], response [3 12 9 EOS PAD] -> 'fbke -> bkh.'"""
    def letters(tokens):
        names = {PAD: "_", EOS: "."}
        return "".join(names.get(t, chr(ord("a") + t - FIRST_CONTENT)) for t in tokens.tolist())

    real = int(response_mask(response.unsqueeze(0)).sum().item())
    return f"{letters(prompt)} -> {letters(response[:real])}"


def print_table(results: dict, args: Args) -> None:
    columns = {"gold_reward": "gold", "proxy_reward": "proxy", "kl_ref": "KL(pi||ref)", "response_length": "length",
               "repeats_per_response": "repeats", "eos_rate": "EOS rate"}
    print(f"\n{'policy (' + str(args.eval_episodes) + ' prompts)':<28}" + "".join(f"{c:>13}" for c in columns.values()))
    for name, row in results.items():
        cells = "".join(f"{'-' if row.get(c) is None else format(row[c], '.3f'):>13}" for c in columns)
        print(f"{name:<28}{cells}")
    print(f"{'best possible':<28}{float(args.prompt_len):>13.3f}")
    print("samples (prompt -> response; letters are content tokens, '.' is EOS):")
    for name, row in results.items():
        print(f"  {name:<26}" + "   ".join(row["samples"]))


if __name__ == "__main__":
    main()
