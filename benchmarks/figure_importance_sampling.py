"""The article's importance-sampling figure, from real policy pairs ("Importance sampling: the bridge to off-policy
data": "Far from theta_old, the variance of the IS estimator grows roughly as exp(2 D_KL)").

    python benchmarks/figure_importance_sampling.py              # train, measure, store, draw (about a minute)
    python benchmarks/figure_importance_sampling.py --plot-only  # draw from the stored JSON

Two cases, each with a script's own policy: HalfCheetah-v4 with ppo_continuous.py (a Gaussian with a learnt,
state-independent std) and CartPole-v1 with ppo_discrete.py (a categorical over 2 actions). Seed 1 throughout.
  pi_old     the script's agent after a short training run (main([... "--save-model"]) in a temporary folder).
  batches    two rollouts of BATCH steps of pi_old on one env (env seeds 1 and 2; the saved observation normaliser
             frozen), advantages from the script's critic and compute_gae (with its reward scaling and time-limit
             bootstrap), normalised over the batch. pi_new is fit to the first; the second is held out.
  the pairs  pi_old and pi_new = the policy after k Adam steps on the UNCLIPPED surrogate L^IS = mean(r A)
             (trpo.surrogate) of the first batch, 64-sample minibatches (the script's learning rate, Adam eps and
             max_grad_norm, here on the actor's gradient alone), k = 1, 2, 3, 4, 6, 8, ... up to 64 epochs. Nothing
             holds pi_new near pi_old, so the exact mean KL(pi_old || pi_new) over the states (trpo.gaussian_kl,
             trpo.categorical_kl) runs past 1.
Per pair, on the held-out batch's samples from pi_old (independent of pi_new), with r = pi_new(a|s) / pi_old(a|s):
  - the variance of the IS estimate of pi_new's mean advantage, Var(r A) / N, of the clipped-ratio estimate
    mean(clip(r, 0.8, 1.2) A) and of PPO's mean(min(r A, clip(r) A)), each over the on-policy Var(A) / N (so all
    are 1 at k = 0). The samples are consecutive steps of one env, correlated in time, so Var / N understates the
    variance of a batch mean; the ratio of two such variances is what is plotted. The IS variance is also measured
    on the batch pi_new was fit to, as PPO's epochs see it.
  - E_old[r^2] = 1 + chi^2(pi_new || pi_old), the quantity the exp(2 KL) law is about, exactly, state by state
    (second_moment), averaged over the states; and the mean over states of exp(2 KL(s)), which a Gaussian's
    E_old[r^2 | s] equals exactly while its std does not move: the gap between it and exp(2 mean KL) is what
    averaging over states does, the gap between it and E_old[r^2] what the moving std (or a categorical) does.
  - the share of r outside the clip zone [0.8, 1.2] (ppo_clip_loss's clipfrac) and a histogram of r.
Printed: measured / exp(2 KL) at KL 0.01, 0.1 and 1, and the share outside the clip zone per pair.
Data: benchmarks/results/article_figures/importance_sampling.json; figure: benchmarks/figures/importance_sampling.png.
Needs matplotlib to draw (optional dependency: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import ppo_continuous  # noqa: E402
import ppo_discrete  # noqa: E402
import trpo  # noqa: E402
from compact import rounded_tree  # noqa: E402
from plot import pyplot  # noqa: E402

DATA = ROOT / "benchmarks" / "results" / "article_figures" / "importance_sampling.json"
FIGURE = ROOT / "benchmarks" / "figures" / "importance_sampling.png"
SEED = 1
BATCH = 4096
MINIBATCH = 64  # ppo_continuous.py's (2048 / 32)
EPOCHS = 64
CLIP_COEF = 0.2  # the article's clip zone [0.8, 1.2]
BINS = np.linspace(0.0, 3.0, 61)  # the histogram of r; ratios above 3 are counted apart
TRAIN_STEPS = {"HalfCheetah-v4": 49_152, "CartPole-v1": 20_480}  # 24 and 40 iterations of the scripts' batch
HISTOGRAM_KLS = (0.005, 0.02, 0.05, 0.2)  # the left panels draw the pairs nearest these KLs (the article's)


class Gaussian:
    """ppo_continuous.py's pi(a|s) = N(actor_mean(s), exp(actor_logstd)^2); a distribution is (mean, log_std)."""

    script = ppo_continuous

    def __init__(self, checkpoint: dict):
        obs_dim, action_dim, self.low, self.high = ppo_continuous.check_env(checkpoint["args"]["env_id"])
        self.agent = ppo_continuous.Agent(obs_dim, action_dim)
        self.agent.load_state_dict(checkpoint["model"])
        self.obs_rms = ppo_continuous.RunningMeanStd((obs_dim,), torch.device("cpu"))
        self.obs_rms.load_state_dict(checkpoint["obs_rms"])  # frozen: pi_old is one fixed function of the state
        self.reward_scaler = ppo_continuous.RewardScaler(1, checkpoint["args"]["gamma"], torch.device("cpu"))
        self.reward_scaler.return_rms.load_state_dict(checkpoint["return_rms"])  # the critic's reward units

    def normalize(self, raw_obs: np.ndarray) -> torch.Tensor:
        return self.obs_rms.normalize(raw_obs[None])

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        return np.clip(action[0].numpy(), self.low, self.high)

    def scale_rewards(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        return self.reward_scaler(rewards, dones).float()

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.agent.actor_mean(obs), self.agent.actor_logstd

    @staticmethod
    def logprob(dist, actions: torch.Tensor) -> torch.Tensor:
        return ppo_continuous.gaussian_log_prob(*dist, actions)

    @staticmethod
    def kl(old, new) -> torch.Tensor:
        return trpo.gaussian_kl(*old, *new)

    @staticmethod
    def second_moment(old, new) -> torch.Tensor:
        """E_old[r^2 | s] per state [B], exactly: per action dimension, the integral of pi_new^2 / pi_old is
        sigma_old^2 / (sigma_new sqrt(v)) exp((mu_new - mu_old)^2 / v) with v = 2 sigma_old^2 - sigma_new^2
        (complete the square; tests/test_figure_importance_sampling.py checks it by sampling); the dimensions
        multiply. With sigma_new = sigma_old it is exp((mu_new - mu_old)^2 / sigma^2) = exp(2 KL(s)): the
        article's law, exact. Infinite once v <= 0 (sigma_new^2 >= 2 sigma_old^2): r then has no variance."""
        (old_mean, old_log_std), (new_mean, new_log_std) = old, new
        var_old, var_new = (2.0 * old_log_std).exp(), (2.0 * new_log_std).exp()
        spread = 2.0 * var_old - var_new  # [A]
        log_moment = var_old.log() - 0.5 * var_new.log() - 0.5 * spread.log() + (new_mean - old_mean) ** 2 / spread
        return torch.where(spread > 0, log_moment, math.inf).sum(dim=-1).exp()


class Categorical:
    """ppo_discrete.py's pi(a|s) = softmax(actor(s)); a distribution is (logits,). No normalisers."""

    script = ppo_discrete

    def __init__(self, checkpoint: dict):
        obs_dim, n_actions = ppo_discrete.check_env(checkpoint["args"]["env_id"])
        self.agent = ppo_discrete.Agent(obs_dim, n_actions)
        self.agent.load_state_dict(checkpoint["model"])

    def normalize(self, raw_obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(raw_obs[None], dtype=torch.float32)

    def env_action(self, action: torch.Tensor) -> int:
        return int(action[0])

    def scale_rewards(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        return rewards.float()

    def dist(self, obs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.agent.actor(obs),)

    @staticmethod
    def logprob(dist, actions: torch.Tensor) -> torch.Tensor:
        return ppo_discrete.categorical_logprob_entropy(dist[0], actions)[0]

    @staticmethod
    def kl(old, new) -> torch.Tensor:
        return trpo.categorical_kl(old[0], new[0])

    @staticmethod
    def second_moment(old, new) -> torch.Tensor:
        """E_old[r^2 | s] = sum_a pi_new(a|s)^2 / pi_old(a|s) per state [B]; at most 1 / min_a pi_old(a|s)."""
        old_log_probs, new_log_probs = old[0].log_softmax(dim=-1), new[0].log_softmax(dim=-1)
        return (2.0 * new_log_probs - old_log_probs).exp().sum(dim=-1)


POLICIES = {"HalfCheetah-v4": Gaussian, "CartPole-v1": Categorical}


def train_pi_old(env_id: str, steps: int) -> tuple[dict, dict]:
    """The script's own training run, in the current folder: (its checkpoint, its summary)."""
    script = POLICIES[env_id].script
    summary = script.main(["--env-id", env_id, "--seed", str(SEED), "--total-timesteps", str(steps), "--save-model",
                           "--eval-episodes", "1"])
    (path,) = glob.glob(f"runs/*/{script.SCRIPT}.pt")
    return script.load_checkpoint(path), summary


@torch.no_grad()
def collect_batch(policy, env_id: str, steps: int, seed: int, gamma: float, gae_lambda: float) -> dict:
    """`steps` transitions of pi_old on one env, their advantages as the script computes them, pi_old's log-probs."""
    env = gym.make(env_id)
    raw_obs, _ = env.reset(seed=seed)
    obs, actions, rewards, dones, truncated_at, final_obs = [], [], [], [], [], []
    for _ in range(steps):
        obs.append(policy.normalize(raw_obs))
        actions.append(policy.agent.sample(obs[-1]))
        raw_obs, reward, terminated, truncated, _ = env.step(policy.env_action(actions[-1]))
        rewards.append(reward)
        dones.append(float(terminated or truncated))
        truncated_at.append(float(truncated and not terminated))
        final_obs.append(policy.normalize(raw_obs))  # before the reset: the episode's last observation
        if terminated or truncated:
            raw_obs, _ = env.reset()
    env.close()
    obs, actions, final_obs = torch.cat(obs), torch.cat(actions), torch.cat(final_obs)
    dones = torch.tensor(dones).unsqueeze(1)  # [T, 1]: one env
    rewards = policy.scale_rewards(torch.tensor(rewards, dtype=torch.float64).unsqueeze(1), dones)
    # A time limit is not a terminal: bootstrap with gamma * V(final obs), as the scripts do before compute_gae
    rewards += gamma * torch.tensor(truncated_at).unsqueeze(1) * policy.agent.value(final_obs).unsqueeze(1)
    last_value = policy.agent.value(policy.normalize(raw_obs))
    advantages, _ = policy.script.compute_gae(rewards, policy.agent.value(obs).unsqueeze(1), dones, last_value,
                                              gamma, gae_lambda)
    old_dist = tuple(x.detach().clone() for x in policy.dist(obs))  # a copy: the actor's log-std moves in place
    return {"obs": obs, "actions": actions, "advantages": policy.script.normalize_advantages(advantages.squeeze(1)),
            "old_dist": old_dist, "old_logprob": policy.logprob(old_dist, actions)}


def estimator_stats(policy, batch: dict, new_dist) -> tuple[torch.Tensor, dict]:
    """The ratio on a batch of pi_old's samples, and the variances of the three estimates of pi_new's advantage,
    each over the on-policy one, Var(A) (the 1 / N cancels)."""
    new_logprob = policy.logprob(new_dist, batch["actions"])
    ratio = (new_logprob - batch["old_logprob"]).exp()
    advantages = batch["advantages"]
    weighted = ratio * advantages  # L^IS's terms
    clipped = ratio.clamp(1.0 - CLIP_COEF, 1.0 + CLIP_COEF) * advantages
    ppo_loss, outside = policy.script.ppo_clip_loss(new_logprob, batch["old_logprob"], advantages, CLIP_COEF)
    _, k3 = policy.script.approx_kl(new_logprob, batch["old_logprob"])
    on_policy = advantages.var()
    return ratio, {
        "kl_k3": k3.item(),
        "r2": ratio.square().mean().item(),
        "outside_clip": outside.item(),
        "is_estimate": weighted.mean().item(),
        "ppo_estimate": -ppo_loss.item(),
        "var_is": (weighted.var() / on_policy).item(),
        "var_clipped": (clipped.var() / on_policy).item(),
        "var_ppo": (torch.minimum(weighted, clipped).var() / on_policy).item(),  # PPO's min(r A, clip(r) A)
    }


@torch.no_grad()
def pair_stats(policy, fit: dict, test: dict) -> dict:
    """The pair (pi_old, the policy as it is now): exact KL and E_old[r^2] over the held-out batch's states,
    the estimators on its samples (independent of pi_new), and on the samples pi_new was fit to (as PPO sees it)."""
    new_dist = policy.dist(test["obs"])
    kl = policy.kl(test["old_dist"], new_dist)  # [B]
    ratio, held_out = estimator_stats(policy, test, new_dist)
    _, on_fit = estimator_stats(policy, fit, policy.dist(fit["obs"]))
    return {
        "kl": kl.mean().item(),
        "r2_exact": policy.second_moment(test["old_dist"], new_dist).mean().item(),
        "mean_exp_2kl": (2.0 * kl).exp().mean().item(),
        **held_out,
        "histogram": np.histogram(ratio.numpy(), BINS)[0].tolist(),
        "above_3": int((ratio > BINS[-1]).sum()),
        "fit": {key: on_fit[key] for key in ("outside_clip", "is_estimate", "var_is")},
    }


def measure(env_id: str, train_steps: int, batch_size: int = BATCH, epochs: int = EPOCHS) -> dict:
    """Train pi_old, sample two batches, push pi_k away from pi_old on L^IS of the first; every snapshot's stats."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # for runs/ and MuJoCo's MUJOCO_LOG.TXT
        checkpoint, summary = train_pi_old(env_id, train_steps)
        torch.manual_seed(SEED)
        policy = POLICIES[env_id](checkpoint)
        args = checkpoint["args"]
        fit = collect_batch(policy, env_id, batch_size, SEED, args["gamma"], args["gae_lambda"])
        test = collect_batch(policy, env_id, batch_size, SEED + 1, args["gamma"], args["gae_lambda"])
    # Snapshots after k = 1, 2, 3, 4, 6, 8, 11, 16, ... minibatch steps: 2 per doubling of k
    total = epochs * batch_size // MINIBATCH
    snapshots = {round(2 ** (i / 2)) for i in range(int(2 * math.log2(total)) + 1)}
    actor = [p for name, p in policy.agent.named_parameters() if not name.startswith("critic")]  # incl. the log-std
    optimizer = torch.optim.Adam(actor, lr=args["learning_rate"], eps=1e-5)  # the scripts' Adam
    pairs = [dict(step=0, **pair_stats(policy, fit, test))]
    minibatches = (indices for _ in range(epochs) for indices in torch.randperm(batch_size).split(MINIBATCH))
    for step, indices in enumerate(minibatches, 1):
        new_logprob = policy.logprob(policy.dist(fit["obs"][indices]), fit["actions"][indices])
        advantages = policy.script.normalize_advantages(fit["advantages"][indices])  # per minibatch, as PPO
        loss = -trpo.surrogate(new_logprob, fit["old_logprob"][indices], advantages)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor, args["max_grad_norm"])
        optimizer.step()
        if step in snapshots:
            pairs.append(dict(step=step, **pair_stats(policy, fit, test)))
    return {"env_id": env_id, "script": f"{policy.script.SCRIPT}.py", "seed": SEED, "train_steps": train_steps,
            "pi_old_return_last100": summary["episodic_return_100"], "batch": batch_size, "minibatch": MINIBATCH,
            "steps_per_epoch": batch_size // MINIBATCH, "learning_rate": args["learning_rate"],
            "max_grad_norm": args["max_grad_norm"], "pairs": pairs}


def law_check(case: dict, kls=(0.01, 0.1, 1.0)) -> dict[str, list[float]]:
    """Measured / exp(2 KL) at the given KLs (log-log interpolation between the snapshots)."""
    pairs = sorted((p for p in case["pairs"] if p["kl"] > 0), key=lambda p: p["kl"])
    log_kl = np.log([p["kl"] for p in pairs])
    law = 2.0 * np.array([p["kl"] for p in pairs])  # log exp(2 KL)
    return {key: [float(np.exp(np.interp(math.log(kl), log_kl, np.log([p[key] for p in pairs]) - law))) for kl in kls]
            for key in ("r2_exact", "mean_exp_2kl", "var_is", "var_clipped", "var_ppo")}


def report(case: dict) -> str:
    lines = [f"{case['env_id']} ({case['script']}, pi_old after {case['train_steps']} steps: return of the last 100 "
             f"episodes {case['pi_old_return_last100']:.1f})", "  measured / exp(2 KL) at KL 0.01, 0.1, 1:"]
    lines += [f"    {key:13s}" + "".join(f"{x:8.3f}" for x in values) for key, values in law_check(case).items()]
    lines.append("  step  KL       outside [0.8, 1.2]  r > 3  Var(rA)/Var(A)  E_old[r^2]  exp(2 KL)  (held-out batch)")
    lines += [f"  {p['step']:4d}  {p['kl']:7.4f}  {p['outside_clip']:18.3f}  {p['above_3']:5d}  {p['var_is']:14.3f}  "
              f"{p['r2_exact']:10.3f}  {math.exp(2 * p['kl']):9.3f}" for p in case["pairs"]]
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    plt = pyplot()

    cases = data["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 4.6 * len(cases)), squeeze=False)
    for (ax_hist, ax_var), case in zip(axes, cases):
        pairs = [p for p in case["pairs"] if p["kl"] > 0]
        ax_hist.axvspan(1.0 - CLIP_COEF, 1.0 + CLIP_COEF, color="tab:green", alpha=0.15, label="clip zone [0.8, 1.2]")
        shown = {min(pairs, key=lambda p: abs(math.log(p["kl"] / target)))["step"] for target in HISTOGRAM_KLS}
        for color, p in zip(("C0", "C1", "C3", "C4", "C5"), (p for p in pairs if p["step"] in shown)):
            density = np.array(p["histogram"]) / (case["batch"] * np.diff(BINS))
            label = f"KL {p['kl']:.3f}: {p['outside_clip']:.0%} outside, {p['above_3']} of {case['batch']} above 3"
            ax_hist.stairs(density, BINS, color=color, linewidth=1.5, label=label)
        ax_hist.set_yscale("log")
        ax_hist.set_xlabel("ratio r = pi_new(a|s) / pi_old(a|s), on held-out samples of pi_old")
        ax_hist.set_ylabel("density")
        ax_hist.set_title(f"{case['env_id']} ({case['script']}): the ratio as pi_new drifts from pi_old")
        ax_hist.legend(fontsize=8)

        kl = np.array([p["kl"] for p in pairs])
        var_is, var_clipped = np.array([p["var_is"] for p in pairs]), np.array([p["var_clipped"] for p in pairs])
        ax_var.fill_between(kl, var_clipped, var_is, where=var_is > var_clipped, color="tab:orange", alpha=0.25,
                            label="variance saved by clipping")
        ax_var.plot(kl, var_is, "o-", color="C0", markersize=3, label="IS: Var(r A) / Var(A)")
        ax_var.plot(kl, var_clipped, "o-", color="tab:green", markersize=3,
                    label="clipped ratio: Var(clip(r) A) / Var(A)")
        ax_var.plot(kl, [p["var_ppo"] for p in pairs], "--", color="C4",
                    label="PPO: Var(min(r A, clip(r) A)) / Var(A)")
        ax_var.plot(kl, [p["fit"]["var_is"] for p in pairs], ":", color="C0",
                    label="IS on the batch pi_new was fit to")
        ax_var.plot(kl, [p["r2_exact"] for p in pairs], "s", color="black", markersize=3, fillstyle="none",
                    label="E_old[r^2] (exact, = 1 + chi^2)")
        ax_var.plot(kl, [p["mean_exp_2kl"] for p in pairs], "-", color="grey", linewidth=0.8,
                    label="mean over states of exp(2 KL(s))")
        ax_var.plot(kl, np.exp(2 * kl), "--", color="black", linewidth=1, label="exp(2 KL), the article's law")
        ax_var.set_xscale("log")
        ax_var.set_yscale("log")
        ax_var.set_xlim(1e-3, kl.max() * 1.5)  # below KL 1e-3 every curve is 1 (the printed table has them)
        ax_var.set_ylim(0.5, 1e3)
        ax_var.set_xlabel("exact mean KL(pi_old || pi_new) over the held-out batch's states")
        ax_var.set_ylabel("variance over the on-policy variance")
        ax_var.set_title(f"pi_new: after 1 ... {pairs[-1]['step']} Adam steps on L^IS; N = {case['batch']}")
        ax_var.grid(alpha=0.3, which="both")
        ax_var.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot-only", action="store_true", help=f"train nothing: draw from {DATA.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.plot_only:
        if not DATA.is_file():
            raise SystemExit(f"error: no {DATA}; run without --plot-only first")
        data = json.loads(DATA.read_text())
    else:
        # rounded before drawing too, so a run and a --plot-only draw the same figure
        data = rounded_tree({"command": "python benchmarks/figure_importance_sampling.py", "bins": BINS.tolist(),
                             "cases": [measure(env_id, steps) for env_id, steps in TRAIN_STEPS.items()]}, 5)
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(data) + "\n")
        print(f"wrote {DATA}")
    for case in data["cases"]:
        print(report(case))
    plot(data, FIGURE)


if __name__ == "__main__":
    main()
