"""The article's adaptive-KL-penalty figure ("PPO-Penalty: the adaptive cousin"): how beta shapes the objective
L^KL(theta) = E[r A] - beta E[KL(pi_old || pi_theta)] on a real batch (left), and a real adaptive beta schedule
(right).

    python benchmarks/figure_penalty.py               # train pi_old (a few seconds), measure, write the JSON, draw
    python benchmarks/figure_penalty.py --plot-only   # draw from benchmarks/results/article_figures/penalty_beta.json

Left, measured here: pi_old is ppo_penalty.py trained on CartPole-v1 for 30k steps with its defaults and
--seed 1 (in a temporary folder). It collects one batch of 2048 steps (one env, seed 1; a time-limit truncation
bootstrapped with gamma V(final obs), as the script does); advantages are the script's compute_gae (gamma 0.99,
lambda 0.95), normalised over the batch. The line is theta_old + t d in the actor's parameters, d the unit
gradient of the surrogate mean(r A) at theta_old (the policy gradient). At each t, ppo_penalty.kl_penalty_loss
gives L^KL(t) = mean(r A) - beta mean(KL) with the exact categorical KL (Agent.kl), for beta in 0, 0.3, 1, 3, 10,
30; each curve's maximiser t* (on a grid dense near 0) and the KL there are marked.
Right, read from the committed run benchmarks/results/ppo_penalty/HalfCheetah-v4/seed1.json.gz (ppo_penalty.py,
1M steps, cleanrl's MuJoCo settings, kl_target 0.01) by benchmarks/plot_beta.py's load: the beta each
iteration's update used (log axis), and the exact KL measured after it against the band
[kl_target / 1.5, 1.5 kl_target] inside which update_beta leaves beta unchanged.
Data: benchmarks/results/article_figures/penalty_beta.json. Figure: benchmarks/figures/penalty_beta.png.
Needs matplotlib to draw (optional dependency: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import ppo_penalty  # noqa: E402
from compact import read_metrics, rounded_tree  # noqa: E402
from plot import pyplot  # noqa: E402
from plot_beta import load  # noqa: E402

ENV_ID = "CartPole-v1"
SEED = 1
TOTAL_TIMESTEPS = 30_000  # pi_old part-trained: its last 100 training episodes average 154 of CartPole's 500
BATCH_STEPS = 2048
BETAS = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0)
HALFCHEETAH_RUN = ROOT / "benchmarks/results/ppo_penalty/HalfCheetah-v4/seed1.json.gz"


def train_pi_old(total_timesteps: int):
    """ppo_penalty.py's own training (defaults, --seed SEED) in a temporary folder; returns the Agent and args."""
    with tempfile.TemporaryDirectory() as tmp:
        here = os.getcwd()
        os.chdir(tmp)
        try:
            ppo_penalty.main(["--env-id", ENV_ID, "--total-timesteps", str(total_timesteps), "--seed", str(SEED),
                              "--save-model"])
            (path,) = glob.glob("runs/*/ppo_penalty.pt")
            checkpoint = ppo_penalty.load_checkpoint(path)
        finally:
            os.chdir(here)
    obs_dim, act_dim, discrete = ppo_penalty.check_env(ENV_ID)
    agent = ppo_penalty.Agent(obs_dim, act_dim, discrete)
    agent.load_state_dict(checkpoint["model"])
    return agent, checkpoint["args"]


def collect_batch(agent, steps: int, gamma: float, gae_lambda: float) -> dict:
    """One rollout of pi_old in one env: observations, actions, pi_old's logits and log-probs, GAE advantages."""
    torch.manual_seed(SEED)
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=SEED)
    observations, actions, rewards, dones = [], [], [], []
    with torch.no_grad():
        for _ in range(steps):
            observations.append(torch.as_tensor(obs, dtype=torch.float32))
            action = agent.sample(observations[-1][None])[0]
            obs, reward, terminated, truncated, _ = env.step(action.item())
            if truncated and not terminated:  # a time limit, not a terminal: the return goes on (as in the script)
                reward += gamma * agent.value(torch.as_tensor(obs, dtype=torch.float32)[None]).item()
            actions.append(action)
            rewards.append(float(reward))
            dones.append(float(terminated or truncated))
            if terminated or truncated:
                obs, _ = env.reset()
        b_obs, b_actions = torch.stack(observations), torch.stack(actions)
        old_params, values = agent(b_obs)
        old_logprob, _ = agent.logprob_entropy(old_params, b_actions)
        last_value = agent.value(torch.as_tensor(obs, dtype=torch.float32)[None])
        advantages, _ = ppo_penalty.compute_gae(torch.tensor(rewards)[:, None], values[:, None],
                                                torch.tensor(dones)[:, None], last_value, gamma, gae_lambda)
    env.close()
    return {"obs": b_obs, "actions": b_actions, "old_params": old_params, "old_logprob": old_logprob,
            "advantages": ppo_penalty.normalize_advantages(advantages[:, 0]), "episodes": int(sum(dones))}


