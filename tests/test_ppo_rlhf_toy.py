"""Tests of ppo_rlhf_toy.py: the RLHF losses and per-token bookkeeping against hand-computed values, masking,
the KL controller, the toy world, and tiny end-to-end runs of every stage (SFT, RM, PPO, DPO)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppo_rlhf_toy as rlhf
from conftest import ROOT

# every stage, seconds in total: 1-layer width-16 models, a handful of steps each
TINY = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--sft-steps", "4", "--sft-batch-size", "16",
        "--num-pairs", "32", "--heldout-pairs", "16", "--rm-epochs", "1", "--rm-batch-size", "16",
        "--ppo-iterations", "2", "--rollout-batch-size", "16", "--num-minibatches", "2", "--update-epochs", "2",
        "--direct-epochs", "1", "--direct-batch-size", "16", "--direct-eval-every", "1", "--eval-episodes", "16"]


def run_dirs(cwd: Path):
    return sorted((cwd / "runs").glob("*")) if (cwd / "runs").exists() else []


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Bradley-Terry and DPO losses
# ---------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_values_and_gradient_signs():
    assert rlhf.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-2)))
    assert rlhf.bradley_terry_loss(torch.tensor([0.3]), torch.tensor([0.3])).item() == pytest.approx(math.log(2))
    # the mean over pairs: margins 1 and -1
    assert rlhf.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(
        0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))))
    r_chosen = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    r_rejected = torch.tensor([0.0, 1.0, -3.0], requires_grad=True)
    rlhf.bradley_terry_loss(r_chosen, r_rejected).backward()
    expected = torch.sigmoid(r_rejected - r_chosen).detach() / 3  # d loss / d r_rejected
    torch.testing.assert_close(r_rejected.grad, expected)
    torch.testing.assert_close(r_chosen.grad, -expected)
    assert torch.all(r_chosen.grad < 0) and torch.all(r_rejected.grad > 0)  # descent raises chosen, lowers rejected
    # finite where log(sigmoid(.)) would underflow to -inf
    assert rlhf.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


def test_dpo_loss_hand_values():
    beta = 0.5
    loss, chosen_r, rejected_r = rlhf.dpo_loss(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]),
                                               torch.tensor([-4.0]), beta)
    # margins: policy - ref = 2 (chosen) and 0 (rejected) -> beta * 2 = 1
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert chosen_r.item() == pytest.approx(1.0) and rejected_r.item() == pytest.approx(0.0)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    torch.manual_seed(0)
    logp_chosen, logp_rejected = -torch.rand(8) * 10, -torch.rand(8) * 10
    for beta in (0.01, 0.1, 1.0):
        loss, chosen_r, rejected_r = rlhf.dpo_loss(logp_chosen, logp_rejected, logp_chosen, logp_rejected, beta)
        assert loss.item() == pytest.approx(math.log(2))
        assert torch.all(chosen_r == 0) and torch.all(rejected_r == 0)


def test_dpo_loss_gradient_signs():
    pi_chosen = torch.tensor([-3.0, -6.0], requires_grad=True)
    pi_rejected = torch.tensor([-2.0, -5.0], requires_grad=True)
    loss, _, _ = rlhf.dpo_loss(pi_chosen, pi_rejected, torch.tensor([-3.5, -6.0]), torch.tensor([-2.5, -4.0]), 0.1)
    loss.backward()
    assert torch.all(pi_chosen.grad < 0)  # a descent step makes the chosen response more likely...
    assert torch.all(pi_rejected.grad > 0)  # ...and the rejected one less likely
    torch.testing.assert_close(pi_chosen.grad, -pi_rejected.grad)


# ---------------------------------------------------------------------------------------------------------
# IPO, KTO, GRPO, RLOO
# ---------------------------------------------------------------------------------------------------------


def test_ipo_loss_hand_value_and_minimum_at_the_target_margin():
    # tau 0.5: target h = 1; policy - ref = 2 (chosen), 0 (rejected): h = 2, loss (2 - 1)^2 = 1
    loss, chosen, rejected = rlhf.ipo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]),
                                           torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(1.0)
    assert chosen.item() == pytest.approx(2.0) and rejected.item() == pytest.approx(0.0)
    # two pairs, tau 0.25 (target 2): h = 0 and h = 3 -> mean(4, 1) = 2.5
    loss, _, _ = rlhf.ipo_loss(torch.tensor([0.0, 3.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.25)
    assert loss.item() == pytest.approx(2.5)
    for tau in (0.1, 0.5, 2.0):
        h = torch.linspace(-5, 15, 2001, dtype=torch.float64, requires_grad=True)
        losses = torch.stack([rlhf.ipo_loss(x.view(1), torch.zeros(1, dtype=torch.float64),
                                            torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                            tau)[0] for x in h])
        assert h[losses.argmin()].item() == pytest.approx(1 / (2 * tau), abs=0.01)
    # past the target the loss pulls the margin back (DPO's would push it further)
    h = torch.tensor([10.0], requires_grad=True)
    rlhf.ipo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.5)[0].backward()
    assert h.grad.item() > 0


def test_kto_loss_hand_value():
    # beta 1, z_ref 0, weights 1: desirable r = 0 -> 1 - sigmoid(0) = 0.5; undesirable r = -2 -> 1 - sigmoid(2)
    loss, logratios = rlhf.kto_loss(torch.tensor([-3.0, -6.0]), torch.tensor([-3.0, -4.0]), torch.tensor([True, False]),
                                    torch.tensor(0.0), 1.0, 1.0, 1.0)
    assert loss.item() == pytest.approx((0.5 + 1 - 1 / (1 + math.exp(-2))) / 2)
    assert logratios.tolist() == [0.0, -2.0]
    # weights and the reference point: lambda_D 2, lambda_U 0.5, z_ref 1, beta 0.5; r = [1, 3]
    loss, _ = rlhf.kto_loss(torch.tensor([1.0, 3.0]), torch.zeros(2), torch.tensor([True, False]),
                            torch.tensor(1.0), 0.5, 2.0, 0.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx((2.0 * (1 - sigmoid(0.0)) + 0.5 * (1 - sigmoid(0.5 * (1 - 3)))) / 2)


def test_kto_reference_point_is_the_mismatched_mean_log_ratio_clamped_and_detached():
    pi = torch.tensor([-3.0, -5.0], requires_grad=True)
    z = rlhf.kto_reference_point(pi, torch.tensor([-4.0, -5.0]))
    assert z.item() == pytest.approx(0.5) and not z.requires_grad
    assert rlhf.kto_reference_point(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    pi = torch.tensor([-3.0, -3.0], requires_grad=True)
    loss, _ = rlhf.kto_loss(pi, torch.tensor([-3.0, -3.0]), torch.tensor([True, False]), torch.tensor(0.0),
                            0.1, 1.0, 1.0)
    loss.backward()
    assert pi.grad[0] < 0 < pi.grad[1]


def test_group_advantages_hand_values_zero_mean_and_flat_groups():
    advantages = rlhf.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    torch.testing.assert_close(advantages, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0]),
                               atol=1e-4, rtol=0)
    rewards = torch.randn(6 * 8, generator=torch.Generator().manual_seed(0))
    rewards[8:16] = 2.5  # one group where every response scores the same
    advantages = rlhf.group_advantages(rewards, 8).view(6, 8)
    torch.testing.assert_close(advantages.mean(dim=1), torch.zeros(6), atol=1e-6, rtol=0)
    assert torch.all(advantages[1] == 0)
    torch.testing.assert_close(advantages[[0, 2, 3, 4, 5]].std(dim=1), torch.ones(5), atol=1e-3, rtol=0)


def test_leave_one_out_advantages_exclude_the_sample_itself():
    torch.testing.assert_close(rlhf.leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0]), 3),
                               torch.tensor([-3.0, -1.5, 4.5]))
    rewards = torch.randn(4 * 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    advantages = rlhf.leave_one_out_advantages(rewards, 5).view(4, 5)
    grouped = rewards.view(4, 5)
    for g in range(4):
        for i in range(5):
            others = torch.cat([grouped[g, :i], grouped[g, i + 1:]])
            assert advantages[g, i].item() == pytest.approx((grouped[g, i] - others.mean()).item())
    # changing one response's reward does not change its own baseline: its advantage moves one for one
    bumped = rewards.clone()
    bumped[7] += 1.0
    delta = rlhf.leave_one_out_advantages(bumped, 5) - rlhf.leave_one_out_advantages(rewards, 5)
    assert delta[7].item() == pytest.approx(1.0)
    # RLOO's advantages are k / (k - 1) times the group-mean-centred rewards: zero mean per group
    torch.testing.assert_close(advantages, 5 / 4 * (grouped - grouped.mean(dim=1, keepdim=True)))


def test_grpo_loss_on_a_hand_built_batch():
    # response 0: two real tokens, A = 1; response 1: one real token (then padding holding NaN), A = -2
    new = torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), float("nan")]])
    old = torch.zeros(2, 2)
    ref = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, clipfrac, kl = rlhf.grpo_loss(new, old, ref, torch.tensor([1.0, -2.0]), mask, 0.2, 0.1)
    k3 = lambda log_ref_ratio: math.exp(log_ref_ratio) - log_ref_ratio - 1  # noqa: E731
    # tokens of response 0: r = 1.5 (clipped to 1.2) and r = 1; response 1: r = 0.5 (clip 0.8): min(-1, -1.6)
    token_0 = [min(1.5, 1.2) - 0.1 * k3(-math.log(1.5)), 1.0 - 0.1 * k3(math.log(2.0))]
    token_1 = [min(0.5 * -2, 0.8 * -2) - 0.1 * k3(-math.log(0.5))]
    expected = -(sum(token_0) / 2 + token_1[0]) / 2  # per response, then over responses
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert kl.item() == pytest.approx((k3(-math.log(1.5)) + k3(math.log(2.0)) + k3(-math.log(0.5))) / 3, rel=1e-5)
    # pi = pi_old = pi_ref: r = 1, KL = 0, loss = -mean advantage
    loss, clipfrac, kl = rlhf.grpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2),
                                        torch.tensor([1.0, 3.0]), torch.ones(2, 2), 0.2, 0.1)
    assert (loss.item(), clipfrac.item(), kl.item()) == (pytest.approx(-2.0), 0.0, 0.0)


def test_rloo_with_one_step_is_reinforce_with_the_leave_one_out_baseline():
    """The ratio of the whole response is 1 at the first step, so ppo_clip_loss's gradient is REINFORCE's:
    -mean(A * grad log pi(y|x))."""
    logits = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    tokens = torch.tensor([[1, 2, 0], [3, 1, 1], [0, 0, 4], [2, 2, 2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = rlhf.leave_one_out_advantages(torch.tensor([1.0, 0.0, 3.0, 2.0]), 2)
    seq_logprob = rlhf.sequence_logprobs(logits, tokens, mask).sum(dim=1)
    loss, _ = rlhf.ppo_clip_loss(seq_logprob, seq_logprob.detach(), advantages, 0.2)
    (grad_ppo,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (grad_reinforce,) = torch.autograd.grad(-(advantages * seq_logprob).mean(), logits)
    torch.testing.assert_close(grad_ppo, grad_reinforce)


# ---------------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------------


def padded_batch(seed=0, B=5, L=7):
    """values [B, L] and a mask whose rows have 1..L real tokens at the front."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, L, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 3, L, 2, 5])[:B]
    mask = (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)).double()
    return values, mask


