"""Where one training iteration's wall-clock goes, phase by phase, for ppo_discrete.py or ppo_continuous.py.

    python benchmarks/phase_times.py ppo_continuous.py -- --total-timesteps 20480             # 10 iterations
    python benchmarks/phase_times.py ppo_continuous.py -- --total-timesteps 20480 --compile
    python benchmarks/phase_times.py ppo_discrete.py -- --total-timesteps 102400

It copies the script to a temporary folder with time.perf_counter() calls inserted around each phase (the
rollout's policy step, env.step and observation handling; the batched forward + GAE; the update's loss,
zeroing the grads, backward, clip_grad_norm and Adam step), runs it there with the arguments after `--`, and
prints the mean milliseconds per iteration of each phase, the first two iterations left out (warm-up,
torch.compile). The timers cost ~0.2 us each; run it with nothing else on the machine. The script itself is not
modified.

It finds each phase by lines of the script's main(); when one is missing it says which, and this file needs
updating. The rollout's "env.step" phase includes writing the step's rewards and dones to the device (and, when
an episode ends, merging its final observation into the statistics); "obs normaliser" is the running
statistics' update and the normalisation (ppo_continuous.py).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (anchor, replacement) pairs; every anchor must occur exactly once in the script.
COMMON = [
    ("    for iteration in range(1, num_iterations + 1):\n",
     "    TT = collections.defaultdict(float); pc = time.perf_counter\n"
     "    for iteration in range(1, num_iterations + 1):\n"),
    ("        # ---- pi_old's log-probs", "        TT['rollout (total)'] += pc() - t0; t0 = pc()\n        # ---- pi_old's log-probs"),
    ("        # ---- update: update_epochs", "        TT['batched forward + GAE'] += pc() - t0; t0 = pc()\n        # ---- update: update_epochs"),
    ("                optimizer.zero_grad()\n",
     "                tl = pc(); TT['update: loss'] += tl - tm\n"
     "                optimizer.zero_grad()\n"
     "                tz = pc(); TT['update: zero_grad'] += tz - tl\n"),
    ("                loss.backward()\n", "                loss.backward()\n                tb2 = pc(); TT['update: backward'] += tb2 - tz\n"),
    ("                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)\n",
     "                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)\n"
     "                tcl = pc(); TT['update: clip_grad_norm_'] += tcl - tb2\n"),
    ("                optimizer.step()\n", "                optimizer.step()\n                TT['update: Adam step'] += pc() - tcl\n"),
    ("                mb_inds = b_inds[start : start + minibatch_size]\n",
     "                tm = pc()\n                mb_inds = b_inds[start : start + minibatch_size]\n"),
    ("        # ---- diagnostics", "        TT['update (total)'] += pc() - t0; t0 = pc()\n        # ---- diagnostics"),
    ("        logger.log({", "        TT['diagnostics'] += pc() - t0\n        if iteration == 2:\n            TT.clear()\n        logger.log({"),
    ("    envs.close()\n    summary",
     "    print('ms per iteration:', {k: round(v / (num_iterations - 2) * 1e3, 1) for k, v in TT.items()})\n"
     "    envs.close()\n    summary"),
]
PER_SCRIPT = {
    "ppo_discrete.py": [
        ("            for step in range(T):\n", "            t0 = pc()\n            for step in range(T):\n                ta = pc()\n"),
        ("                next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())\n",
         "                np_action = action.cpu().numpy(); tb = pc(); TT['rollout: policy'] += tb - ta\n"
         "                next_obs_np, reward, terminated, truncated, info = envs.step(np_action)\n"
         "                TT['rollout: env.step'] += pc() - tb\n"),
    ],
    "ppo_continuous.py": [
        ("            for step in range(T):\n", "            t0 = pc()\n            for step in range(T):\n                ta = pc()\n"),
        ("                raw_obs, reward, terminated, truncated, info = envs.step(env_action.cpu().numpy())\n",
         "                env_action = env_action.cpu().numpy(); tb = pc(); TT['rollout: policy'] += tb - ta\n"
         "                raw_obs, reward, terminated, truncated, info = envs.step(env_action)\n"
         "                te = pc(); TT['rollout: env.step'] += te - tb\n"),
        ("                obs_rms.update(raw_obs)  # the observations the policy will act on (reset ones included)\n",
         "                tf = pc(); TT['rollout: env.step'] += tf - te; te = tf\n"
         "                obs_rms.update(raw_obs)  # the observations the policy will act on (reset ones included)\n"),
        ("                next_obs = obs_rms.normalize(raw_obs)\n",
         "                next_obs = obs_rms.normalize(raw_obs)\n                TT['rollout: obs normaliser'] += pc() - te\n"),
        ("            rewards = reward_scaler(raw_rewards, dones).float()",
         "            tq = pc(); rewards = reward_scaler(raw_rewards, dones).float(); TT['reward scaler (in GAE)'] += pc() - tq\n"
         "            rewards = rewards"),
    ],
}


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    (script,) = argv[:split]
    source = (ROOT / script).read_text()
    for anchor, replacement in COMMON + PER_SCRIPT[script]:
        if source.count(anchor) != 1:
            raise SystemExit(f"error: {script} no longer has exactly one {anchor.strip()!r}; update phase_times.py")
        source = source.replace(anchor, replacement)
    with tempfile.TemporaryDirectory() as cwd:
        (Path(cwd) / script).write_text(source)
        result = subprocess.run([sys.executable, script, *argv[split + 1 :]], cwd=cwd, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ms per iteration", "done:"))]
    print("\n".join(lines) if result.returncode == 0 else result.stdout[-2000:] + result.stderr[-2000:])


if __name__ == "__main__":
    main()
