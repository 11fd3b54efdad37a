"""Tests of ppo_continuous.py's --env-backend mujoco-batch (MujocoBatchVectorEnv): bit for bit what gymnasium's
SAME_STEP vector env returns, across time limits and terminations; the same training run with either backend;
bad input refused before anything starts."""

import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import ppo_continuous

pytest.importorskip("mujoco.batch", reason="--env-backend mujoco-batch needs MuJoCo >= 4.0")


def gymnasium_reference(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """What ppo_continuous.py's gymnasium backend returns, from gymnasium's own classes."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def assert_same_step(expected: tuple, got: tuple, step: int) -> None:
    for name, a, b in zip(("obs", "rewards", "terminated", "truncated"), expected[:4], got[:4]):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} at step {step}")
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
    info_a, info_b = expected[4], got[4]
    assert ("_final_obs" in info_a) == ("_final_obs" in info_b), f"episode ends differ at step {step}"
    if "_final_obs" in info_a:
        np.testing.assert_array_equal(info_a["_final_obs"], info_b["_final_obs"])
        np.testing.assert_array_equal(info_a["_episode"], info_b["_episode"])
        for i in np.flatnonzero(info_a["_final_obs"]):
            np.testing.assert_array_equal(info_a["final_obs"][i], info_b["final_obs"][i], err_msg=f"step {step}")
        ended = info_a["_episode"]
        for key in ("r", "l"):
            np.testing.assert_array_equal(info_a["episode"][key][ended], info_b["episode"][key][ended])


@pytest.mark.parametrize("env_id,steps", [("HalfCheetah-v4", 1100), ("Hopper-v4", 2000), ("Walker2d-v4", 2000)])
def test_bit_identical_to_gymnasium(env_id, steps):
    """N=3, the same seeds and the same float32 action stream: every array equal, every step. HalfCheetah crosses
    its 1000-step time limit; random actions make Hopper and Walker2d fall (terminations) many times."""
    num_envs = 3
    reference = gymnasium_reference(env_id, num_envs)
    batched = ppo_continuous.MujocoBatchVectorEnv(env_id, num_envs, num_threads=2)
    obs_a, _ = reference.reset(seed=7)
    obs_b, _ = batched.reset(seed=7)
    np.testing.assert_array_equal(obs_a, obs_b)
    rng = np.random.default_rng(0)
    action_dim = batched.single_action_space.shape[0]
    ends = {"terminated": 0, "truncated": 0}
    for step in range(steps):
        actions = rng.uniform(-1, 1, size=(num_envs, action_dim)).astype(np.float32)
        expected, got = reference.step(actions), batched.step(actions)
        assert_same_step(expected, got, step)
        ends["terminated"] += int(expected[2].sum())
        ends["truncated"] += int(expected[3].sum())
    if env_id == "HalfCheetah-v4":
        assert ends == {"terminated": 0, "truncated": num_envs}
    else:
        assert ends["terminated"] > 10
    reference.close()
    batched.close()


def test_thread_count_does_not_change_the_numbers():
    runs = []
    for threads in (1, 2):
        envs = ppo_continuous.MujocoBatchVectorEnv("Hopper-v4", 5, num_threads=threads)
        obs, _ = envs.reset(seed=3)
        rng = np.random.default_rng(1)
        trace = [obs]
        for _ in range(300):
            obs, rewards, terminated, truncated, _ = envs.step(rng.uniform(-1, 1, (5, 3)).astype(np.float32))
            trace += [obs, rewards, terminated]
        runs.append(trace)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_wrong_action_shape_is_refused():
    envs = ppo_continuous.MujocoBatchVectorEnv("HalfCheetah-v4", 2, num_threads=1)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 6\)"):
        envs.step(np.zeros(6, dtype=np.float32))  # one row would broadcast to both envs


def metrics_of(run_root: Path) -> list[dict]:
    (run_dir,) = sorted((run_root / "runs").glob("*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time"), row.pop("sps")
    return rows


def test_training_logs_the_same_metrics_with_either_backend(tmp_path, monkeypatch):
    """Hopper-v4, 4 envs (gymnasium: AsyncVectorEnv in subprocesses), 3 iterations: identical metrics."""
    flags = ["--env-id", "Hopper-v4", "--num-envs", "4", "--num-steps", "128", "--num-minibatches", "4",
             "--update-epochs", "2", "--total-timesteps", "1536"]
    runs = {}
    for backend in ("gymnasium", "mujoco-batch"):
        (tmp_path / backend).mkdir()
        monkeypatch.chdir(tmp_path / backend)
        ppo_continuous.main([*flags, "--env-backend", backend])
        runs[backend] = metrics_of(tmp_path / backend)
    assert len(runs["gymnasium"]) == 3 and runs["gymnasium"][-1]["episodes"] > 0
    assert runs["gymnasium"] == runs["mujoco-batch"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--env-backend", "mujoco-batch", "--env-id", "Pendulum-v1"],
         "--env-backend mujoco-batch steps HalfCheetah-v4, Hopper-v4, Walker2d-v4, not Pendulum-v1"),
        (["--env-threads", "2"], "--env-threads sets the threads of --env-backend mujoco-batch"),
        (["--env-backend", "mujoco-batch", "--env-threads", "0"], "--env-threads must be >= 1"),
        (["--env-backend", "mujoco-batch", "--capture-video"], "--capture-video records a gymnasium env"),
    ],
)
def test_bad_backend_input_exits_before_training(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ppo_continuous.main(argv)
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


def test_a_mujoco_without_batch_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "mujoco.batch", None)  # as on MuJoCo < 4.0: the import fails
    with pytest.raises(SystemExit) as exit_info:
        ppo_continuous.main(["--env-backend", "mujoco-batch"])
    message = str(exit_info.value)
    assert message.startswith("error: --env-backend mujoco-batch needs MuJoCo >= 4.0") and "\n" not in message
    assert not (tmp_path / "runs").exists()
