"""--capture-video on a machine with no display (issue 28): env 0 is recorded to videos/<run_name>/*.mp4, and the
frames show something (cleanrl #468: MuJoCo videos that came out black). Skipped where the optional packages
(moviepy; pygame for classic control; an offscreen OpenGL such as Mesa's EGL for MuJoCo) are absent."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT

STEPS = 40  # frames recorded before the env is closed (close() writes the episode so far)


def headless_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def offscreen_gl_works() -> bool:
    probe = ("import gymnasium as gym; e = gym.make('HalfCheetah-v4', render_mode='rgb_array'); e.reset(seed=0); "
             "assert e.render().any()")
    env = {**headless_env(), "MUJOCO_GL": "egl"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0


def record(tmp_path, script: str, env_id: str, num_envs: int) -> subprocess.CompletedProcess:
    """Build the script's own envs with --capture-video in a fresh process with no display, step them, close."""
    code = textwrap.dedent(f"""
        import numpy as np
        import {script} as script
        args = script.Args(env_id={env_id!r}, num_envs={num_envs}, capture_video=True)
        envs = script.make_envs(args, "video-test")
        envs.reset(seed=1)
        envs.action_space.seed(1)
        for _ in range({STEPS}):
            envs.step(envs.action_space.sample())
        envs.close()
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=headless_env(), capture_output=True,
                          text=True, timeout=300)


def frames_of(path) -> np.ndarray:
    from moviepy import VideoFileClip

    clip = VideoFileClip(str(path))
    try:
        return np.stack(list(clip.iter_frames()))
    finally:
        clip.close()


needs_moviepy = pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="moviepy not installed")


@needs_moviepy
@pytest.mark.skipif(importlib.util.find_spec("pygame") is None, reason="pygame not installed")
def test_cartpole_video_is_written_headless(tmp_path):
    done = record(tmp_path, "ppo_discrete", "CartPole-v1", 4)
    assert done.returncode == 0, done.stderr
    videos = sorted((tmp_path / "videos" / "video-test").glob("*.mp4"))
    assert videos, "no video written"
    frames = frames_of(videos[0])
    assert len(frames) >= 5
    assert all(frame.std() > 1 for frame in frames), "a frame is one flat colour"


@needs_moviepy
@pytest.mark.parametrize("script,num_envs", [("ppo_continuous", 1), ("trpo", 2)])
def test_halfcheetah_video_is_written_headless_and_not_black(tmp_path, script, num_envs):
    """One env in this process, and two in worker processes (env 0 records in its worker)."""
    if not offscreen_gl_works():
        pytest.skip("no offscreen OpenGL for MuJoCo (install Mesa's EGL: apt install libegl1)")
    done = record(tmp_path, script, "HalfCheetah-v4", num_envs)
    assert done.returncode == 0, done.stderr
    assert "MuJoCo renders offscreen with EGL" in done.stdout
    videos = sorted((tmp_path / "videos" / "video-test").glob("*.mp4"))
    assert videos, "no video written"
    frames = frames_of(videos[0])
    assert len(frames) >= 5
    assert all(frame.std() > 1 for frame in frames), "a frame is one flat colour (the black-video bug)"
    assert frames.mean() > 10, "the video is black"