def test_masked_mean_ignores_padding_even_nan():
    values, mask = padded_batch()
    expected = values[mask.bool()].mean()
    torch.testing.assert_close(rlhf.masked_mean(values, mask), expected)
    values[~mask.bool()] = float("nan")
    torch.testing.assert_close(rlhf.masked_mean(values, mask), expected)
    assert rlhf.masked_mean(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5)


def test_masked_whiten_equals_whitening_the_unpadded_values():
    values, mask = padded_batch()
    real = mask.bool()
    whitened = rlhf.masked_whiten(values, mask)
    unpadded = values[real]
    torch.testing.assert_close(whitened[real], (unpadded - unpadded.mean()) / (unpadded.std() + 1e-8))
    assert torch.all(whitened[~real] == 0)
    values[~real] = 1e6  # whatever sits in the padding changes nothing
    torch.testing.assert_close(rlhf.masked_whiten(values, mask), whitened)
    example = rlhf.masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(example, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]))


def test_masked_whiten_of_a_single_real_token_is_zero_not_nan():
    """One real token has no spread to divide by: the unbiased std of one number is NaN, and its whitened value
    is 0, its distance from the mean."""
    whitened = rlhf.masked_whiten(torch.tensor([[5.0, 7.0, 9.0]]), torch.tensor([[0, 1, 0]]))
    assert torch.equal(whitened, torch.zeros(1, 3))


