"""Micro-benchmarks behind the per-call table of benchmarks/SPEED.md (ppo_discrete.py's pieces, one torch thread).

    python benchmarks/microbench_discrete.py            # ~1 min; run with nothing else on the machine
    python benchmarks/microbench_discrete.py --compile  # also times torch.compile of the minibatch loss

Each line is the mean wall time of one call over many calls, in microseconds. Note: `gae` times the current
compute_gae (TD errors vectorised); SPEED.md's 2815 us is the earlier loop that computed delta inside.
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


def bench(f, n=2000):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
envs.reset(seed=0)
a = np.zeros(4, dtype=np.int64)
print("SyncVectorEnv(4 x CartPole).step", bench(lambda: envs.step(a)))
vector_env = gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="vector_entry_point")  # CartPoleVectorEnv
vector_env.reset(seed=0)
print("CartPoleVectorEnv(4).step (NEXT_STEP autoreset)", bench(lambda: vector_env.step(a)))
agent = P.Agent(4, 2)
x = torch.randn(4, 4)
logits = torch.randn(4, 2)


def fwd():
    with torch.no_grad():
        agent(x)


def actor_gumbel(mode):
    def f():
        with mode():
            P.sample_categorical(agent.actor(x))
    return f


def multinomial():
    with torch.no_grad():
        torch.multinomial(logits.softmax(-1), 1)


def logprob():
    with torch.no_grad():
        logits.log_softmax(-1).gather(-1, torch.zeros(4, 1, dtype=torch.long))


print("actor + critic forward, 4 obs (no_grad)", bench(fwd))
l0, l2, l4 = agent.actor[0], agent.actor[2], agent.actor[4]


def actor_functional():
    with torch.inference_mode():
        F.linear(torch.tanh(F.linear(torch.tanh(F.linear(x, l0.weight, l0.bias)), l2.weight, l2.bias)), l4.weight, l4.bias)


def actor_sequential():
    with torch.inference_mode():
        agent.actor(x)


print("actor forward, 4 obs: nn.Sequential / F.linear calls", bench(actor_sequential), bench(actor_functional))
print("actor + Gumbel-max (no_grad)", bench(actor_gumbel(torch.no_grad)))
print("actor + Gumbel-max (inference_mode)", bench(actor_gumbel(torch.inference_mode)))
print("torch.multinomial", bench(multinomial))
print("Gumbel-max", bench(lambda: P.sample_categorical(logits)))
print("log_softmax + gather", bench(logprob))

ob, ac = torch.randn(128, 4), torch.randint(0, 2, (128,))
old, adv, ret, vals = torch.randn(128) - 1, torch.randn(128), torch.randn(128), torch.randn(128)


def loss_fn(ob, ac, old, adv, vals, ret):
    logits, new_values = agent(ob)
    new_logprob, entropy = P.categorical_logprob_entropy(logits, ac)
    pg_loss, _ = P.ppo_clip_loss(new_logprob, old, P.normalize_advantages(adv), 0.2)
    return pg_loss - 0.01 * entropy.mean() + 0.5 * P.value_loss(new_values, vals, ret, 0.2)


for name, kwargs in (("foreach (CPU default)", {}), ("single-tensor", {"foreach": False}), ("fused", {"fused": True})):
    opt = torch.optim.Adam(agent.parameters(), lr=1e-4, eps=1e-5, **kwargs)

    def update(f=loss_fn):
        loss = f(ob, ac, old, adv, vals, ret)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5, foreach=True)
        opt.step()

    print(f"minibatch update, Adam {name}", bench(update, 500))
    print(f"  Adam {name} step alone", bench(opt.step, 500))


def fwd_bwd():
    agent.zero_grad(set_to_none=True)
    loss_fn(ob, ac, old, adv, vals, ret).backward()


print("forward + backward", bench(fwd_bwd, 500))
print("clip_grad_norm_", bench(lambda: torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5), 500))
h, w = torch.randn(128, 64), torch.randn(64, 64)
print("tanh [128, 64]", bench(lambda: torch.tanh(h)))
print("sigmoid [128, 64]", bench(lambda: torch.sigmoid(h)))
print("matmul [128,64]x[64,64]", bench(lambda: h @ w))
r, v, d, lv = torch.randn(128, 4), torch.randn(128, 4), (torch.rand(128, 4) < 0.05).float(), torch.randn(4)
print("gae (T=128, N=4)", bench(lambda: P.compute_gae(r, v, d, lv, 0.99, 0.95), 300))

if "--compile" in sys.argv:
    opt = torch.optim.Adam(agent.parameters(), lr=1e-4, eps=1e-5, fused=True)
    t = time.perf_counter()
    compiled = torch.compile(loss_fn)
    compiled(ob, ac, old, adv, vals, ret).backward()
    print("torch.compile of the loss: compile seconds", time.perf_counter() - t)
    print("minibatch update with the compiled loss", bench(lambda: (opt.zero_grad(set_to_none=True),
          compiled(ob, ac, old, adv, vals, ret).backward(), opt.step()), 500))
