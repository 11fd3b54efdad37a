"""The article's surrogate-landscape figure ("Surrogate landscape: why clip wins in practice": the true return
J peaks and drops along a 1-D slice, the unclipped surrogate keeps climbing, the clipped one stops), from a real
ppo_discrete.py agent on CartPole-v1.

    python benchmarks/figure_surrogate.py               # train pi_old, measure both slices, store the JSON, draw
    python benchmarks/figure_surrogate.py --plot-only   # draw from the stored JSON

What is measured:
    pi_old   ppo_discrete.main(--total-timesteps 30720 --no-anneal-lr --seed 1 --save-model): a partly trained
             agent (sampled return ~275 of CartPole's 500, so an update can still help). Without annealing, the
             next update runs at the learning rate the run trained with.
    batch    one rollout of pi_old with the run's own settings (4 envs x 128 steps = 512 samples), advantages by
             compute_gae with the run's critic (a time limit bootstrapped, as main() does).
    d        the change of the actor's parameters made by one PPO update on that batch, the update main() runs
             (4 epochs x 4 minibatches of Adam on -L^CLIP - c_ent H + c_vf L^V, grad-norm clip 0.5, from the
             checkpoint's Adam state). Two slices: at the run's learning rate 2.5e-4, and the same update at 10x
             (2.5e-3), a longer step whose J rises measurably before it falls. t = 1: where the update stepped.
    along    theta(t) = theta_old + t d, on 401 values of t: L^IS = mean(r A) (ppo_clip_loss with a clip no ratio
             reaches), L^CLIP = mean(min(r A, clip(r, 1 - eps, 1 + eps) A)) (ppo_clip_loss, eps 0.2), both with
             the advantages normalised over the batch, and the exact mean KL(pi_old || pi_t) over the batch's
             states (trpo.categorical_kl). On ~20 values of t: J(t), the mean undiscounted return of pi_t
             (sampled actions, not greedy) over 4000 episodes of gymnasium's numpy-vectorised CartPole, with a
             95% interval mean +- 1.96 std / sqrt(n). Every t uses the same start states and noise (common random
             numbers), so J(t) - J(0) is also given with a paired interval.

Data: benchmarks/results/article_figures/surrogate_vs_true.json (~40 KB); figure:
benchmarks/figures/surrogate_vs_true.png; the table printed has every number of the caption. Needs matplotlib to
draw (optional dependency: pip install matplotlib).
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import ppo_discrete  # noqa: E402
import trpo  # noqa: E402
from plot import pyplot  # noqa: E402

OUT_JSON = ROOT / "benchmarks" / "results" / "article_figures" / "surrogate_vs_true.json"
OUT_PNG = ROOT / "benchmarks" / "figures" / "surrogate_vs_true.png"
NO_CLIP = 1e9  # a clip_coef no ratio reaches: ppo_clip_loss is then -L^IS
PI_OLD_TIMESTEPS, SEED = 30720, 1  # 60 iterations: a sampled return well below 500 (measured: ~275)
EPISODES = 4000  # per t: a 95% interval of about +-3 on J
POINTS = 401  # t values of the surrogate and KL curves (cheap: one forward pass over the batch each)


def train_pi_old(total_timesteps: int, seed: int) -> dict:
    """A checkpoint of ppo_discrete.py trained for total_timesteps, in a temporary folder (no runs/ left)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            ppo_discrete.main(["--total-timesteps", str(total_timesteps), "--no-anneal-lr", "--seed", str(seed),
                               "--save-model"])
            (path,) = glob.glob("runs/*/ppo_discrete.pt")
            return ppo_discrete.load_checkpoint(path)
        finally:
            os.chdir(here)