def test_response_mask_last_token_and_dones():
    PAD, EOS = rlhf.PAD, rlhf.EOS
    responses = torch.tensor([[5, EOS, PAD, PAD], [4, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    mask = rlhf.response_mask(responses)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert rlhf.last_token_index(mask).tolist() == [1, 3, 0]
    torch.testing.assert_close(rlhf.episode_dones(mask), torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]))


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probs and rewards
# ---------------------------------------------------------------------------------------------------------


def test_sequence_logprobs_equal_a_direct_gather_and_ignore_padding():
    torch.manual_seed(0)
    B, L, V = 4, 6, 9
    logits = torch.randn(B, L, V, dtype=torch.float64) * 3
    tokens = torch.randint(0, V, (B, L))
    _, mask = padded_batch(B=B, L=L)
    logprobs = rlhf.sequence_logprobs(logits, tokens, mask)
    for b in range(B):
        for t in range(L):
            direct = torch.log(torch.softmax(logits[b, t], dim=0)[tokens[b, t]]) if mask[b, t] else 0.0
            assert logprobs[b, t].item() == pytest.approx(float(direct), abs=1e-12)
    # anything in the padded positions, NaN logits and other tokens included, leaves the result unchanged
    pad = ~mask.bool()
    logits[pad] = float("nan")
    tokens[pad] = torch.randint(0, V, (int(pad.sum()),))
    torch.testing.assert_close(rlhf.sequence_logprobs(logits, tokens, mask), logprobs)
    example = rlhf.sequence_logprobs(torch.tensor([[[0.0, 0.0], [9.0, 9.0]]]), torch.tensor([[1, 0]]),
                                     torch.tensor([[1, 0]]))
    torch.testing.assert_close(example, torch.tensor([[-math.log(2), 0.0]]))


def test_model_logprobs_do_not_depend_on_what_follows_the_eos():
    """Causal attention + masking: changing the tokens after EOS changes no real token's log-prob or value."""
    torch.manual_seed(0)
    model = rlhf.TinyLM(vocab_size=12, max_len=10, d_model=16, n_layers=2, n_heads=2)
    prompts = torch.tensor([[3, 4, 5], [6, 7, 8]])
    responses = torch.tensor([[5, 9, rlhf.EOS, rlhf.PAD, rlhf.PAD, rlhf.PAD, rlhf.PAD],
                              [3, rlhf.EOS, rlhf.PAD, rlhf.PAD, rlhf.PAD, rlhf.PAD, rlhf.PAD]])
    other = responses.clone()
    other[0, 3:] = torch.tensor([4, 4, 11, 2])
    other[1, 2:] = torch.tensor([10, 10, 3, 3, 3])
    mask = rlhf.response_mask(responses)
    torch.testing.assert_close(rlhf.response_mask(other), mask)

    def logprobs_and_values(resp):
        seq = torch.cat([prompts, resp], dim=1)
        logprob = rlhf.sequence_logprobs(rlhf.response_logits(model, seq, 3, 0.7), resp, mask)
        return logprob, torch.where(mask.bool(), rlhf.response_values(model, seq, 3), 0.0)

    for a, b in zip(logprobs_and_values(responses), logprobs_and_values(other)):
        torch.testing.assert_close(a, b)


def test_token_rewards_score_on_last_real_token_and_kl_on_every_real_token():
    logprob = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0], [-3.0, 0.0, 0.0, 0.0]])
    ref_logprob = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, -2.0, -2.0], [-1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # row 1: no EOS, real to the end
    score = torch.tensor([2.0, -1.0, 5.0])
    beta = 0.1
    rewards = rlhf.token_rewards(score, logprob, ref_logprob, mask, beta)
    kl_part = -beta * (logprob - ref_logprob) * mask
    expected = kl_part.clone()
    expected[0, 2] += 2.0
    expected[1, 3] += -1.0
    expected[2, 0] += 5.0
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[mask == 0] == 0)
    # the return of each response is score - beta * sum_t (log pi - log pi_ref): the RLHF objective
    torch.testing.assert_close(rewards.sum(1), score - beta * ((logprob - ref_logprob) * mask).sum(1))
    # beta = 0: the score alone, on the last real token only
    only_score = rlhf.token_rewards(score, logprob, ref_logprob, mask, 0.0)
    assert (only_score != 0).sum().item() == 3
    example = rlhf.token_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -1.0, 0.0]]),
                                 torch.tensor([[-2.0, -1.0, 0.0]]), torch.tensor([[1, 1, 0]]), 0.5)
    torch.testing.assert_close(example, torch.tensor([[-0.5, 2.0, 0.0]]))


