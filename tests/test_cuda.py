"""The GPU path (issue 25), on a machine with CUDA: the functions every script shares give the same numbers on
`cuda` as on `cpu`; each script trains two iterations with --cuda; the normalisers keep their statistics on the
GPU; a checkpoint saved by a --cuda run evaluates on a machine without one.

Skipped as a whole where torch sees no CUDA device (CI, the development machines).
"""

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, scripts_defining

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TOL = dict(atol=1e-5, rtol=1e-5)
DEADLINE = 120  # seconds the CPU evaluation of a checkpoint may take before the test fails instead of hanging


def assert_same(on_cuda, on_cpu):
    """Outputs of one call on each device: the CUDA ones are CUDA tensors, and equal the CPU ones to 1e-5."""
    if isinstance(on_cpu, (tuple, list)):
        assert len(on_cuda) == len(on_cpu)
        for a, b in zip(on_cuda, on_cpu):
            assert_same(a, b)
    elif isinstance(on_cpu, torch.Tensor):
        assert on_cuda.device.type == "cuda", "a CUDA input gave an output off the GPU"
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, equal_nan=True, **TOL)
    else:
        assert on_cuda == pytest.approx(on_cpu, **{"abs": TOL["atol"], "rel": TOL["rtol"]})


def to_cuda(args):
    return tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args)


# ---------------------------------------------------------------------------------------------------------
# The shared pure functions: the same inputs on both devices (float32, as the networks compute)
# ---------------------------------------------------------------------------------------------------------


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


# (function name, case id, g -> arguments on the CPU)
CASES = [
    ("compute_gae", "gae", lambda g: (randn(g, 64, 8), randn(g, 64, 8), (torch.rand(64, 8, generator=g) < 0.1).float(),
                                     randn(g, 8), 0.99, 0.95)),
    ("normalize_advantages", "adv", lambda g: (randn(g, 256, scale=3.0) + 1.0,)),
    ("ppo_clip_loss", "clip", lambda g: (randn(g, 256, scale=0.3), randn(g, 256, scale=0.3), randn(g, 256), 0.2)),
    ("approx_kl", "kl", lambda g: (randn(g, 256, scale=0.3), randn(g, 256, scale=0.3))),
    ("value_loss", "clipped", lambda g: (randn(g, 256), randn(g, 256), randn(g, 256), 0.2)),
    ("value_loss", "plain", lambda g: (randn(g, 256), randn(g, 256), randn(g, 256), None)),
    ("explained_variance", "ev", lambda g: (randn(g, 256), randn(g, 256))),
    ("categorical_logprob_entropy", "cat", lambda g: (randn(g, 256, 6), torch.randint(0, 6, (256,), generator=g))),
    ("gaussian_log_prob", "shared-std", lambda g: (randn(g, 256, 6), randn(g, 6, scale=0.5), randn(g, 256, 6))),
    ("gaussian_log_prob", "per-state-std", lambda g: (randn(g, 256, 6), randn(g, 256, 6, scale=0.5),
                                                      randn(g, 256, 6))),
    ("gaussian_entropy", "entropy", lambda g: (randn(g, 256, 6, scale=0.5),)),
    ("categorical_kl", "cat-kl", lambda g: (randn(g, 256, 6), randn(g, 256, 6))),
    ("gaussian_kl", "gauss-kl", lambda g: (randn(g, 256, 6), randn(g, 256, 6, scale=0.5), randn(g, 256, 6),
                                           randn(g, 256, 6, scale=0.5))),
]


def contract_params():
    """One param per (case, script that defines the function)."""
    return [
        pytest.param(function_param.values[0], make_args, id=f"{name}-{case}-{function_param.id}")
        for name, case, make_args in CASES
        for function_param in scripts_defining(name)
    ]


@pytest.mark.parametrize("function,make_args", contract_params())
def test_shared_functions_give_the_same_numbers_on_cuda(function, make_args):
    """Each shared pure function, given the same inputs on the GPU, returns GPU tensors equal to its CPU result."""
    args = make_args(torch.Generator().manual_seed(0))
    assert_same(function(*to_cuda(args)), function(*args))


