"""PPO on several processes (torchrun), ppo_discrete.py, ppo_continuous.py and ppo_penalty.py: two CPU ranks on
gloo.

Each multi-process test starts its ranks as processes of their own (torch.multiprocessing, spawn), each joins
the group the way the scripts do under torchrun (RANK, WORLD_SIZE, ... in the environment), every collective has
a timeout and every process a deadline: a broken collective fails the test instead of hanging it.
"""

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT

SCRIPTS = ["ppo_discrete", "ppo_continuous", "ppo_penalty"]
DEADLINE = 120  # seconds for a whole multi-process test
TINY = {
    "ppo_discrete": ["--total-timesteps", "1024", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
                     "--update-epochs", "2"],
    "ppo_continuous": ["--env-id", "Pendulum-v1", "--total-timesteps", "768", "--num-steps", "64",
                       "--num-minibatches", "2", "--update-epochs", "2"],
    # Box: both normalisers merged; 2 envs per rank step in subprocesses; each env's first episode ends by the
    # time limit (200 steps) in the 4th iteration
    "ppo_penalty": ["--env-id", "Pendulum-v1", "--total-timesteps", "1024", "--num-envs", "2", "--num-steps", "64",
                    "--num-minibatches", "2", "--update-epochs", "2", "--ent-coef", "0"],
}
# (global batch: both ranks' steps of one iteration, --total-timesteps) of each TINY run
GLOBAL_BATCH_AND_TOTAL = {"ppo_discrete": (2 * 2 * 64, 1024), "ppo_continuous": (2 * 64, 768),
                          "ppo_penalty": (2 * 2 * 64, 1024)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_rank(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a rank on one machine."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def run_ranks(fn, *args, world_size: int = 2) -> None:
    """fn(rank, world_size, port, *args) in world_size spawned processes; fails past DEADLINE."""
    port = free_port()
    context = mp.start_processes(fn, args=(world_size, port, *args), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.time() + DEADLINE
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"ranks still running after {DEADLINE} s")


# ---------------------------------------------------------------------------------------------------------
# One optimiser step: two ranks holding half a minibatch each == one process holding all of it
# ---------------------------------------------------------------------------------------------------------


BETA = 2.0  # ppo_penalty's beta for the step below


def one_step(module, agent, optimizer, mb: dict, world_size: int) -> None:
    """One minibatch step as main() takes it: the loss of this rank's part of the minibatch, advantages
    normalised over the global minibatch, gradients averaged over the ranks, clip, Adam."""
    if module.__name__ == "ppo_discrete":
        logits, new_values = agent(mb["obs"])
        new_logprob, entropy = module.categorical_logprob_entropy(logits, mb["actions"])
        entropy = entropy.mean()
    elif module.__name__ == "ppo_continuous":
        mean, new_values = agent(mb["obs"])
        new_logprob = module.gaussian_log_prob(mean, agent.actor_logstd, mb["actions"])
        entropy = module.gaussian_entropy(agent.actor_logstd)
    else:  # ppo_penalty
        params, new_values = agent(mb["obs"])
        new_logprob, entropy = agent.logprob_entropy(params, mb["actions"])
        entropy = entropy.mean()
    advantages = module.normalize_advantages_over_ranks(mb["advantages"], world_size)
    if module.__name__ == "ppo_penalty":  # the adaptive-KL loss at beta = BETA, exact KL to pi_old, no clip
        kl = agent.kl(mb["old_params"], params)
        pg_loss = module.kl_penalty_loss(new_logprob, mb["logprobs"], advantages, kl, BETA)[0]
    else:
        pg_loss, _ = module.ppo_clip_loss(new_logprob, mb["logprobs"], advantages, 0.2)
    v_loss = module.value_loss(new_values, mb["values"], mb["returns"], 0.2)
    loss = pg_loss - 0.01 * entropy + 0.5 * v_loss
    optimizer.zero_grad()
    loss.backward()
    module.average_gradients(agent.parameters(), world_size)
    torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
    optimizer.step()


def kl_and_next_beta(module, agent, mb: dict, world_size: int, kl_target: float) -> tuple[float, float]:
    """ppo_penalty after the update, as main() measures it: the exact KL to pi_old over the global batch (this
    rank's part, averaged over the ranks), and the beta that update_beta makes of it."""
    with torch.no_grad():
        kl = module.mean_over_ranks(agent.kl(mb["old_params"], agent.dist_params(mb["obs"])).mean(), world_size)
    return kl.item(), module.update_beta(BETA, kl.item(), kl_target)


def make_problem(module):
    """A float64 agent, its Adam, and a minibatch of 64 made-up samples (the same for every caller). One torch
    thread everywhere, as the scripts run: the sums inside a matmul then come in the same order in every process."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    obs_dim, n = 5, 64
    if module.__name__ == "ppo_discrete":
        agent = module.Agent(obs_dim, 3).double()
        actions = torch.randint(0, 3, (n,))
    elif module.__name__ == "ppo_penalty":  # a Gaussian policy, and pi_old's parameters for the exact KL
        agent = module.Agent(obs_dim, 2, discrete=False).double()
        actions = torch.randn(n, 2, dtype=torch.float64)
    else:
        agent = module.Agent(obs_dim, 2).double()
        actions = torch.randn(n, 2, dtype=torch.float64)
    mb = {"obs": torch.randn(n, obs_dim, dtype=torch.float64), "actions": actions,
          "logprobs": torch.randn(n, dtype=torch.float64) - 1.0, "advantages": torch.randn(n, dtype=torch.float64),
          "values": torch.randn(n, dtype=torch.float64), "returns": torch.randn(n, dtype=torch.float64)}
    if module.__name__ == "ppo_penalty":
        mb["old_params"] = 0.3 * torch.randn(n, 4, dtype=torch.float64)  # means and log-stds of pi_old
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2, eps=1e-5)
    return agent, optimizer, mb


def step_on_rank(rank, world_size, port, name, out_dir, kl_target):
    as_rank(rank, world_size, port)
    module = importlib.import_module(name)
    torch.distributed.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=30))
    agent, optimizer, mb = make_problem(module)
    half = {key: value.chunk(world_size)[rank] for key, value in mb.items()}
    one_step(module, agent, optimizer, half, world_size)
    state = agent.state_dict()
    if name == "ppo_penalty":
        kl, beta = kl_and_next_beta(module, agent, half, world_size, kl_target)
        state.update(kl=torch.tensor(kl, dtype=torch.float64), beta=torch.tensor(beta, dtype=torch.float64))
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    module.teardown_distributed(world_size)  # with its gc.collect(): no gloo abort at exit


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_step_on_two_ranks_equals_one_process(name, tmp_path):
    """ppo_penalty also: the KL measured after the step over the global batch, and the next beta, equal one
    process's. The KL target is put between the global KL and the larger of the two halves' KLs, so a rank that
    decided beta from its own half's KL would double it where one process keeps it."""
    module = importlib.import_module(name)
    agent, optimizer, mb = make_problem(module)
    one_step(module, agent, optimizer, mb, world_size=1)
    kl_target = None
    if name == "ppo_penalty":
        halves = [{key: value.chunk(2)[r] for key, value in mb.items()} for r in range(2)]
        half_kls = [kl_and_next_beta(module, agent, half, 1, 1.0)[0] for half in halves]
        kl = kl_and_next_beta(module, agent, mb, 1, 1.0)[0]
        kl_target = (kl + max(half_kls)) / 2 / 1.5  # kl < 1.5 * kl_target < the larger half's KL
        beta = kl_and_next_beta(module, agent, mb, 1, kl_target)[1]
        assert beta == BETA and module.update_beta(BETA, max(half_kls), kl_target) == 2 * BETA
    run_ranks(step_on_rank, name, str(tmp_path), kl_target)
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in agent.state_dict().items():
            torch.testing.assert_close(ranked[key], value, rtol=0, atol=1e-10, msg=f"rank {rank}: {key}")
        if name == "ppo_penalty":
            assert ranked["kl"].item() == pytest.approx(kl, rel=1e-10, abs=0), f"rank {rank}: kl"
            assert ranked["beta"].item() == beta, f"rank {rank}: beta"


# ---------------------------------------------------------------------------------------------------------
# Normaliser statistics merged over ranks == the statistics of all the data
# ---------------------------------------------------------------------------------------------------------


def rank_data(rank: int) -> list:
    """Batches of made-up observations a rank sees in a rollout: different counts on each rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(b, 3, generator=generator, dtype=torch.float64) * (rank + 1) + rank for b in (1, 4, 1, 2)]


def merge_on_rank(rank, world_size, port, name, out_dir):
    as_rank(rank, world_size, port)
    module = importlib.import_module(name)
    torch.distributed.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=30))
    rms = module.RunningMeanStd((3,), torch.device("cpu"))
    rms.update(torch.arange(6.0, dtype=torch.float64).reshape(2, 3))  # what every rank saw before
    before = rms.state_dict()
    for batch in rank_data(rank):
        rms.update(batch)
    module.merge_statistics_over_ranks(rms, before, world_size)
    torch.save(rms.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    module.teardown_distributed(world_size)  # with its gc.collect(): no gloo abort at exit


@pytest.mark.parametrize("name", ["ppo_continuous", "ppo_penalty"])
def test_merged_statistics_are_those_of_all_the_data(name, tmp_path):
    module = importlib.import_module(name)
    run_ranks(merge_on_rank, name, str(tmp_path))
    everything = torch.cat([torch.arange(6.0, dtype=torch.float64).reshape(2, 3), *rank_data(0), *rank_data(1)])
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert float(state["count"]) == len(everything)
        torch.testing.assert_close(state["mean"], everything.mean(0), rtol=0, atol=1e-10)
        torch.testing.assert_close(state["var"], everything.var(0, correction=0), rtol=0, atol=1e-10)
    single = module.RunningMeanStd((3,), torch.device("cpu"))
    single.update(everything)
    torch.testing.assert_close(state["var"], single.var, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Whole runs on two ranks
# ---------------------------------------------------------------------------------------------------------


def train_on_rank(rank, world_size, port, name, workdir):
    """main() as under torchrun; saves this rank's final parameters (and normaliser statistics), the metrics it
    logged (rank 0 writes them, every rank computes them) and, for ppo_penalty, every (KL, beta) update_beta
    was given, for comparison."""
    as_rank(rank, world_size, port)
    os.chdir(workdir)
    module = importlib.import_module(name)
    agents, scalers, logged, beta_updates = [], [], [], []

    class RecordedAgent(module.Agent):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            agents.append(self)

    module.Agent = RecordedAgent
    if hasattr(module, "RunningMeanStd"):
        original = module.RunningMeanStd

        class RecordedStatistics(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                scalers.append(self)

        module.RunningMeanStd = RecordedStatistics
    log = module.Logger.log

    def recorded_log(self, metrics):
        logged.append({k: v for k, v in metrics.items() if k not in ("time", "sps")})
        log(self, metrics)

    module.Logger.log = recorded_log
    if hasattr(module, "update_beta"):
        update_beta = module.update_beta

        def recorded_update_beta(beta, kl, kl_target):
            beta_updates.append([beta, kl])
            return update_beta(beta, kl, kl_target)

        module.update_beta = recorded_update_beta
    module.main(TINY[name] + ["--dist-timeout-s", "60"])
    state = {f"agent.{k}": v for k, v in agents[0].state_dict().items()}
    for i, statistics in enumerate(scalers):
        state.update({f"rms{i}.{k}": v for k, v in statistics.state_dict().items()})
    if beta_updates:
        state["update_beta.beta_and_kl"] = torch.tensor(beta_updates, dtype=torch.float64)
    torch.save(state, Path(workdir) / f"rank{rank}.pt")
    (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(logged, sort_keys=True))


@pytest.mark.parametrize("name", SCRIPTS)
def test_two_ranks_train_identical_networks_and_only_rank_0_writes(name, tmp_path):
    """Both ranks end with the same parameters, normaliser statistics and (ppo_penalty) betas, decided from the
    same KLs; both compute the same logged figures (so they are the global batch's, not one rank's)."""
    run_ranks(train_on_rank, name, str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert first.keys() == second.keys()
    assert ("update_beta.beta_and_kl" in first) == (name == "ppo_penalty")
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between the ranks"
    logged = [(tmp_path / f"rank{r}.json").read_text() for r in range(2)]
    assert logged[0] == logged[1], "the ranks computed different logged metrics"
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batch, total = GLOBAL_BATCH_AND_TOTAL[name]
    assert [row["global_step"] for row in rows] == [batch * (i + 1) for i in range(len(rows))]
    assert rows[-1]["global_step"] == total
    if name == "ppo_penalty":  # the episodes of both ranks' envs: 2 ranks x 2 envs end theirs at step 200
        assert [row["episodes"] for row in rows] == [0, 0, 0, 4] and rows[-1]["episodic_length"] == 200


@pytest.mark.parametrize("name", SCRIPTS)
def test_torchrun_runs_the_script_and_bad_input_stops_every_rank(name, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*launcher, str(ROOT / f"{name}.py"), *TINY[name]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "runs").iterdir())) == 1
    assert "done: " in done.stdout
    start = time.time()
    bad = subprocess.run([*launcher, str(ROOT / f"{name}.py"), *TINY[name], "--num-minibatches", "3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=DEADLINE)
    assert bad.returncode != 0 and time.time() - start < 60
    # One line per rank that got as far as checking its input: torchrun stops the other rank (SIGTERM) as soon as
    # one fails, and a rank still importing then never prints its own (seen here on a loaded machine).
    assert (done.stdout + bad.stdout + bad.stderr).count("error: --num-minibatches 3") in (1, 2)
    assert len(list((tmp_path / "runs").iterdir())) == 1