def test_gae_over_tokens_ignores_padding_and_lambda_one_gives_the_reward_to_go():
    """compute_gae on [L, B] with dones at the last real token: nothing leaks in from the padding, and with
    gamma = lambda = 1 the return at every real token is the sum of that response's remaining token rewards."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    score = torch.randn(3, generator=g)
    logprob, ref_logprob = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    rewards = rlhf.token_rewards(score, logprob, ref_logprob, mask, 0.2)
    values = torch.where(mask.bool(), torch.randn(3, 5, generator=g), 0.0)
    dones = rlhf.episode_dones(mask)
    adv, returns = rlhf.compute_gae(rewards.T, values.T, dones.T, torch.zeros(3), 1.0, 1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    real = mask.bool()
    torch.testing.assert_close(returns.T[real], reward_to_go[real])
    garbage_values = values.clone()
    garbage_values[~real] = 100.0
    adv2, _ = rlhf.compute_gae(rewards.T, garbage_values.T, dones.T, torch.full((3,), 50.0), 0.99, 0.95)
    adv3, _ = rlhf.compute_gae(rewards.T, values.T, dones.T, torch.zeros(3), 0.99, 0.95)
    torch.testing.assert_close(adv2.T[real], adv3.T[real])


# ---------------------------------------------------------------------------------------------------------
# KL controller
# ---------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_by_the_documented_amount():
    above = rlhf.AdaptiveKLController(0.1, kl_target=6.0, horizon=10_000)
    assert above.update(12.0, 2000) == pytest.approx(0.1 * (1 + 0.2 * 2000 / 10_000))  # clipped at +20%: 0.104
    below = rlhf.AdaptiveKLController(0.1, kl_target=6.0, horizon=10_000)
    assert below.update(0.0, 2000) == pytest.approx(0.1 * (1 - 0.2 * 2000 / 10_000))  # clipped at -20%
    inside = rlhf.AdaptiveKLController(0.1, kl_target=6.0, horizon=10_000)
    assert inside.update(6.6, 1000) == pytest.approx(0.1 * (1 + 0.1 * 1000 / 10_000))  # proportional: e = 0.1
    on_target = rlhf.AdaptiveKLController(0.1, kl_target=6.0, horizon=10_000)
    assert on_target.update(6.0, 5000) == pytest.approx(0.1)
    # repeated updates above the target keep raising beta, below keep lowering it
    for _ in range(5):
        above.update(20.0, 2000)
        below.update(1.0, 2000)
    assert above.value > 0.104 and below.value < 0.096
    assert rlhf.FixedKLController(0.05).update(100.0, 256) == 0.05


# ---------------------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------------------


def tokens(text: str) -> list:
    return [rlhf.EOS if c == "." else ord(c) - ord("a") + rlhf.FIRST_CONTENT for c in text]


@pytest.mark.parametrize("response,gold", [("bc.", 2.0), ("bz.", 0.5), ("bbb.", -1.0), ("cdab.", 4.0),
                                           ("cdabz.", 3.5), (".", 0.0), ("bcbcbcbcbc", 2 - 8 - 2.0)])
def test_gold_reward(response, gold):
    prompt = torch.tensor([tokens("abcd")])
    resp = tokens(response.replace("z", "m"))  # m: a content token not in the prompt
    resp = torch.tensor([resp + [rlhf.PAD] * (10 - len(resp))])
    assert rlhf.gold_reward(prompt, resp, rlhf.response_mask(resp)).item() == pytest.approx(gold)


def test_behaviour_policy_never_repeats_and_always_ends():
    g = torch.Generator().manual_seed(0)
    prompts = rlhf.sample_prompts(2000, 4, 16, g)
    assert torch.all(prompts >= rlhf.FIRST_CONTENT) and torch.all(prompts < 16)
    assert torch.all(torch.sort(prompts, dim=1).values.diff(dim=1) > 0)  # distinct tokens
    responses, logprob = rlhf.behaviour_policy(prompts, 10, 6, 0.8, 16, g)
    mask = rlhf.response_mask(responses)
    lengths = mask.sum(1)
    assert torch.all((responses == rlhf.EOS).sum(1) == 1)
    assert lengths.min() == 2 and lengths.max() == 7  # 1..6 content tokens + EOS
    assert rlhf.repeat_count(prompts, responses, mask).sum() == 0
    assert torch.all(logprob < 0)
    # one content token always (demo_max_len 1): log-prob log(0.8 / 4) for a prompt token, log(0.2 / 10) otherwise
    short, short_lp = rlhf.behaviour_policy(prompts, 10, 1, 0.8, 16, g)
    hit = (short[:, :1] == prompts).any(1)
    torch.testing.assert_close(short_lp, torch.where(hit, math.log(0.2), math.log(0.02)))
    assert 0.75 < hit.float().mean() < 0.85


def test_sampling_and_logprobs_use_the_same_temperature():
    """generate() samples from softmax(logits / T) and rollout() scores with log_softmax(logits / T): the
    empirical frequencies of the first response token match exp(rollout log-prob)."""
    torch.manual_seed(0)
    model = rlhf.TinyLM(vocab_size=6, max_len=4, d_model=8, n_layers=1, n_heads=1)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # a peaked distribution, so the temperature matters
    args = rlhf.Args(vocab_size=6, prompt_len=2, max_response_len=2, temperature=0.5)
    prompts = torch.tensor([[3, 4]]).repeat(20_000, 1)
    batch = rlhf.rollout(model, model, model, prompts, args)
    first = batch["responses"][:, 0]
    probs = batch["logprobs"][:, 0].exp()
    for token in first.unique():
        p = probs[first == token][0].item()
        freq = (first == token).float().mean().item()
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / 20_000) + 1e-3, (token, freq, p)
    assert torch.all(batch["kl"].abs() < 1e-5)  # policy == reference


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def test_every_stage_runs_logs_saves_and_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = rlhf.main(TINY + ["--save-model", "--adaptive-kl"])
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    stages = [m["stage"] for m in metrics]
    assert stages[0] == "sft" and stages[-1] == "summary"
    assert {"sft", "rm", "ppo", "dpo"} <= set(stages)
    ppo = [m for m in metrics if m["stage"] == "ppo"]
    assert [m["iteration"] for m in ppo] == [1, 2]
    for key in ("proxy_reward", "gold_reward", "kl_ref", "entropy", "clipfrac", "approx_kl_k1", "approx_kl_k3",
                "explained_variance", "policy_loss", "value_loss", "beta", "learning_rate", "sps", "global_step",
                "episodic_return", "episodic_length", "time"):
        assert key in ppo[-1], key
    assert ppo[0]["update_minibatches"] == 4  # 2 epochs x 2 minibatches
    assert ppo[1]["beta"] != ppo[0]["beta"]  # --adaptive-kl moved it
    rm = [m for m in metrics if m["stage"] == "rm"]
    assert 0.0 <= rm[-1]["rm_heldout_acc"] <= 1.0
    dpo = [m for m in metrics if m["stage"] == "dpo"]
    assert dpo and all(k in dpo[-1] for k in ("gold_reward", "kl_ref", "loss", "heldout_acc"))
    for key in ("sft_loss", "rm_heldout_acc", "gold_reward_ref", "gold_reward_ppo", "gold_reward_dpo", "kl_ref_ppo"):
        assert summary[key] is not None, key
    assert json.loads((run_dir / "summary.json").read_text())["gold_reward_ppo"] == summary["gold_reward_ppo"]

    checkpoint = torch.load(run_dir / "ppo_rlhf_toy.pt", weights_only=True)
    assert checkpoint["script"] == "ppo_rlhf_toy"
    assert {"ref_policy", "reward_model", "ppo_policy", "dpo_policy", "args"} <= set(checkpoint)
    out = capsys.readouterr().out
    assert "best possible" in out and "saved" in out
    result = rlhf.main(["--eval-checkpoint", str(run_dir / "ppo_rlhf_toy.pt"), "--eval-episodes", "8"])
    assert set(result["eval"]) == {"demonstrator", "pi_ref (SFT)", "PPO", "DPO"}
    assert "PPO" in capsys.readouterr().out


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        rlhf.main(TINY + ["--direct-epochs", "1", "--direct-eval-every", "100"])
        runs.append(read_metrics(run_dirs(tmp_path / name)[0]))
    for first, second in zip(*runs):
        for row in (first, second):
            row.pop("time"), row.pop("sps", None)
        assert first == second


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-minibatches", "3"], "does not divide --rollout-batch-size 256"),
        (["--beta", "-1"], "--beta must be >= 0"),
        (["--n-heads", "5"], "does not divide --d-model 64"),
        (["--demo-max-len", "10"], "--demo-max-len 10 must be in [1, --max-response-len 10)"),
        (["--prompt-len", "14"], "--prompt-len 14 needs"),
        (["--algo", "grpo", "--group-size", "1"], "--group-size must be >= 2 for --algo grpo"),
        (["--algo", "rloo", "--group-size", "6"], "--group-size 6 does not divide --rollout-batch-size 256"),
        (["--direct", "dpo", "dpo"], "--direct names a method twice"),
        (["--ipo-tau", "0"], "--ipo-tau must be > 0"),
    ],
)
def test_bad_input_exits_before_anything_is_written(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^error: ") as exc:
        rlhf.main(argv)
    assert message in str(exc.value)
    assert not (tmp_path / "runs").exists()


def test_minibatches_of_one_response_are_refused_when_advantages_are_whitened(tmp_path, monkeypatch):
    """A response can be a lone EOS, so a minibatch of one response can hold one token, with nothing to whiten
    against; two responses always hold two tokens or more."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: --rollout-batch-size 16 / --num-minibatches 16 leaves one "
                                         r"response per minibatch"):
        rlhf.main(TINY + ["--num-minibatches", "16"])
    assert not (tmp_path / "runs").exists()
    rlhf.check_args(rlhf.Args(rollout_batch_size=16, num_minibatches=16, norm_adv=False))  # nothing is whitened
    rlhf.check_args(rlhf.Args(rollout_batch_size=16, num_minibatches=8))


