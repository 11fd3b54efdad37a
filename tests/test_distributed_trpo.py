"""TRPO on several processes (torchrun), trpo.py: two CPU ranks on gloo, started as in tests/test_distributed.py
(spawned processes, a timeout on every collective, a deadline on every process)."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from conftest import ROOT
from test_distributed import DEADLINE, as_rank, run_ranks

TINY = ["--env-id", "Pendulum-v1", "--total-timesteps", "512", "--num-envs", "1", "--num-steps", "64",
        "--num-minibatches", "2", "--vf-iters", "2", "--cg-iters", "3"]
STATS = ("policy_loss", "entropy", "kl", "approx_kl_k1", "approx_kl_k3", "surrogate_improvement",
         "expected_improvement", "cg_residual", "step_norm")


def make_batch():
    """A float64 Gaussian policy and a batch of 64 made-up samples (the same for every caller); one torch thread,
    so a matmul sums in the same order in every process."""
    import trpo

    torch.set_num_threads(1)
    torch.manual_seed(0)
    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    policy = trpo.make_policy(5, space).double()
    n = 64
    batch = {"obs": torch.randn(n, 5, dtype=torch.float64), "actions": torch.randn(n, 2, dtype=torch.float64),
             "advantages": torch.randn(n, dtype=torch.float64)}
    with torch.no_grad():  # pi_old: the policy as it is on entry
        batch["logprobs"], _ = policy.log_prob_entropy(policy(batch["obs"]), batch["actions"])
    return policy, batch


def update(policy, batch: dict, world_size: int) -> dict:
    """trpo.py's policy step as main() takes it: advantages normalised over the whole batch, then trpo_update."""
    import trpo

    advantages = trpo.normalize_advantages_over_ranks(batch["advantages"], world_size)
    return trpo.trpo_update(policy, batch["obs"], batch["actions"], batch["logprobs"], advantages, max_kl=0.01,
                            cg_iters=10, cg_damping=0.1, backtrack_coef=0.8, backtrack_iters=10,
                            world_size=world_size)


def update_on_rank(rank, world_size, port, out_dir):
    import trpo

    as_rank(rank, world_size, port)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    policy, batch = make_batch()
    half = {key: value.chunk(world_size)[rank] for key, value in batch.items()}
    stats = update(policy, half, world_size)
    torch.save({"policy": policy.state_dict(), "stats": torch.tensor([stats[k] for k in STATS], dtype=torch.float64)},
               Path(out_dir) / f"rank{rank}.pt")
    trpo.teardown_distributed(world_size)


def test_one_trpo_update_on_two_ranks_equals_one_process(tmp_path):
    """g, each F v of conjugate gradient, and the line search's L and KL averaged over 2 ranks holding half the
    batch each: the same step, and the same logged numbers, as one process holding all of it."""
    policy, batch = make_batch()
    stats = update(policy, batch, world_size=1)
    assert stats["step_accepted"] and stats["step_norm"] > 0  # a real step, so the comparison means something
    run_ranks(update_on_rank, str(tmp_path))
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in policy.state_dict().items():
            torch.testing.assert_close(ranked["policy"][key], value, rtol=0, atol=1e-10, msg=f"rank {rank}: {key}")
        expected = torch.tensor([stats[k] for k in STATS], dtype=torch.float64)
        torch.testing.assert_close(ranked["stats"], expected, rtol=1e-9, atol=1e-10, msg=f"rank {rank}: {STATS}")


def train_on_rank(rank, world_size, port, workdir):
    """trpo.main() as under torchrun; saves this rank's final networks and normaliser statistics."""
    as_rank(rank, world_size, port)
    os.chdir(workdir)
    import trpo

    made = []
    make_policy, critic_class, statistics_class = trpo.make_policy, trpo.Critic, trpo.RunningMeanStd

    def recorded(cls):
        class Recorded(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        return Recorded

    trpo.make_policy = lambda *args: made.append(make_policy(*args)) or made[-1]
    trpo.Critic, trpo.RunningMeanStd = recorded(critic_class), recorded(statistics_class)
    trpo.main(TINY + ["--dist-timeout-s", "60"])
    state = {}
    for i, thing in enumerate(made):
        state.update({f"{i}.{k}": v for k, v in thing.state_dict().items()})
    torch.save(state, Path(workdir) / f"rank{rank}.pt")


def test_two_ranks_train_identical_networks_and_only_rank_0_writes(tmp_path):
    run_ranks(train_on_rank, str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert first.keys() == second.keys() and len(first) > 6  # policy, critic, two normalisers
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between the ranks"
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in rows] == [128, 256, 384, 512]


def test_torchrun_runs_trpo_and_bad_input_stops_every_rank(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*launcher, str(ROOT / "trpo.py"), *TINY, "--env-id", "CartPole-v1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "runs").iterdir())) == 1 and "done: 512 steps" in done.stdout
    start = time.time()
    bad = subprocess.run([*launcher, str(ROOT / "trpo.py"), *TINY, "--num-minibatches", "3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=DEADLINE)
    assert bad.returncode != 0 and time.time() - start < 60
    # one line per rank that got that far: torchrun stops the other rank when the first exits
    assert 1 <= (bad.stdout + bad.stderr).count("error: --num-minibatches 3") <= 2
    assert len(list((tmp_path / "runs").iterdir())) == 1
