"""Is an env the same in two venvs? Record a fixed-action trace in each, then compare the traces.

    <venv A>/bin/python benchmarks/env_trace.py Hopper-v4 --out /tmp/a.npz   # e.g. cleanrl's: gymnasium 0.29, mujoco 2.3.7
    <venv B>/bin/python benchmarks/env_trace.py Hopper-v4 --out /tmp/b.npz   # e.g. ours:      gymnasium 1.4,  mujoco 4.0
    python benchmarks/env_trace.py --compare /tmp/a.npz /tmp/b.npz

The trace: reset(seed=3), then --steps steps of the same pseudo-random actions (numpy seed 0, scaled by 0.3 so
that Hopper survives a few hundred steps), resetting whenever an episode ends. Used to tell whether a difference in
returns between two venvs can come from the simulator (benchmarks/RESULTS.md, Hopper-v4 on MuJoCo 2.3.7).
Runs under gymnasium 0.29 too.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def record(env_id: str, steps: int, out: str) -> None:
    import gymnasium as gym
    import mujoco

    warnings.filterwarnings("ignore")  # v4 deprecation notices
    env = gym.make(env_id)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    observations, rewards, episode_ends = [obs], [], []
    for t in range(steps):
        obs, reward, terminated, truncated, _ = env.step(0.3 * rng.uniform(-1, 1, env.action_space.shape))
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            episode_ends.append(t)
            obs, _ = env.reset()
            observations.append(obs)
    versions = f"gymnasium {gym.__version__}, mujoco {mujoco.__version__}"
    np.savez(out, obs=np.array(observations), rewards=np.array(rewards), episode_ends=np.array(episode_ends),
             versions=versions)
    print(f"{env_id} ({versions}): {steps} steps, {len(episode_ends)} episode ends -> {out}")


def compare(a_path: str, b_path: str) -> None:
    a, b = np.load(a_path), np.load(b_path)
    # Observations are compared row by row; once the episode ends differ, the rows stop lining up, which
    # already says the two envs are not the same.
    rows = min(len(a["obs"]), len(b["obs"]))
    for steps in (10, 100, 1000, rows - 1):
        n = min(steps + 1, rows)
        print(f"first {n:5d} observations: max |difference| {np.abs(a['obs'][:n] - b['obs'][:n]).max():.3g}")
    steps = min(len(a["rewards"]), len(b["rewards"]))
    print(f"rewards, all {steps} steps: max |difference| {np.abs(a['rewards'][:steps] - b['rewards'][:steps]).max():.3g}")
    same_ends = np.array_equal(a["episode_ends"], b["episode_ends"])
    print(f"{a['versions']} vs {b['versions']}: episode ends {'identical' if same_ends else 'differ'} "
          f"(first five: {a['episode_ends'][:5]} vs {b['episode_ends'][:5]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("env_id", nargs="?", default="Hopper-v4")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=None, help="npz file to write the trace to")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two trace files to compare")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.out:
        record(args.env_id, args.steps, args.out)
    else:
        parser.error("give --out (record) or --compare A B")


if __name__ == "__main__":
    main()