def test_bad_input_is_one_line_on_stderr_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "ppo_rlhf_toy.py"), "--temperature", "0"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: --temperature must be > 0, got 0.0"
    assert not (tmp_path / "runs").exists()


def test_checkpoint_from_another_script_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "other.pt"
    torch.save({"script": "ppo_discrete", "model": {}, "args": {}}, path)
    with pytest.raises(SystemExit, match="written by ppo_discrete.py, not ppo_rlhf_toy.py"):
        rlhf.main(["--eval-checkpoint", str(path)])


def test_nan_in_ppo_stops_with_quantity_iteration_and_minibatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def nan_value_loss(new_values, old_values, returns, clip_coef):
        return new_values.mean() * float("nan")

    monkeypatch.setattr(rlhf, "value_loss", nan_value_loss)
    with pytest.raises(SystemExit, match=r"value_loss is nan at PPO iteration 1, minibatch 1; stopping"):
        rlhf.main(TINY + ["--save-model"])
    assert not list(tmp_path.glob("runs/*/ppo_rlhf_toy.pt"))


def test_nan_in_reward_model_stops_with_epoch_and_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    def inf_bt_loss(r_chosen, r_rejected):
        return (r_chosen - r_rejected).mean() * float("inf")

    monkeypatch.setattr(rlhf, "bradley_terry_loss", inf_bt_loss)
    with pytest.raises(SystemExit, match=r"rm_loss is (nan|inf|-inf) at reward-model epoch 1, batch 1; stopping"):
        rlhf.main(TINY)


