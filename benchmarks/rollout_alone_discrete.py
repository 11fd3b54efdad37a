"""ppo_discrete.py's rollout alone (128 steps of 4 CartPole-v1 envs, actor and sampling included, no update),
against the hand-rolled rollout of the ceiling experiment (benchmarks/speed_ceiling_discrete.py), to see where
the last ~3 ms per iteration between them go. Median milliseconds per rollout of 40 (5 warm-up rollouts left out):

    python benchmarks/rollout_alone_discrete.py      # ~20 s; run with nothing else on the machine

Variants: the committed loop with SameStepVectorEnv over gym.make envs; the same with disable_env_checker=True;
the same over TimeLimit(unwrapped env) only (so gymnasium's wrappers' share shows); the hand-rolled loop (no
vector env, unwrapped envs, its own time limit; a measurement, not code to copy). The loop below is a copy of
the one in ppo_discrete.main (as at commit 7346179, the actor's layers looked up once per rollout); keep them in
step when timing a change. The figures SPEED.md quotes were taken with this file as at c7a726a, when the loop
still unpacked the actor every step (`git show c7a726a:benchmarks/rollout_alone_discrete.py`).

It reads the code of ppo_discrete.py / ppo_continuous.py up to df10cae (tanh_mlp, the noise drawn once per
rollout, the hand-written clip_grad_norm), which issue 22 removed: run it in a checkout of df10cae.
"""
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppo_discrete as P  # noqa: E402

torch.set_num_threads(1)
T, N, obs_dim, nA = 128, 4, 4, 2
agent = P.Agent(obs_dim, nA)


def ours(make):
    """The committed rollout loop (ppo_discrete.main), over SameStepVectorEnv of envs from make()."""
    envs = P.SameStepVectorEnv([make for _ in range(N)])
    obs = torch.zeros((T, N, obs_dim)); actions = torch.zeros((T, N), dtype=torch.long)
    rewards = torch.zeros((T, N)); dones = torch.zeros((T, N)); truncated_at = torch.zeros((T, N)); final_obs = torch.zeros((T, N, obs_dim))
    obs_host, actions_host = np.zeros((T, N, obs_dim), dtype=np.float32), np.zeros((T, N), dtype=np.int64)
    rewards_host, dones_host = np.zeros((T, N), dtype=np.float32), np.zeros((T, N), dtype=np.float32)
    truncated_at_host, final_obs_host = np.zeros((T, N), dtype=np.float32), np.zeros((T, N, obs_dim), dtype=np.float32)
    ended_return, ended_length = np.full((T, N), np.nan), np.zeros((T, N), dtype=np.int64)
    state = {}
    state["next_obs_np"], _ = envs.reset(seed=1)
    def rollout():
        next_obs_np = state["next_obs_np"]
        next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32)
        gumbel = -torch.empty((T, N, nA)).exponential_().log()
        actor_layers = agent.actor_layers()
        with torch.inference_mode():
            for step in range(T):
                obs_host[step] = next_obs_np
                logits = P.tanh_mlp(next_obs, actor_layers)
                action = P.sample_categorical(logits, gumbel[step]).cpu().numpy()
                actions_host[step] = action
                next_obs_np, reward, terminated, truncated, info = envs.step(action)
                rewards_host[step] = reward
                dones_host[step] = terminated | truncated
                if "_episode" in info:
                    time_limit = truncated & ~terminated
                    truncated_at_host[step] = time_limit
                    if time_limit.any():
                        final_obs_host[step, time_limit] = np.stack(info["final_obs"][time_limit])
                    ended = info["_episode"]
                    ended_return[step, ended] = info["episode"]["r"][ended]
                    ended_length[step, ended] = info["episode"]["l"][ended]
                next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32)
        for buffer, host in ((obs, obs_host), (actions, actions_host), (rewards, rewards_host), (dones, dones_host), (truncated_at, truncated_at_host), (final_obs, final_obs_host)):
            buffer.copy_(torch.from_numpy(host))
        state["next_obs_np"] = next_obs_np
    return rollout


def timeit(f, n=40):
    """Median ms of n calls after 5 warm-up calls."""
    ts = []
    for i in range(n + 5):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return np.median(ts[5:]) * 1e3


def handrolled():
    """The ceiling experiment's rollout: no vector env, unwrapped envs, its own time limit."""
    cores = [gym.make("CartPole-v1").unwrapped for _ in range(N)]
    max_steps = 500
    next_np = np.stack([env.reset(seed=1 + j)[0] for j, env in enumerate(cores)]).astype(np.float32)
    elapsed_steps = [0] * N; ep_ret, ep_len = [0.0] * N, [0] * N
    rew_np, done_np = np.zeros((T, N), np.float32), np.zeros((T, N), np.float32)
    tl_np, final_np = np.zeros((T, N), np.float32), np.zeros((T, N, obs_dim), np.float32)
    obs = torch.zeros((T, N, obs_dim)); actions = torch.zeros((T, N), dtype=torch.long)
    rewards = torch.zeros((T, N)); dones = torch.zeros((T, N)); truncated_at = torch.zeros((T, N)); final_obs = torch.zeros((T, N, obs_dim))
    ended_return, ended_length = np.full((T, N), np.nan), np.zeros((T, N), dtype=np.int64)
    next_obs = torch.from_numpy(next_np)
    def rollout():
        gumbel = -torch.empty((T, N, nA)).exponential_().log()
        tl_np.fill(0.0)
        (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in agent.actor if isinstance(m, torch.nn.Linear)]
        with torch.inference_mode():
            for step in range(T):
                obs[step] = next_obs
                logits = F.linear(torch.tanh(F.linear(torch.tanh(F.linear(next_obs, w1, b1)), w2, b2)), w3, b3)
                action = (logits + gumbel[step]).argmax(-1)
                actions[step] = action
                for j, a in enumerate(action.tolist()):
                    env = cores[j]
                    o, r, term, _, _ = env.step(a)
                    elapsed_steps[j] += 1; ep_ret[j] += r; ep_len[j] += 1
                    rew_np[step, j] = r
                    trunc = elapsed_steps[j] >= max_steps
                    if term or trunc:
                        done_np[step, j] = 1.0
                        if not term:
                            tl_np[step, j] = 1.0; final_np[step, j] = o
                        ended_return[step, j], ended_length[step, j] = ep_ret[j], ep_len[j]
                        ep_ret[j], ep_len[j], elapsed_steps[j] = 0.0, 0, 0
                        o, _ = env.reset()
                    else:
                        done_np[step, j] = 0.0
                    next_np[j] = o
            rewards.copy_(torch.from_numpy(rew_np)); dones.copy_(torch.from_numpy(done_np))
            truncated_at.copy_(torch.from_numpy(tl_np)); final_obs.copy_(torch.from_numpy(final_np))
    return rollout


def main() -> None:
    variants = {
        "committed loop, gym.make envs": ours(lambda: gym.make("CartPole-v1")),
        "committed loop, disable_env_checker": ours(lambda: gym.make("CartPole-v1", disable_env_checker=True)),
        "committed loop, TimeLimit(unwrapped)": ours(lambda: gym.wrappers.TimeLimit(gym.make("CartPole-v1").unwrapped, 500)),
        "hand-rolled (ceiling experiment)": handrolled(),
    }
    for _ in range(2):
        for name, rollout in variants.items():
            print(f"{name:40s} {timeit(rollout):.2f} ms per rollout")


if __name__ == "__main__":
    main()
