"""The speed ceiling experiment of benchmarks/SPEED.md (2026-11-25): how fast could ppo_discrete.py's loop get
if readability did not count? Writes throwaway variants of a ppo_discrete.py source into a folder, for
`speed.py --also`; they are measurements, not code to copy.

    git show d24572f:ppo_discrete.py > /tmp/ppo_discrete_d24572f.py
    python benchmarks/speed_ceiling_discrete.py /tmp/ppo_discrete_d24572f.py /tmp/ceiling
    python benchmarks/speed.py ppo_discrete.py --also /tmp/ceiling/ppo_discrete_leanvec_functional.py \
        --also /tmp/ceiling/ppo_discrete_handrolled.py --also /tmp/ceiling/ppo_discrete_handrolled_compiled.py \
        --cleanrl-script <cleanrl>/cleanrl/ppo.py --cleanrl-python <cleanrl venv>/bin/python --repeats 2

(run at d24572f, so "ours" there is the code before the rollout changes). The variants, each the same algorithm
with the same random streams (seed 1, 51,200 steps: the same final return as the source, 234.28):
- leanvec_functional: SyncVectorEnv replaced by a plain loop over the envs with SAME_STEP autoreset (the first
  draft of SameStepVectorEnv), the actor called as F.linear/tanh on its weights, rewards and dones collected in
  numpy arrays and copied once after the rollout;
- handrolled: no vector env at all: the rollout steps the unwrapped envs itself (its own time-limit counter
  instead of gymnasium's TimeLimit), keeps episode statistics in Python numbers, and stages everything in numpy;
- handrolled_compiled: the same, plus torch.compile of the minibatch loss (compiled at the first iteration).
Every replaced text must occur exactly once in the source; the script stops otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROLLOUT_START = "        with torch.inference_mode():\n            for step in range(T):"
ROLLOUT_END = "        # ---- pi_old's log-probs"

LEAN_VECTOR_ENV = '''    return SameStepVectorEnv([make_one(i) for i in range(args.num_envs)])


class SameStepVectorEnv(gym.vector.VectorEnv):
    def __init__(self, env_fns):
        self.envs = [fn() for fn in env_fns]
        self.num_envs = n = len(self.envs)
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, n)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, n)
        self.metadata = {**self.envs[0].metadata, "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self.render_mode = self.envs[0].render_mode
        self._obs = np.zeros((n, *self.single_observation_space.shape), self.single_observation_space.dtype)

    def reset(self, *, seed=None, options=None):
        for i, env in enumerate(self.envs):
            self._obs[i], _ = env.reset(seed=None if seed is None else seed + i, options=options)
        return self._obs.copy(), {}

    def step(self, actions):
        n = self.num_envs
        rewards = np.zeros(n)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        final_obs = None
        for i, (env, action) in enumerate(zip(self.envs, actions.tolist())):
            obs, rewards[i], terminated[i], truncated[i], _ = env.step(action)
            if terminated[i] or truncated[i]:
                if final_obs is None:
                    final_obs = np.full(n, None, dtype=object)
                final_obs[i] = obs
                obs, _ = env.reset()
            self._obs[i] = obs
        infos = {} if final_obs is None else {"final_obs": final_obs, "_final_obs": terminated | truncated}
        return self._obs.copy(), rewards, terminated, truncated, infos

    def close_extras(self, **kwargs):
        for env in self.envs:
            env.close()


'''

FUNCTIONAL_STAGED_ROLLOUT = '''        (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in agent.actor if isinstance(m, nn.Linear)]
        rew_np, done_np = np.zeros((T, N), np.float32), np.zeros((T, N), np.float32)
        with torch.inference_mode():
            for step in range(T):
                obs[step] = next_obs
                logits = F.linear(torch.tanh(F.linear(torch.tanh(F.linear(next_obs, w1, b1)), w2, b2)), w3, b3)
                action = (logits + gumbel[step]).argmax(-1)
                actions[step] = action
                next_obs_np, reward, terminated, truncated, info = envs.step(action.numpy())
                global_step += N
                done = terminated | truncated
                rew_np[step] = reward
                done_np[step] = done
                time_limit = truncated & ~terminated
                if time_limit.any():
                    mask = torch.as_tensor(time_limit, device=device)
                    truncated_at[step] = mask
                    final_obs[step, mask] = torch.as_tensor(
                        np.stack(info["final_obs"][time_limit]), dtype=torch.float32, device=device
                    )
                next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
                episode_return += reward
                episode_length += 1
                if done.any():
                    ended_return[step, done], ended_length[step, done] = episode_return[done], episode_length[done]
                    episode_return[done], episode_length[done] = 0.0, 0
            rewards.copy_(torch.from_numpy(rew_np))
            dones.copy_(torch.from_numpy(done_np))

'''

HANDROLLED_SETUP = '''    cores = [gym.make(args.env_id).unwrapped for _ in range(N)]
    max_steps = gym.spec(args.env_id).max_episode_steps
    next_np = np.stack([env.reset(seed=args.seed + j)[0] for j, env in enumerate(cores)]).astype(np.float32)
    elapsed_steps = [0] * N
    ep_ret, ep_len = [0.0] * N, [0] * N
    rew_np, done_np = np.zeros((T, N), np.float32), np.zeros((T, N), np.float32)
    tl_np, final_np = np.zeros((T, N), np.float32), np.zeros((T, N, obs_dim), np.float32)
    next_obs = torch.from_numpy(next_np)'''

HANDROLLED_ROLLOUT = '''        tl_np.fill(0.0)
        (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in agent.actor if isinstance(m, nn.Linear)]
        with torch.inference_mode():
            for step in range(T):
                obs[step] = next_obs
                logits = F.linear(torch.tanh(F.linear(torch.tanh(F.linear(next_obs, w1, b1)), w2, b2)), w3, b3)
                action = (logits + gumbel[step]).argmax(-1)
                actions[step] = action
                for j, a in enumerate(action.tolist()):
                    env = cores[j]
                    o, r, term, _, _ = env.step(a)
                    elapsed_steps[j] += 1
                    ep_ret[j] += r
                    ep_len[j] += 1
                    rew_np[step, j] = r
                    trunc = elapsed_steps[j] >= max_steps
                    if term or trunc:
                        done_np[step, j] = 1.0
                        if not term:
                            tl_np[step, j] = 1.0
                            final_np[step, j] = o
                        ended_return[step, j], ended_length[step, j] = ep_ret[j], ep_len[j]
                        ep_ret[j], ep_len[j], elapsed_steps[j] = 0.0, 0, 0
                        o, _ = env.reset()
                    else:
                        done_np[step, j] = 0.0
                    next_np[j] = o
                global_step += N
            rewards.copy_(torch.from_numpy(rew_np))
            dones.copy_(torch.from_numpy(done_np))
            truncated_at.copy_(torch.from_numpy(tl_np))
            final_obs.copy_(torch.from_numpy(final_np))

'''

COMPILED_LOSS = '''        # ---- update: update_epochs passes of num_minibatches minibatches ----
        if iteration == 1:
            def minibatch_loss(o, a, old_lp, adv, old_v, ret):
                logits_, new_values_ = agent(o)
                new_logprob_, entropy_ = categorical_logprob_entropy(logits_, a)
                adv = normalize_advantages(adv) if args.norm_adv else adv
                pg_loss_, clipfrac_ = ppo_clip_loss(new_logprob_, old_lp, adv, args.clip_coef)
                v_loss_ = value_loss(new_values_, old_v, ret, args.clip_coef if args.clip_vloss else None)
                ent_ = entropy_.mean()
                loss_ = pg_loss_ - args.ent_coef * ent_ + args.vf_coef * v_loss_
                return loss_, torch.stack([pg_loss_, v_loss_, ent_, clipfrac_, loss_]).detach()
            loss_fn = torch.compile(minibatch_loss, dynamic=False)'''

EAGER_MINIBATCH = '''                logits, new_values = agent(e_obs[mb])
                new_logprob, entropy = categorical_logprob_entropy(logits, e_actions[mb])
                if args.target_kl is not None:
                    # KL of the policy as it is now, on this minibatch: past the target, stop before stepping.
                    _, kl_now = approx_kl(new_logprob.detach(), e_logprobs[mb])
                    if kl_now.item() > args.target_kl:
                        stop = True
                        break
                mb_advantages = normalize_advantages(e_advantages[mb]) if args.norm_adv else e_advantages[mb]
                pg_loss, clipfrac = ppo_clip_loss(new_logprob, e_logprobs[mb], mb_advantages, args.clip_coef)
                v_loss = value_loss(new_values, e_values[mb], e_returns[mb], args.clip_coef if args.clip_vloss else None)
                entropy_mean = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_mean + args.vf_coef * v_loss
'''


def replace_once(source: str, old: str, new: str) -> str:
    if source.count(old) != 1:
        raise SystemExit(f"error: the source does not have exactly one {old.strip()[:70]!r}; use d24572f's ppo_discrete.py")
    return source.replace(old, new)


def replace_rollout(source: str, new: str) -> str:
    start, end = source.index(ROLLOUT_START), source.index(ROLLOUT_END)
    return source[:start] + new + source[end:]


def variant(source: str, name: str) -> str:
    source = replace_once(source, "import torch.nn as nn\n", "import torch.nn as nn\nimport torch.nn.functional as F\n")
    if name == "leanvec_functional":
        old_vector_env = source[source.index("    return gym.vector.SyncVectorEnv(\n"):source.index("def check_env(")]
        source = replace_once(source, old_vector_env, LEAN_VECTOR_ENV)
        return replace_rollout(source, FUNCTIONAL_STAGED_ROLLOUT)
    source = replace_once(source, "    next_obs_np, _ = envs.reset(seed=args.seed)\n"
                          "    next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)", HANDROLLED_SETUP)
    source = replace_rollout(source, HANDROLLED_ROLLOUT)
    source = replace_once(source, "    envs = make_envs(args, run_name)\n", "")
    source = source.replace("                envs.close()\n", "").replace("    envs.close()\n", "")
    if name == "handrolled_compiled":
        source = replace_once(source, "        # ---- update: update_epochs passes of num_minibatches minibatches ----", COMPILED_LOSS)
        source = replace_once(source, EAGER_MINIBATCH, "                loss, mb_stats = loss_fn(e_obs[mb], e_actions[mb], "
                              "e_logprobs[mb], e_advantages[mb], e_values[mb], e_returns[mb])\n")
        source = replace_once(source, "                stats.append(torch.stack([pg_loss, v_loss, entropy_mean, clipfrac, loss]).detach())",
                              "                stats.append(mb_stats)")
    return source


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    source, out = Path(sys.argv[1]).read_text(), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("leanvec_functional", "handrolled", "handrolled_compiled"):
        path = out / f"ppo_discrete_{name}.py"
        path.write_text(variant(source, name))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