def test_one_evaluation_prompt_is_enough(tmp_path, monkeypatch):
    """--eval-episodes 1 (check_args allows it): the final table shows the one sample there is."""
    monkeypatch.chdir(tmp_path)
    flags = TINY[: TINY.index("--eval-episodes")] + ["--eval-episodes", "1"]
    summary = rlhf.main(flags)
    assert "gold_reward_ppo" in summary


@pytest.mark.parametrize("argv", [
    ["--algo", "grpo", "--reward", "gold", "--direct", "ipo", "kto"],
    ["--algo", "rloo"],
    ["--algo", "ppo", "--reward", "gold", "--direct"],
], ids=["grpo-gold-ipo-kto", "rloo", "ppo-gold-no-direct"])
def test_every_method_runs_and_reports_the_same_numbers(tmp_path, monkeypatch, argv):
    """Each online method and each direct one logs its stage's rows and a summary with gold, proxy, KL and the
    model copies it holds; with --save-model the checkpoint holds each method's policy and evaluates."""
    monkeypatch.chdir(tmp_path)
    summary = rlhf.main(TINY + ["--group-size", "4", "--save-model"] + argv)
    algo = argv[1]
    direct = argv[argv.index("--direct") + 1:] if "--direct" in argv else ["dpo"]
    rows = [json.loads(line) for line in next(tmp_path.glob("runs/*/metrics.jsonl")).read_text().splitlines()]
    for method in [algo, *direct]:
        stage_rows = [r for r in rows if r["stage"] == method]
        assert stage_rows and all(k in stage_rows[-1] for k in ("gold_reward", "proxy_reward", "kl_ref", "entropy"))
        assert all(f"{key}_{method}" in summary for key in ("gold_reward", "proxy_reward", "kl_ref", "models"))
    reward = argv[argv.index("--reward") + 1] if "--reward" in argv else "model"
    assert summary[f"models_{algo}"] == 2 + (algo == "ppo") + (reward == "model")
    assert all(summary[f"models_{method}"] == 2 for method in direct)
    if (algo, reward) == ("grpo", "gold"):  # the verifier is GRPO's whole reward (its KL is in the loss)
        for row in (r for r in rows if r["stage"] == "grpo"):
            assert row["episodic_return"] == pytest.approx(row["gold_reward"])
    checkpoint = torch.load(next(tmp_path.glob("runs/*/ppo_rlhf_toy.pt")), weights_only=True)
    assert {f"{m}_policy" for m in [algo, *direct]} <= set(checkpoint)
    evaluated = rlhf.main(["--eval-checkpoint", str(next(tmp_path.glob("runs/*/ppo_rlhf_toy.pt"))),
                           "--eval-episodes", "8"])
    assert {algo.upper(), *(m.upper() for m in direct)} <= set(evaluated["eval"])
