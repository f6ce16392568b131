"""SIGKILL at random points (a step, a checkpoint write, sample caching), then resume.

Every interrupted job must end exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dmm.distill import checkpoints as ckpt
from tests.test_distill import STUDENT_UNET, make_cfg, max_diff

pytestmark = pytest.mark.crash_resume

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dmm.cli", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("kill point never reached")


def _logged_steps(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def test_distillation_survives_sigkill_mid_step_and_mid_checkpoint(distill_data, tmp_path):
    names = ["pastel", "neon"]
    steps = 24
    reference = tmp_path / "reference"
    # The reference runs like the crashed runs (a CLI process, one thread): a float
    # reduction split over another thread count differs in the last bits.
    ref = make_cfg(distill_data, reference, names, steps=steps, checkpoint_every=1, ema=True)
    ref_file = tmp_path / "reference.yaml"
    ref_file.write_text(yaml.safe_dump({"distill": json.loads(ref.model_dump_json())}))
    first = _start(["distill", "--config", str(ref_file)])
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-2000:]

    out = tmp_path / "crashy"
    cfg = make_cfg(distill_data, out, names, steps=steps, checkpoint_every=1, ema=True)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"distill": json.loads(cfg.model_dump_json())}))
    args = ["distill", "--config", str(cfg_file), "--resume", "latest"]
    rng = random.Random(1234)
    kills = {"step": 0, "checkpoint": 0}
    plan = ["checkpoint", "step", "checkpoint", "step", "step", "checkpoint", "step"]
    for where in plan:
        before = _logged_steps(out)
        proc = _start(args)
        if where == "checkpoint":
            # A checkpoint being written is a hidden temporary directory.
            ready = lambda: any((out / "checkpoints").glob(".tmp-checkpoint-*"))  # noqa: E731
        else:
            extra = rng.uniform(0.0, 0.15)
            t_seen: list[float] = []

            def ready(before=before, extra=extra, t_seen=t_seen):
                if _logged_steps(out) > before and not t_seen:
                    t_seen.append(time.monotonic())
                return bool(t_seen) and time.monotonic() - t_seen[0] >= extra

        if _kill_when(proc, ready):
            kills[where] += 1
    done = _start(args)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err.decode()[-2000:]
    print(f"\ndistill kill points survived: {kills}")
    assert kills["step"] >= 3 and kills["checkpoint"] >= 2
    assert max_diff(load_file(reference / STUDENT_UNET), load_file(out / STUDENT_UNET)) <= 1e-6
    steps_logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert all(ckpt.is_sealed(d) for _, d in ckpt.list_checkpoints(out / "checkpoints"))


def test_sample_caching_survives_sigkill(mini_zoo, distill_data, tmp_path):
    from dmm.data.samples import load_samples

    zoo, root, _ = distill_data
    prompts = root / "prompts/train.jsonl"
    common = ["sample", "--zoo", str(zoo), "--only", "pastel", "--only", "sepia",
              "--prompts", str(prompts), "--set", "steps=3", "--set", "batch_size=8",
              "--set", "shard_size=8"]  # fmt: skip
    reference = tmp_path / "reference"
    r = subprocess.run([sys.executable, "-m", "dmm.cli", *common, "--out", str(reference)],
                       env=ENV, capture_output=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    out = tmp_path / "crashy"
    kills = 0
    for target in ("pastel", "sepia", "sepia"):
        proc = _start([*common, "--out", str(out)])

        def ready(target=target):
            return (
                any(p.name.startswith(f".{target}.tmp-") for p in out.glob(".*"))
                if out.exists()
                else False
            )

        kills += _kill_when(proc, ready)
    r = subprocess.run([sys.executable, "-m", "dmm.cli", *common, "--out", str(out)],
                       env=ENV, capture_output=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    print(f"\nsample-caching kill points survived: {kills}")
    assert kills >= 2
    for name in ("pastel", "sepia"):
        a, b = load_samples(reference / name), load_samples(out / name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
