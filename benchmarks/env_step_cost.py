"""What one environment step costs, apart from everything else in a rollout.

    python benchmarks/env_step_cost.py                      # HalfCheetah-v4, this venv
    <other venv>/bin/python benchmarks/env_step_cost.py     # e.g. cleanrl's (gymnasium 0.29, mujoco 2.3.7)

Prints microseconds per step (best of 3 passes of --steps steps, random actions) for:
  env        gym.make(env_id).step: the physics plus gymnasium's default wrappers
  vector     the same env inside a one-env SyncVectorEnv (what ppo_continuous.py steps with its defaults)
  in a loop  the vector step timed alone while a policy-sized torch forward runs between steps, as in a
             rollout: the phase timers (phase_times.py) see this figure, not the first two
It tells whether a speed difference comes from the simulator (MuJoCo's version) or from what surrounds it.
Runs under gymnasium 0.29 too, so the same file measures cleanrl's venv.
"""

from __future__ import annotations

import argparse
import time
import warnings

import gymnasium as gym
import mujoco
import numpy as np
import torch


def best_of_3(step, actions: np.ndarray) -> float:
    """Microseconds per call of step(action), the fastest of three passes over `actions`."""
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        for action in actions:
            step(action)
        passes.append((time.perf_counter() - start) / len(actions) * 1e6)
    return min(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="HalfCheetah-v4")
    parser.add_argument("--steps", type=int, default=10000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # v4 deprecation notices
    torch.set_num_threads(1)

    env = gym.make(args.env_id)
    env.reset(seed=0)
    low, high = env.action_space.low, env.action_space.high
    actions = np.random.default_rng(0).uniform(low, high, size=(args.steps, 1, len(low))).astype(np.float32)

    def env_step(action):
        _, _, terminated, truncated, _ = env.step(action[0])
        if terminated or truncated:
            env.reset()

    # a one-env SyncVectorEnv resets by itself (its default autoreset mode; the mode does not change the cost)
    vector = gym.vector.SyncVectorEnv([lambda: gym.make(args.env_id)])

    # the rollout's torch work between two env steps: a 64-64 tanh MLP on one observation, noise, copy to numpy
    obs_dim = vector.single_observation_space.shape[0]
    actor = torch.nn.Sequential(torch.nn.Linear(obs_dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, len(low)))
    obs = vector.reset(seed=0)[0]
    in_loop = []  # seconds of each vector step, timed alone

    def policy_then_step(action):
        nonlocal obs
        with torch.inference_mode():
            mean = actor(torch.from_numpy(obs.astype(np.float32)))
            (mean + torch.randn_like(mean)).numpy()
        start = time.perf_counter()
        obs = vector.step(action)[0]
        in_loop.append(time.perf_counter() - start)

    env_us = best_of_3(env_step, actions)
    vector_us = best_of_3(vector.step, actions)
    best_of_3(policy_then_step, actions)
    loop_us = min(np.mean(in_loop[i * args.steps : (i + 1) * args.steps]) for i in range(3)) * 1e6
    print(f"{args.env_id}, gymnasium {gym.__version__}, mujoco {mujoco.__version__}, torch {torch.__version__}: "
          f"env {env_us:.1f} us, vector {vector_us:.1f} us, in a loop {loop_us:.1f} us per step")


if __name__ == "__main__":
    main()