@pytest.mark.parametrize("sample_categorical", scripts_defining("sample_categorical"))
def test_categorical_sampling_on_cuda_draws_from_the_softmax(sample_categorical):
    """The Gumbel-max sampler draws its noise on the logits' device (no generator argument: torch's CUDA
    generator, seeded by torch.manual_seed) and its frequencies match softmax(logits)."""
    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.7])
    n = 200_000
    actions = sample_categorical(p.log().to(CUDA).expand(n, 3))
    assert actions.device.type == "cuda" and actions.dtype == torch.long
    freq = torch.bincount(actions, minlength=3).cpu() / n
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()), freq


def test_the_rlhf_toy_world_gives_the_same_numbers_on_cuda():
    """ppo_rlhf_toy.py's data are drawn on the CPU (sample_prompts and behaviour_policy take a CPU
    torch.Generator, and main moves their output to the device); its reward and token functions then give the
    same numbers on the GPU."""
    rlhf = importlib.import_module("ppo_rlhf_toy")
    g = torch.Generator().manual_seed(0)
    prompts = rlhf.sample_prompts(64, 4, 16, g)  # the script's defaults: prompts of 4 tokens out of 16
    responses, _ = rlhf.behaviour_policy(prompts, 10, 6, 0.8, 16, g)  # [64, 10]
    logits, ref_logits = randn(g, 64, 10, 16), randn(g, 64, 10, 16)
    score, beta = randn(g, 64), 0.1
    values = randn(g, 64, 10)

    def everything(prompts, responses, logits, ref_logits, score, values):
        mask = rlhf.response_mask(responses)
        logprobs = rlhf.sequence_logprobs(logits, responses, mask)
        ref_logprobs = rlhf.sequence_logprobs(ref_logits, responses, mask)
        return (mask, rlhf.episode_dones(mask), rlhf.gold_reward(prompts, responses, mask), logprobs,
                rlhf.token_entropy(logits, mask), rlhf.token_kl(logits, ref_logits, mask),
                rlhf.token_rewards(score, logprobs, ref_logprobs, mask, beta), rlhf.masked_mean(values, mask),
                rlhf.masked_whiten(values, mask), rlhf.bradley_terry_loss(score[:32], score[32:]),
                rlhf.dpo_loss(logprobs.sum(1)[:32], logprobs.sum(1)[32:], ref_logprobs.sum(1)[:32],
                              ref_logprobs.sum(1)[32:], beta))

    args = (prompts, responses, logits, ref_logits, score, values)
    assert_same(everything(*to_cuda(args)), everything(*args))


# ---------------------------------------------------------------------------------------------------------
# The normalisers on CUDA tensors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_array", scripts_defining("compute_array"))
def test_compute_array_is_a_cuda_tensor_on_cuda(compute_array):
    """On the CPU a float64 numpy array, on the GPU a float64 CUDA tensor with the same numbers; a float64 CUDA
    tensor comes back as itself, so in-place arithmetic on the result changes it (RunningMeanStd relies on it)."""
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    on_cpu, on_cuda = compute_array(x, CPU), compute_array(x, CUDA)
    assert isinstance(on_cpu, np.ndarray) and on_cpu.dtype == np.float64
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float64
    np.testing.assert_array_equal(on_cuda.cpu().numpy(), on_cpu)
    statistics = torch.zeros(3, dtype=torch.float64, device=CUDA)
    view = compute_array(statistics, CUDA)
    view += 1.0
    assert statistics.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("RunningMeanStd", scripts_defining("RunningMeanStd"))
