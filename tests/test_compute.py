"""The distillation launcher: `accelerate launch` must not starve CPU runs of threads."""

from __future__ import annotations

import os
import subprocess
import sys

from pipelines.defs.resources import ComputeResource


def test_launch_keeps_cpu_threads(tmp_path, monkeypatch):
    # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise; the
    # launched process must see the machine's cores (here: shared by 1 process).
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "probe_threads.py").write_text(
        "import os, torch\nprint('THREADS', os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())\n"
    )
    res = ComputeResource(device="cpu")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *res.launch_args()]
    cmd += ["-m", "probe_threads"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("THREADS"))
    want = max(1, (os.cpu_count() or 1))
    assert line.split()[1:] == [str(want), str(want)], out.stdout + out.stderr


def test_cpu_threads_follow_env_and_process_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ComputeResource().cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert ComputeResource(num_processes=2).cpu_threads() == max(1, (os.cpu_count() or 1) // 2)
    # One process on this machine trains in place: no launcher, nothing to pass on.
    assert ComputeResource().launch_args() == [] and ComputeResource().env() == {}
    args = ComputeResource(num_processes=2).launch_args()
    assert "--num_cpu_threads_per_process" in args and "--multi_gpu" in args
    assert (
        ComputeResource(num_processes=2)
        .env()["DMM_ACCELERATE_ARGS"]
        .startswith("--num_processes 2")
    )