def collect_batch(agent: ppo_discrete.Agent, args: ppo_discrete.Args, seed: int) -> dict[str, torch.Tensor]:
    """One rollout of pi_old (num_envs x num_steps), its log-probs, values and GAE advantages, as main() computes
    them ("A complete PPO implementation"); the advantages are normalised where they are used."""
    envs = ppo_discrete.make_envs(args, None)
    T, N = args.num_steps, args.num_envs
    obs = torch.zeros((T, N, envs.single_observation_space.shape[0]))
    actions, rewards, dones = torch.zeros((T, N), dtype=torch.long), torch.zeros((T, N)), torch.zeros((T, N))
    torch.manual_seed(seed)
    next_obs = torch.as_tensor(envs.reset(seed=seed)[0])
    with torch.no_grad():
        for step in range(T):
            obs[step], actions[step] = next_obs, agent.sample(next_obs)
            next_obs_np, reward, terminated, truncated, info = envs.step(actions[step].numpy())
            rewards[step], dones[step] = torch.as_tensor(reward), torch.as_tensor(terminated | truncated)
            for i in np.flatnonzero(truncated & ~terminated):  # a time limit is not a terminal state
                rewards[step, i] += args.gamma * agent.value(torch.as_tensor(info["final_obs"][i]))
            next_obs = torch.as_tensor(next_obs_np)
        logits, values = agent(obs.reshape(T * N, -1))
        advantages, returns = ppo_discrete.compute_gae(rewards, values.reshape(T, N), dones, agent.value(next_obs),
                                                       args.gamma, args.gae_lambda)
    envs.close()
    b_actions = actions.reshape(-1)
    return {"obs": obs.reshape(T * N, -1), "actions": b_actions, "logits": logits, "values": values,
            "logprobs": ppo_discrete.categorical_logprob_entropy(logits, b_actions)[0],
            "advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}


def ppo_update(agent: ppo_discrete.Agent, optimizer_state: dict, batch: dict, args: ppo_discrete.Args,
               seed: int) -> None:
    """main()'s update on one batch, in place: update_epochs passes of shuffled minibatches, Adam on
    -L^CLIP - c_ent H + c_vf L^V, grad norm clipped, advantages normalised per minibatch."""
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    optimizer.load_state_dict(copy.deepcopy(optimizer_state))  # Adam updates its moments in place: keep pi_old's
    optimizer.param_groups[0]["lr"] = args.learning_rate  # the saved state carries the run's; a slice may scale it
    batch_size = len(batch["actions"])
    torch.manual_seed(seed)
    for _ in range(args.update_epochs):
        for mb in torch.randperm(batch_size).split(batch_size // args.num_minibatches):
            logits, new_values = agent(batch["obs"][mb])
            new_logprob, entropy = ppo_discrete.categorical_logprob_entropy(logits, batch["actions"][mb])
            advantages = ppo_discrete.normalize_advantages(batch["advantages"][mb])
            pg_loss, _ = ppo_discrete.ppo_clip_loss(new_logprob, batch["logprobs"][mb], advantages, args.clip_coef)
            v_loss = ppo_discrete.value_loss(new_values, batch["values"][mb], batch["returns"][mb],
                                             args.clip_coef if args.clip_vloss else None)
            loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()


def episode_returns(actor: nn.Module, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of the first episode of each of `episodes` envs of gymnasium's numpy-vectorised
    CartPole (the same dynamics as gym.make, all envs in one array), actions sampled from the policy. The same
    seed at every t: the same start states and the same stream of Gumbel noise (common random numbers)."""
    envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="vector_entry_point")
    obs, _ = envs.reset(seed=seed)
    returns, alive = np.zeros(episodes), np.ones(episodes, dtype=bool)
    torch.manual_seed(seed)
    while alive.any():
        with torch.no_grad():
            actions = ppo_discrete.sample_categorical(actor(torch.as_tensor(obs))).numpy()
        obs, reward, terminated, truncated, _ = envs.step(actions)
        returns += reward * alive  # an env that ended goes on with a new episode: not counted
        alive &= ~(terminated | truncated)
    envs.close()
    return returns


def measure_slice(actor: nn.Module, theta_old: torch.Tensor, d: torch.Tensor, batch: dict, clip_coef: float,
                  env_id: str, ts: np.ndarray, ts_return: np.ndarray, episodes: int, seed: int) -> dict:
    """Along theta_old + t d: L^IS, L^CLIP, the clip fraction and the exact mean KL(pi_old || pi_t) on the batch at
    every t of ts; at every t of ts_return, J(t) (and J(t) - J(0), episode by episode) with 95% intervals."""
    advantages = ppo_discrete.normalize_advantages(batch["advantages"])  # over the whole batch
    curves = {"L_IS": [], "L_CLIP": [], "clipfrac": [], "kl": []}
    with torch.no_grad():
        for t in ts:
            trpo.set_flat_params(actor, theta_old + float(t) * d)
            logits = actor(batch["obs"])
            logprob = ppo_discrete.categorical_logprob_entropy(logits, batch["actions"])[0]
            neg_is, _ = ppo_discrete.ppo_clip_loss(logprob, batch["logprobs"], advantages, NO_CLIP)
            neg_clip, clipfrac = ppo_discrete.ppo_clip_loss(logprob, batch["logprobs"], advantages, clip_coef)
            for key, value in (("L_IS", -neg_is), ("L_CLIP", -neg_clip), ("clipfrac", clipfrac),
                               ("kl", trpo.categorical_kl(batch["logits"], logits).mean())):
                curves[key].append(value.item())
    returns = []
    for t in ts_return:
        trpo.set_flat_params(actor, theta_old + float(t) * d)
        returns.append(episode_returns(actor, env_id, episodes, seed))
    trpo.set_flat_params(actor, theta_old)
    returns = np.array(returns)  # [t, episode]
    gain = returns - returns[list(ts_return).index(0.0)]

    def ci95(x):
        return 1.96 * x.std(axis=1, ddof=1) / np.sqrt(episodes)

    return {"t": ts, **curves, "t_return": ts_return, "J": returns.mean(1), "J_ci95": ci95(returns),
            "J_gain": gain.mean(1), "J_gain_ci95": ci95(gain)}


# The two slices: d from the update ppo_discrete.py makes, and from the same update at 10x its learning rate
# (a longer step whose J rises measurably before it falls). t = 1 is where each update stepped; ts_return is
# denser where J turns.
SLICES = [
    {"name": "PPO update (lr 2.5e-4)", "lr_factor": 1.0, "t_range": (-4.0, 40.0),
     "ts_return": [-4, -3, -2, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 28, 32, 36, 40]},
    {"name": "same update at 10x lr (2.5e-3)", "lr_factor": 10.0, "t_range": (-1.0, 12.0),
     "ts_return": [-1, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12]},
]


def compute(total_timesteps: int, seed: int, episodes: int, points: int, slices: list[dict] = SLICES) -> dict:
    """Train pi_old, take one batch, and measure every slice. Seeds: pi_old `seed`, batch seed + 1000, the
    update's minibatch order seed + 2000, the J episodes seed + 3000 (the same at every t of every slice)."""
    checkpoint = train_pi_old(total_timesteps, seed)
    args = ppo_discrete.Args(**checkpoint["args"])
    agent = ppo_discrete.Agent(*ppo_discrete.check_env(args.env_id))
    agent.load_state_dict(checkpoint["model"])
    batch = collect_batch(agent, args, seed + 1000)
    theta_old = trpo.flat_params(agent.actor)
    data = {"env_id": args.env_id, "seed": seed, "pi_old_total_timesteps": total_timesteps,
            "pi_old_train_return_100": float(np.mean(checkpoint["last_100"])), "batch_size": len(batch["actions"]),
            "clip_coef": args.clip_coef, "episodes": episodes, "slices": []}
    for spec in slices:
        lr = args.learning_rate * spec["lr_factor"]
        ppo_update(agent, checkpoint["optimizer"], batch, replace(args, learning_rate=lr), seed + 2000)
        d = trpo.flat_params(agent.actor) - theta_old
        ts = np.union1d(np.linspace(*spec["t_range"], points), spec["ts_return"])
        measured = measure_slice(agent.actor, theta_old, d, batch, args.clip_coef, args.env_id, ts,
                                 np.array(spec["ts_return"], dtype=float), episodes, seed + 3000)
        agent.load_state_dict(checkpoint["model"])  # the next slice starts from pi_old again
        data["slices"].append({"name": spec["name"], "learning_rate": lr, "d_norm": d.norm().item(),
                               **{k: [float(f"{x:.5g}") for x in v] for k, v in measured.items()}})
    return data


def trust_region(s: dict, kl_max: float) -> tuple[float, float]:
    """The interval of t around 0 where the mean KL stays <= kl_max (on the fine grid)."""
    t, kl = np.array(s["t"]), np.array(s["kl"])
    zero = int(np.argmin(np.abs(t)))
    lo = hi = zero
    while lo > 0 and kl[lo - 1] <= kl_max:
        lo -= 1
    while hi < len(t) - 1 and kl[hi + 1] <= kl_max:
        hi += 1
    return float(t[lo]), float(t[hi])


def summary(data: dict) -> str:
    """The numbers a caption needs: where J, L^IS and L^CLIP peak along each slice, and the KL there."""
    lines = [f"pi_old: {data['env_id']} after {data['pi_old_total_timesteps']} steps (seed {data['seed']}), "
             f"training return (last 100 episodes) {data['pi_old_train_return_100']:.1f}; batch "
             f"{data['batch_size']} samples; J over {data['episodes']} episodes per t"]
    for s in data["slices"]:
        t, kl = np.array(s["t"]), np.array(s["kl"])
        i0, peak = s["t_return"].index(0.0), int(np.argmax(s["J"]))
        at = {"J": s["t_return"][peak], "L_IS": t[np.argmax(s["L_IS"])], "L_CLIP": t[np.argmax(s["L_CLIP"])]}
        lines.append(f"\n{s['name']}: |d| = {s['d_norm']:.4f}; KL <= 0.01 for t in {trust_region(s, 0.01)}, "
                     f"<= 0.02 for t in {trust_region(s, 0.02)}")
        for name, at_t in at.items():
            lines.append(f"  {name} peaks at t = {at_t:g} (KL {kl[np.argmin(np.abs(t - at_t))]:.4f})")
        lines.append(f"  J(0) = {s['J'][i0]:.1f} +- {s['J_ci95'][i0]:.1f}; J at its peak - J(0) = "
                     f"{s['J_gain'][peak]:+.1f} +- {s['J_gain_ci95'][peak]:.1f} (paired)")
        lines.append("      t      KL    L^IS  L^CLIP  clipfrac       J (95%)    J - J(0) (95%)")
        for k, tr in enumerate(s["t_return"]):
            i = int(np.argmin(np.abs(t - tr)))
            lines.append(f"  {tr:5g}  {kl[i]:.4f} {s['L_IS'][i]:+.4f} {s['L_CLIP'][i]:+.4f}     "
                         f"{s['clipfrac'][i]:.2f}  {s['J'][k]:6.1f} +- {s['J_ci95'][k]:4.1f}  "
                         f"{s['J_gain'][k]:+6.1f} +- {s['J_gain_ci95'][k]:4.1f}")
    return "\n".join(lines)


def plot(data: dict, out_png: Path) -> None:
    plt = pyplot()

    n = len(data["slices"])
    fig, axes = plt.subplots(2, n, figsize=(6.8 * n, 6.8), sharex="col", squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2]})
    for column, s in enumerate(data["slices"]):
        ax, ax_kl = axes[0, column], axes[1, column]
        ax_j = ax.twinx()
        for kl_max, alpha in ((0.02, 0.12), (0.01, 0.18)):
            for a in (ax, ax_kl):
                a.axvspan(*trust_region(s, kl_max), color="tab:green", alpha=alpha, linewidth=0,
                          label=f"mean KL <= {kl_max}" if a is ax else None)
        ax.plot(s["t"], s["L_IS"], color="tab:orange", linestyle="--", label="L^IS = mean(r A) (unclipped)")
        ax.plot(s["t"], s["L_CLIP"], color="tab:blue", label=f"L^CLIP (eps {data['clip_coef']})")
        J, ci = np.array(s["J"]), np.array(s["J_ci95"])
        ax_j.fill_between(s["t_return"], J - ci, J + ci, color="black", alpha=0.15, linewidth=0)
        ax_j.plot(s["t_return"], J, color="black", marker=".", label=f"true return J (95%, {data['episodes']} ep.)")
        for a, t, y, color in ((ax, s["t"], s["L_IS"], "tab:orange"), (ax, s["t"], s["L_CLIP"], "tab:blue"),
                               (ax_j, s["t_return"], s["J"], "black")):
            a.plot(t[int(np.argmax(y))], max(y), marker="*", markersize=11, color=color, linestyle="none")
        # Both y axes put "no change from pi_old" (L = 0, J = J(0)) at the same height, so above the grey line
        # means "better than pi_old" on both scales; the scales themselves are independent.
        lo, hi = ax.get_ylim()
        j0 = J[s["t_return"].index(0.0)]
        scale = max(((J + ci).max() - j0) / hi, (j0 - (J - ci).min()) / -lo)  # return per surrogate unit
        ax_j.set_ylim(j0 + scale * lo, j0 + scale * hi)
        ax.axhline(0, color="grey", linewidth=0.8, label="pi_old: L = 0, J = J(0)")
        ax.set_ylabel("surrogate on the batch (normalised advantage units)")
        ax_j.set_ylabel("J(t): mean episodic return of pi_t (sampled actions)")
        ax_kl.plot(s["t"], np.where(np.array(s["kl"]) > 0, s["kl"], np.nan), color="tab:green")
        for kl_max in (0.01, 0.02):
            ax_kl.axhline(kl_max, color="tab:green", linestyle=":", linewidth=0.8)
        ax_kl.set_yscale("log")
        ax_kl.set_ylim(1e-4, None)  # KL -> 0 at t = 0: the log axis would spend most of its height there
        ax_kl.set_ylabel("mean KL(pi_old || pi_t)")
        ax_kl.set_xlabel("t   (theta = theta_old + t d; t = 1: where the update stepped)")
        for a in (ax, ax_kl):
            a.axvline(1, color="grey", linestyle=":", linewidth=0.8)
            a.grid(alpha=0.3)
        ax.set_title(f"d = {s['name']}", fontsize=10)
        handles = ax.get_legend_handles_labels()[0] + ax_j.get_legend_handles_labels()[0]
        handles.append(plt.Line2D([], [], marker="*", color="grey", linestyle="none", markersize=9, label="peak"))
        ax.legend(handles=handles, fontsize=7.5, loc="lower left")
    fig.suptitle(f"Surrogates vs the true return along one update direction: ppo_discrete.py, {data['env_id']}, "
                 f"pi_old after {data['pi_old_total_timesteps']} steps, batch of {data['batch_size']}", fontsize=11)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot-only", action="store_true", help=f"draw from {OUT_JSON.relative_to(ROOT)}")
    cli = parser.parse_args()
    if cli.plot_only:
        if not OUT_JSON.is_file():
            raise SystemExit(f"error: no {OUT_JSON}; run without --plot-only first")
        data = json.loads(OUT_JSON.read_text())
    else:
        torch.set_num_threads(1)
        data = compute(PI_OLD_TIMESTEPS, SEED, EPISODES, POINTS)
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(data) + "\n")
        print(f"wrote {OUT_JSON}")
    print(summary(data))
    plot(data, OUT_PNG)


if __name__ == "__main__":
    main()