def test_running_mean_std_keeps_its_statistics_on_cuda(RunningMeanStd):
    """Fed the same numpy batches as the envs give (one row and many), the CUDA normaliser's statistics are CUDA
    tensors equal to the CPU one's and to those of all the data; normalize() gives float32 CUDA tensors; the
    state_dict is CPU tensors that a CPU normaliser loads; a deepcopy is independent."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 5, generator=g, dtype=torch.float64) * 3.0 + 2.0).numpy() for n in (1, 7, 64, 1, 300)]
    on_cpu, on_cuda = RunningMeanStd((5,), CPU), RunningMeanStd((5,), CUDA)
    for batch in batches:
        on_cpu.update(batch)
        on_cuda.update(batch)
    on_cuda.update(torch.as_tensor(batches[0], device=CUDA))  # a CUDA tensor is input too
    on_cpu.update(batches[0])
    assert on_cuda.mean.device.type == "cuda" and on_cuda.var.device.type == "cuda"
    torch.testing.assert_close(on_cuda.mean.cpu(), on_cpu.mean, **TOL)
    torch.testing.assert_close(on_cuda.var.cpu(), on_cpu.var, **TOL)
    assert on_cuda.count == on_cpu.count == 374
    everything = np.concatenate(batches + [batches[0]])
    np.testing.assert_allclose(on_cuda.mean.cpu().numpy(), everything.mean(0), **TOL)
    np.testing.assert_allclose(on_cuda.var.cpu().numpy(), everything.var(0), **TOL)

    x = batches[2][:10]
    z = on_cuda.normalize(x)
    assert z.device.type == "cuda" and z.dtype == torch.float32
    torch.testing.assert_close(z.cpu(), on_cpu.normalize(x), **TOL)

    state = on_cuda.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())
    on_a_cpu = RunningMeanStd((5,), CPU)
    on_a_cpu.load_state_dict(state)
    torch.testing.assert_close(on_a_cpu.normalize(x), z.cpu(), **TOL)

    twin = copy.deepcopy(on_cuda)
    twin.update(batches[-1])
    assert twin.mean.device.type == "cuda" and twin.count == on_cuda.count + 300
    torch.testing.assert_close(on_cuda.mean.cpu(), on_cpu.mean, **TOL)  # the original did not move


@pytest.mark.parametrize("RewardScaler", scripts_defining("RewardScaler"))
def test_reward_scaler_on_cuda_matches_cpu(RewardScaler):
    """Two rollouts [T, N] in a row (the discounted returns carry over between calls, and restart at episode
    ends): the CUDA scaler returns CUDA tensors equal to the CPU scaler's, and its running returns and return
    statistics are CUDA tensors equal to the CPU ones."""
    g = torch.Generator().manual_seed(0)
    on_cpu, on_cuda = RewardScaler(3, 0.99, CPU), RewardScaler(3, 0.99, CUDA)
    for _ in range(2):
        rewards = torch.randn(50, 3, generator=g, dtype=torch.float64)  # raw_rewards: float64, as the envs give
        dones = (torch.rand(50, 3, generator=g) < 0.05).float()
        assert_same(on_cuda(rewards.to(CUDA), dones.to(CUDA)), on_cpu(rewards, dones))
    assert_same(on_cuda.returns, on_cpu.returns)
    assert_same((on_cuda.return_rms.mean, on_cuda.return_rms.var), (on_cpu.return_rms.mean, on_cpu.return_rms.var))
    assert on_cuda.return_rms.count == on_cpu.return_rms.count == 300


# ---------------------------------------------------------------------------------------------------------
# Each script end to end with --cuda: two iterations, then the checkpoint on a machine without CUDA
# ---------------------------------------------------------------------------------------------------------

# (script, flags of two iterations, whether the run normalises observations or rewards). The Acrobot and
# Pendulum episodes end by their time limit inside the second iteration (500 and 200 steps), so the
# truncation bootstrap (final observations indexed with a CUDA mask) runs on the GPU too.
ACROBOT = ["--env-id", "Acrobot-v1", "--total-timesteps", "1024", "--num-envs", "2", "--num-steps", "256",
           "--eval-episodes", "1"]
PENDULUM = ["--env-id", "Pendulum-v1", "--total-timesteps", "400", "--num-envs", "2", "--num-steps", "100",
            "--num-minibatches", "2", "--eval-episodes", "1"]
RUNS = [
    pytest.param(("ppo_discrete", ACROBOT, False), id="ppo_discrete-Acrobot"),
    # two envs: AsyncVectorEnv's worker processes, forked from a process that uses CUDA
    pytest.param(("ppo_continuous", PENDULUM + ["--update-epochs", "1"], True), id="ppo_continuous-Pendulum"),
    pytest.param(("ppo_penalty", ACROBOT, False), id="ppo_penalty-Acrobot"),
    pytest.param(("ppo_penalty", PENDULUM + ["--update-epochs", "1"], True), id="ppo_penalty-Pendulum"),
    pytest.param(("trpo", ACROBOT + ["--num-minibatches", "2", "--vf-iters", "1"], True), id="trpo-Acrobot"),
    pytest.param(("trpo", PENDULUM + ["--vf-iters", "1"], True), id="trpo-Pendulum"),
    pytest.param(("ppo_rlhf_toy", [
        "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--sft-steps", "4", "--sft-batch-size", "16",
        "--num-pairs", "32", "--heldout-pairs", "16", "--rm-epochs", "1", "--rm-batch-size", "16",
        "--ppo-iterations", "2", "--rollout-batch-size", "16", "--num-minibatches", "2", "--update-epochs", "1",
        "--direct-epochs", "1", "--direct-batch-size", "16", "--direct-eval-every", "1", "--eval-episodes", "16",
    ], False), id="ppo_rlhf_toy"),
]


@pytest.fixture(scope="module", params=RUNS)
def cuda_run(request, tmp_path_factory):
    """One short training run with --cuda --save-model in a folder of its own, shared by the tests below. It
    records the devices the normalisers' statistics were on at every update (RunningMeanStd.update and
    RewardScaler.__call__, wrapped) and the GPU memory the run allocated."""
    name, flags, normalises = request.param
    module = importlib.import_module(name)
    cwd = tmp_path_factory.mktemp(name)
    devices = set()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for cls, method, statistics in (("RunningMeanStd", "update", lambda self: (self.mean, self.var)),
                                        ("RewardScaler", "__call__", lambda self: (self.returns,
                                                                                   self.return_rms.mean))):
            if hasattr(module, cls):
                original = getattr(getattr(module, cls), method)

                def spy(self, *args, _original=original, _statistics=statistics):
                    result = _original(self, *args)
                    devices.update(t.device.type for t in _statistics(self))
                    return result

                patch.setattr(getattr(module, cls), method, spy)
        allocated_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        summary = module.main(flags + ["--cuda", "--save-model"])
        peak_memory = torch.cuda.max_memory_allocated() - allocated_before
    (run_dir,) = (cwd / "runs").iterdir()
    return SimpleNamespace(name=name, run_dir=run_dir, summary=summary, normalises=normalises,
                           normaliser_devices=devices, peak_memory=peak_memory)


def test_each_script_trains_two_iterations_on_cuda(cuda_run):
    """Two iterations logged with finite losses, GPU memory used, and the normalisers' statistics (where the
    run has them) on the GPU at every update."""
    rows = [json.loads(line) for line in (cuda_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    if cuda_run.name == "ppo_rlhf_toy":
        rows = [row for row in rows if row.get("stage") == "ppo"]
    assert [row["iteration"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("policy_loss", "value_loss", "approx_kl_k3"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row)
    assert cuda_run.peak_memory > 0, "nothing was allocated on the GPU: --cuda did not reach the device"
    assert cuda_run.normaliser_devices == ({"cuda"} if cuda_run.normalises else set())


def test_a_checkpoint_from_a_cuda_run_evaluates_on_a_cpu(cuda_run):
    """--eval-checkpoint (without --cuda) in a process that sees no GPU (CUDA_VISIBLE_DEVICES empty), as on a
    CPU-only machine: the checkpoint loads and the evaluation runs."""
    checkpoint = cuda_run.run_dir / f"{cuda_run.name}.pt"
    assert checkpoint.exists()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / f"{cuda_run.name}.py"), "--eval-checkpoint", str(checkpoint),
         "--eval-episodes", "3"],  # ppo_rlhf_toy.py shows 3 samples: it needs 3 or more
        cwd=cuda_run.run_dir, env=env, capture_output=True, text=True, timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("PPO" if cuda_run.name == "ppo_rlhf_toy" else "eval ") in done.stdout, done.stdout[-2000:]