def line_objectives(agent, batch: dict, t_grid: np.ndarray, betas) -> dict:
    """mean(r A), mean KL and L^KL for each beta along theta_old + t d, d the unit gradient of mean(r A)."""
    actor = list(agent.actor.parameters())
    theta_old = parameters_to_vector(actor).detach()

    def objective(beta: float):
        """(-L^KL, mean(r A), beta mean KL) at the actor's present parameters, by the script's kl_penalty_loss."""
        new_params = agent.dist_params(batch["obs"])
        new_logprob, _ = agent.logprob_entropy(new_params, batch["actions"])
        kl = agent.kl(batch["old_params"], new_params)  # exact KL(pi_old || pi_theta) per state
        return ppo_penalty.kl_penalty_loss(new_logprob, batch["old_logprob"], batch["advantages"], kl, beta)

    _, surrogate, _ = objective(0.0)  # at theta_old
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(surrogate, actor)])
    d = gradient / gradient.norm()
    curves = {str(beta): [] for beta in betas}
    kls = []
    with torch.no_grad():
        for t in t_grid:
            vector_to_parameters(theta_old + float(t) * d, actor)
            for beta in betas:
                curves[str(beta)].append(-objective(beta)[0].item())  # L^KL = -loss
            kls.append(objective(1.0)[2].item())  # at beta 1 the penalty is the mean KL itself
    vector_to_parameters(theta_old, actor)
    maxima = {}
    for beta, curve in curves.items():
        best = int(np.argmax(curve))
        maxima[beta] = {"t": float(t_grid[best]), "L": curve[best], "kl": kls[best]}
    return {"gradient_norm": gradient.norm().item(), "t": t_grid.tolist(), "kl": kls,
            "L": curves, "maximiser": maxima}


def schedule(path: Path) -> dict:
    """The adaptive beta and the measured KL of a ppo_penalty.py run, and how often the KL sat in the band, over
    the whole run and over its iterations with the learning rate still >= 10% of its start (it anneals to 0: an
    update at lr ~ 0 cannot move the policy, so its KL falls below the band whatever beta does)."""
    run = load(path)
    learning_rate = np.array([row["learning_rate"] for row in read_metrics(path)])
    kl_target = float(run["kl_target"][0])
    low, high = kl_target / 1.5, kl_target * 1.5
    beta, kl = run["beta"], run["kl_exact"]
    in_band = (kl >= low) & (kl <= high)
    early = learning_rate >= 0.1 * learning_rate[0]
    return {"file": str(path.relative_to(ROOT)), "kl_target": kl_target, "iteration": run["iteration"].tolist(),
            "beta": beta.tolist(), "kl_exact": kl.tolist(), "learning_rate": learning_rate.tolist(),
            "beta_min": float(beta.min()), "beta_max": float(beta.max()),
            "orders_of_magnitude": float(np.log10(beta.max() / beta.min())),
            "share_in_band": float(in_band.mean()), "share_above": float(np.mean(kl > high)),
            "share_below": float(np.mean(kl < low)),
            "lr_10pct_iteration": int(run["iteration"][~early][0]),
            "early_beta_min": float(beta[early].min()), "early_beta_max": float(beta[early].max()),
            "early_share_in_band": float(in_band[early].mean())}


def compute(total_timesteps: int = TOTAL_TIMESTEPS, batch_steps: int = BATCH_STEPS) -> dict:
    agent, args = train_pi_old(total_timesteps)
    batch = collect_batch(agent, batch_steps, args["gamma"], args["gae_lambda"])
    # dense near t = 0, where the large-beta maxima sit; a little of the other side too
    t_grid = np.concatenate([-np.geomspace(0.2, 1e-4, 40), [0.0], np.geomspace(1e-4, 2.0, 300)])
    return {"env_id": ENV_ID, "seed": SEED, "pi_old_total_timesteps": total_timesteps, "batch_steps": batch_steps,
            "batch_episodes": batch["episodes"], "betas": list(BETAS),
            "line": line_objectives(agent, batch, t_grid, BETAS), "schedule": schedule(HALFCHEETAH_RUN)}


