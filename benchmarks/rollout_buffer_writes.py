"""What two rollout changes left untried in SPEED.md would save in ppo_discrete.py: the per-step writes of
rewards and dones into the torch buffer against staging them in numpy arrays copied once per rollout, and
SyncVectorEnv(copy=True) (the default: the batched observation is deep-copied every step) against copy=False.

    python benchmarks/rollout_buffer_writes.py     # ~30 s; run with nothing else on the machine

(Written before 285868d, which took the staging and replaced SyncVectorEnv; kept for the figures it gave.)
It runs ppo_discrete.py's rollout loop as it was up to d24572f (actor, Gumbel-max sampling, env step, buffer writes; no episode
bookkeeping) on CPU for 128 steps of 4 CartPole-v1 envs, the four variants in turn, 40 rollouts each, and
prints the median milliseconds per rollout (the first 5 rollouts of each left out).

It reads the code of ppo_discrete.py / ppo_continuous.py up to df10cae (tanh_mlp, the noise drawn once per
rollout, the hand-written clip_grad_norm), which issue 22 removed: run it in a checkout of df10cae.
"""

import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppo_discrete as P  # noqa: E402

torch.set_num_threads(1)
T, N, OBS_DIM, N_ACTIONS = 128, 4, 4, 2


def make_envs(copy: bool) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * N, copy=copy,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


agent = P.Agent(OBS_DIM, N_ACTIONS)
obs = torch.zeros((T, N, OBS_DIM))
actions = torch.zeros((T, N), dtype=torch.long)
rewards, dones = torch.zeros((T, N)), torch.zeros((T, N))
staged_rewards, staged_dones = np.zeros((T, N), dtype=np.float32), np.zeros((T, N), dtype=np.float32)


def rollout(envs: gym.vector.SyncVectorEnv, next_obs: torch.Tensor, staged: bool) -> torch.Tensor:
    gumbel = -torch.empty((T, N, N_ACTIONS)).exponential_().log()
    with torch.inference_mode():
        for step in range(T):
            obs[step] = next_obs
            action = P.sample_categorical(agent.actor(next_obs), gumbel[step])
            actions[step] = action
            next_obs_np, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
            if staged:
                staged_rewards[step], staged_dones[step] = reward, terminated | truncated
            else:
                rewards[step] = torch.from_numpy(reward)
                dones[step] = torch.from_numpy(terminated | truncated)
            # with copy=False this aliases the env's own array, which the next step overwrites; it is copied
            # into obs[step] before that happens
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32)
        if staged:
            rewards.copy_(torch.from_numpy(staged_rewards))
            dones.copy_(torch.from_numpy(staged_dones))
    return next_obs


def main() -> None:
    variants = {  # name: (SyncVectorEnv copy, staged)
        "per-step torch writes, copy=True (the loop up to d24572f)": (True, False),
        "numpy staging, copy=True": (True, True),
        "per-step torch writes, copy=False": (False, False),
        "numpy staging, copy=False": (False, True),
    }
    envs = {name: make_envs(copy) for name, (copy, _) in variants.items()}
    next_obs = {name: torch.as_tensor(env.reset(seed=1)[0]) for name, env in envs.items()}
    times = {name: [] for name in variants}
    for _ in range(40):
        for name, (_, staged) in variants.items():
            start = time.perf_counter()
            next_obs[name] = rollout(envs[name], next_obs[name], staged)
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        ms = np.array(t[5:]) * 1e3
        print(f"{name:50s} median {np.median(ms):6.2f} ms per {T}-step rollout (min {ms.min():.2f})")


if __name__ == "__main__":
    main()
