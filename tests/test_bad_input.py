"""The bad-input suite: every case fails with one clear line and leaves nothing behind.

Each case runs a `dmm` command in a sandbox project (data/, a DVC cache and an
MLflow store) and compares a snapshot of those three trees before and after.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.bad_input

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("DMM_DEBUG", None)


@pytest.fixture(scope="module")
def sandbox(mini_zoo, distill_data, tmp_path_factory):
    zoo, manifest = mini_zoo
    _, root, _ = distill_data
    box = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(zoo, box / "data/zoo")
    shutil.copytree(root / "prompts", box / "data/prompts")
    shutil.copytree(root / "samples", box / "data/samples")
    (box / ".dvc/cache").mkdir(parents=True)
    (box / ".dvc/cache/00").mkdir()
    (box / "mlflow").mkdir()
    (box / "mlflow/mlflow.db").write_bytes(b"")
    (box / "data/teachers.yaml").write_text(
        "base: zoo:base\nteachers:\n  - {name: pastel, source: 'zoo:pastel'}\n"
    )
    return box


def snapshot(box: Path) -> dict:
    out = {}
    for sub in ("data", ".dvc/cache", "mlflow"):
        for p in sorted((box / sub).rglob("*")):
            st = p.lstat()
            out[str(p.relative_to(box))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def run(
    box: Path, args: list[str], preexec=None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", *args], cwd=box, env=ENV, capture_output=True,
        text=True, timeout=timeout, preexec_fn=preexec,
    )  # fmt: skip


def assert_clean_failure(box: Path, args: list[str], expect: str, preexec=None, **kw) -> str:
    before = snapshot(box)
    r = run(box, args, preexec=preexec, **kw)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1, r.stderr[-3000:]
    assert expect.lower() in errors[0].lower(), errors[0]
    assert snapshot(box) == before, "the failed command changed data/, the DVC cache or mlflow/"
    return errors[0]


def write_distill_cfg(box: Path, teachers: list[dict], **extra) -> Path:
    import yaml

    cfg = {"base": "data/zoo/base", "teachers": teachers, "output_dir": "data/student",
           "steps": 1, "batch_size": 2, "progress": False, **extra}  # fmt: skip
    f = box.parent / f"cfg-{time.monotonic_ns()}.yaml"
    f.write_text(yaml.safe_dump({"distill": cfg}))
    return f


def T(name: str, teacher: str = "pastel") -> dict:
    return {
        "name": name,
        "path": f"data/zoo/teachers/{teacher}",
        "samples": f"data/samples/{teacher}",
    }


def tiny_file(path: Path, **tensors) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---- zoo -----------------------------------------------------------------------------------


def test_zoo_bad_seed(sandbox):
    assert_clean_failure(
        sandbox, ["zoo", "build", "--miniature", "--seed", "-5", "--out", "data/zoo2"], "seed"
    )


def test_zoo_invalid_config(sandbox, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("zoo:\n  styles: [pastel, gothic]\n")
    assert_clean_failure(
        sandbox, ["zoo", "build", "--config", str(cfg), "--out", "data/zoo2"], "gothic"
    )


def test_zoo_output_under_a_file(sandbox):
    assert_clean_failure(
        sandbox, ["zoo", "build", "--miniature", "--out", "data/teachers.yaml/zoo"], "not writable"
    )


def _disk_limit(limit: int):
    def apply():
        # Without this the kernel kills the writer (SIGXFSZ) instead of failing the write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_midway_leaves_no_partial_zoo(sandbox):
    # 2 MB passes the small files but not the first UNet weights (~7 MB).
    assert_clean_failure(
        sandbox,
        ["zoo", "build", "--miniature", "--out", "data/zoo2"],
        "error",
        preexec=_disk_limit(2_000_000),
    )
    assert not list((sandbox / "data").glob(".zoo2*"))


# ---- prompts -------------------------------------------------------------------------------


def test_prompts_missing_file(sandbox):
    assert_clean_failure(
        sandbox, ["prompts", "--source", "nope.txt", "--out", "data/p2"], "nope.txt"
    )


def test_prompts_empty_file(sandbox, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n")
    assert_clean_failure(sandbox, ["prompts", "--source", str(f), "--out", "data/p2"], "empty")


def test_prompts_bad_jsonl_line(sandbox, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a"}\n{not json\n')
    assert_clean_failure(sandbox, ["prompts", "--source", str(f), "--out", "data/p2"], "line 2")


# ---- sampling ------------------------------------------------------------------------------


def test_sample_unknown_teacher(sandbox):
    assert_clean_failure(
        sandbox, ["sample", "--zoo", "data/zoo", "--only", "gothic", "--out", "data/s2"], "gothic"
    )


def test_sample_missing_base(sandbox):
    assert_clean_failure(
        sandbox,
        [
            "sample",
            "--teacher",
            "x=data/zoo/teachers/pastel",
            "--base",
            "data/nobase",
            "--out",
            "data/s2",
        ],
        "nobase",
    )


# ---- distillation ----------------------------------------------------------------------------


def test_distill_missing_samples(sandbox):
    cfg = write_distill_cfg(sandbox, [{**T("pastel"), "samples": "data/samples/none"}])
    assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "no sample cache")


def test_distill_duplicate_teacher_names(sandbox):
    cfg = write_distill_cfg(sandbox, [T("pastel"), T("pastel", "neon")])
    assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "duplicate teacher names")


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "ünïcode", "with space", ".hidden", "x" * 65, ""]
)
def test_distill_bad_style_names(sandbox, name):
    cfg = write_distill_cfg(sandbox, [T(name)])
    assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "teachers.0.name")


def test_distill_wrong_architecture(sandbox, tmp_path):
    from dmm.zoo.models import make_unet

    odd = tmp_path / "odd"
    shutil.copytree(sandbox / "data/zoo/teachers/pastel", odd)
    unet = make_unet(8)
    unet.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
    unet.save_pretrained(odd / "unet")
    cfg = write_distill_cfg(
        sandbox, [{"name": "odd", "path": str(odd), "samples": "data/samples/pastel"}]
    )
    assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "differs from the base")


def test_distill_truncated_teacher_weights(sandbox, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(sandbox / "data/zoo/teachers/pastel", bad)
    w = bad / "unet/diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    cfg = write_distill_cfg(
        sandbox, [{"name": "t", "path": str(bad), "samples": "data/samples/pastel"}]
    )
    assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "error")


def test_distill_unknown_config_key(sandbox):
    cfg = write_distill_cfg(sandbox, [T("pastel")], learning_rate=1)
    assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "learning_rate")


def test_distill_concurrent_second_run(sandbox):
    out = sandbox.parent / "concurrent-out"
    cfg = write_distill_cfg(
        sandbox, [T("pastel")], steps=400, output_dir=str(out), checkpoint_every=1000
    )
    first = subprocess.Popen([sys.executable, "-m", "dmm.cli", "distill", "--config", str(cfg)], cwd=sandbox,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_clean_failure(sandbox, ["distill", "--config", str(cfg)], "already running")
    finally:
        first.kill()
        first.wait()


# ---- generation, merging, evaluation ---------------------------------------------------------


@pytest.fixture(scope="module")
def student(sandbox, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from dmm.student.model import StyleStudent

    out = tmp_path_factory.mktemp("student") / "student"
    unet = UNet2DConditionModel.from_pretrained(sandbox / "data/zoo/base/unet")
    StyleStudent.from_base(unet, ["pastel", "neon"]).save_pipeline(out, sandbox / "data/zoo/base")
    return out


def test_generate_unknown_style(sandbox, student):
    err = assert_clean_failure(
        sandbox, ["generate", "--student", str(student), "--style", "gothic", "--out", "data/gen", "x"],
        "unknown style 'gothic'",
    )  # fmt: skip
    assert "pastel, neon" in err


def test_generate_bad_style_json(sandbox, student):
    assert_clean_failure(
        sandbox, ["generate", "--student", str(student), "--style", "{bad", "--out", "data/gen", "x"],
        "not valid JSON",
    )  # fmt: skip


def test_generate_missing_student(sandbox):
    assert_clean_failure(
        sandbox, ["generate", "--student", "data/none", "--style", "a", "x"], "data/none"
    )


def _teacher_files(tmp_path: Path) -> tuple[Path, Path]:
    base = tiny_file(tmp_path / "base.safetensors", w=torch.zeros(4, 4))
    return base, tiny_file(tmp_path / "t1.safetensors", w=torch.ones(4, 4))


def test_merge_truncated_safetensors(sandbox, tmp_path):
    base, t1 = _teacher_files(tmp_path)
    bad = tmp_path / "t2.safetensors"
    bad.write_bytes(t1.read_bytes()[:20])
    assert_clean_failure(
        sandbox, ["merge", "--method", "weighted", "--base", str(base), "--teacher", str(t1),
                  "--teacher", str(bad), "--out", "data/merged.safetensors"], "t2.safetensors",
    )  # fmt: skip


def test_merge_empty_safetensors(sandbox, tmp_path):
    base, t1 = _teacher_files(tmp_path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_clean_failure(
        sandbox, ["merge", "--method", "ties", "--base", str(base), "--teacher", str(t1),
                  "--teacher", str(empty), "--out", "data/merged.safetensors"], "empty.safetensors",
    )  # fmt: skip


def test_merge_shape_mismatch(sandbox, tmp_path):
    base, t1 = _teacher_files(tmp_path)
    odd = tiny_file(tmp_path / "odd.safetensors", w=torch.ones(3, 4))
    assert_clean_failure(
        sandbox, ["merge", "--method", "dare_ties", "--base", str(base), "--teacher", str(t1),
                  "--teacher", str(odd), "--out", "data/merged.safetensors"], "w",
    )  # fmt: skip


def test_evaluate_too_few_images(sandbox, student, tmp_path):
    import yaml

    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"evaluate": {
        "student": str(student), "teachers": [{"name": "pastel", "path": "data/zoo/teachers/pastel"},
                                               {"name": "neon", "path": "data/zoo/teachers/neon"}],
        "prompts": "data/prompts/eval.jsonl", "classifier": "data/zoo/classifier",
        "output_dir": "data/evaluation", "images_per_style": 20}}))  # fmt: skip
    assert_clean_failure(sandbox, ["evaluate", "--config", str(cfg)], "too few")


def test_evaluate_style_count_mismatch(sandbox, student, tmp_path):
    import yaml

    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"evaluate": {
        "student": str(student), "teachers": [{"name": "pastel", "path": "data/zoo/teachers/pastel"}],
        "prompts": "data/prompts/eval.jsonl", "classifier": "data/zoo/classifier",
        "output_dir": "data/evaluation"}}))  # fmt: skip
    assert_clean_failure(sandbox, ["evaluate", "--config", str(cfg)], "style count/names differ")


def test_suite_has_at_least_25_cases():
    import inspect

    mod = sys.modules[__name__]
    count = 0
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
        if name.startswith("test_") and name != "test_suite_has_at_least_25_cases":
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            count += len(marks[0].args[1]) if marks else 1
    print(f"\nbad-input cases in this file: {count}")
    assert count >= 25