def report(data: dict) -> str:
    lines = [f"pi_old: ppo_penalty.py, {data['env_id']}, {data['pi_old_total_timesteps']} steps, seed {data['seed']}; "
             f"batch {data['batch_steps']} steps, {data['batch_episodes']} episodes ended; "
             f"|grad mean(rA)| {data['line']['gradient_norm']:.4g}"]
    for beta, best in data["line"]["maximiser"].items():
        lines.append(f"beta {float(beta):>4g}: t* {best['t']:.4g}, L^KL(t*) {best['L']:.4g}, KL(t*) {best['kl']:.4g}")
    s = data["schedule"]
    lines.append(f"{s['file']}: beta from {s['beta_min']:.4g} to {s['beta_max']:.4g} "
                 f"({s['orders_of_magnitude']:.2f} orders of magnitude); KL in [{s['kl_target']:g}/1.5, "
                 f"1.5 x {s['kl_target']:g}] on {100 * s['share_in_band']:.1f}% of {len(s['iteration'])} iterations "
                 f"(above {100 * s['share_above']:.1f}%, below {100 * s['share_below']:.1f}%); before iteration "
                 f"{s['lr_10pct_iteration']} (lr >= 10% of its start): beta {s['early_beta_min']:g} to "
                 f"{s['early_beta_max']:g}, KL in the band on {100 * s['early_share_in_band']:.1f}%")
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    plt = pyplot()

    fig = plt.figure(figsize=(15, 6.5), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1])
    ax_line, ax_max = left.subplots(2, 1, height_ratios=[2, 1])
    ax_beta, ax_kl = right.subplots(2, 1, sharex=True)

    line = data["line"]
    t = np.array(line["t"])
    maxima = line["maximiser"]
    top = max(best["L"] for best in maxima.values())
    for k, beta in enumerate(line["L"]):
        best = maxima[beta]
        ax_line.plot(t, line["L"][beta], color=f"C{k}", label=f"beta {float(beta):g}: t* {best['t']:.3g}, "
                     f"KL(t*) {best['kl']:.3g}")
        ax_line.plot(best["t"], best["L"], "o", color=f"C{k}", mec="k")
    ax_line.axvline(0, color="grey", lw=0.8)
    ax_line.set_ylim(-0.6 * top, 1.25 * top)
    ax_line.set_xlim(t.min(), 1.6)
    ax_line.set_xlabel("t (theta = theta_old + t d, d the unit policy gradient; t = 0 is theta_old)")
    ax_line.set_ylabel("L^KL = mean(r A) - beta mean KL")
    ax_line.legend(fontsize=8)
    ax_line.set_title(f"{data['env_id']}: one batch of {data['batch_steps']} steps of ppo_penalty.py's pi_old "
                      f"({data['pi_old_total_timesteps'] // 1000}k steps, seed {data['seed']})", fontsize=10)
    positive = [(float(b), m) for b, m in maxima.items() if float(b) > 0]
    betas = [b for b, _ in positive]
    ax_max.loglog(betas, [m["t"] for _, m in positive], "o-", label="maximiser t*")
    ax_max.loglog(betas, [m["kl"] for _, m in positive], "s-", label="mean KL at t*")
    ax_max.axhline(data["schedule"]["kl_target"], color="tab:green", ls="--", lw=1, label="kl_target 0.01")
    ax_max.set_xlabel(f"beta (beta 0: t* {maxima['0.0']['t']:.3g}, KL {maxima['0.0']['kl']:.3g})")
    ax_max.set_ylabel("t* and KL(t*)")
    ax_max.legend(fontsize=8)
    ax_max.grid(alpha=0.3, which="both")

    s = data["schedule"]
    low, high = s["kl_target"] / 1.5, s["kl_target"] * 1.5
    ax_beta.plot(s["iteration"], s["beta"], drawstyle="steps-post", label="beta")
    ax_beta.set_yscale("log")
    ax_beta.set_ylabel("beta (log)")
    ax_lr = ax_beta.twinx()
    ax_lr.plot(s["iteration"], s["learning_rate"], color="grey", ls="--", lw=1)
    ax_lr.set_ylabel("learning rate (dashed, annealed to 0)", color="grey")
    ax_beta.set_title(f"{s['file']}\nbeta {s['beta_min']:.3g} to {s['beta_max']:.3g} over the run; "
                      f"{s['early_beta_min']:g} to {s['early_beta_max']:g} before iteration {s['lr_10pct_iteration']} "
                      "(dotted: lr < 10% of its start after it)", fontsize=10)
    for ax in (ax_beta, ax_kl):
        ax.axvline(s["lr_10pct_iteration"], color="k", ls=":", lw=1)
    ax_kl.axhspan(low, high, color="tab:green", alpha=0.15, label=f"band [{low:.3g}, {high:.3g}]: beta unchanged")
    ax_kl.axhline(s["kl_target"], color="tab:green", ls="--", lw=1, label=f"kl_target {s['kl_target']:g}")
    ax_kl.plot(s["iteration"], s["kl_exact"], lw=0.8, label="exact KL after the update")
    ax_kl.set_yscale("log")
    ax_kl.set_xlabel("iteration")
    ax_kl.set_ylabel("KL(pi_old || pi_new)")
    ax_kl.set_title(f"KL inside the band on {100 * s['share_in_band']:.0f}% of iterations "
                    f"({100 * s['early_share_in_band']:.0f}% before the dotted line)", fontsize=10)
    for ax in (ax_line, ax_beta, ax_kl):
        ax.grid(alpha=0.3, which="both")
    ax_kl.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks/results/article_figures/penalty_beta.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/figures/penalty_beta.png")
    parser.add_argument("--plot-only", action="store_true", help="compute nothing: draw from --data")
    args = parser.parse_args()
    if args.plot_only:
        if not args.data.is_file():
            raise SystemExit(f"error: no {args.data}; run without --plot-only first")
        data = json.loads(args.data.read_text())
    else:
        data = rounded_tree(compute(), 6)  # a small JSON, the same figure
        args.data.parent.mkdir(parents=True, exist_ok=True)
        args.data.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(report(data))
    plot(data, args.out)


if __name__ == "__main__":
    main()
