"""The zoo end to end: miniature build, diffusers loading, reuse, bad input, full-size quality."""

import json
import subprocess
import sys
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dmm.zoo.build import build_zoo, is_built
from dmm.zoo.config import ZooConfig

DMM = [sys.executable, "-m", "dmm.cli"]


def test_every_pipeline_loads_with_diffusers_and_generates(mini_zoo):
    zoo, manifest = mini_zoo
    dirs = [zoo / "base"] + [zoo / t["path"] for t in manifest["teachers"].values()]
    assert len(dirs) >= 5
    for d in dirs:
        pipe = StableDiffusionPipeline.from_pretrained(d, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            "a small red circle in the center",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        assert out.shape == (1, 32, 32, 3)
        assert float(out.std()) > 0


def test_teachers_share_vae_and_tokenizer_and_one_tunes_its_text_encoder(mini_zoo):
    zoo, manifest = mini_zoo
    base_vae = (zoo / "base/vae/diffusion_pytorch_model.safetensors").read_bytes()
    base_te = (zoo / "base/text_encoder/model.safetensors").read_bytes()
    tuned = []
    for style, t in manifest["teachers"].items():
        d = zoo / t["path"]
        assert (d / "vae/diffusion_pytorch_model.safetensors").read_bytes() == base_vae
        assert (d / "tokenizer/tokenizer.json").read_bytes() == (
            zoo / "base/tokenizer/tokenizer.json"
        ).read_bytes()
        same_te = (d / "text_encoder/model.safetensors").read_bytes() == base_te
        assert same_te != t["trained_text_encoder"], style
        if t["trained_text_encoder"]:
            tuned.append(style)
    assert tuned == ["neon"]


def test_manifest_records_quality_sizes_and_timings(mini_zoo):
    _, m = mini_zoo
    assert 0 <= m["metrics"]["classifier_accuracy"] <= 1
    assert set(m["metrics"]["classifier_accuracy_per_style"]) == set(m["teachers"])
    for split in ("train_captions", "held_out_captions"):
        assert set(m["metrics"]["caption_following"][split]["base"]) == {
            "shape", "colour", "position", "all"
        }  # fmt: skip
    assert m["total_bytes"] > 0 and m["timings_s"]["total"] > 0


def test_second_build_does_no_work(mini_zoo):
    zoo, manifest = mini_zoo
    cfg = ZooConfig.miniature()
    assert is_built(zoo, cfg)
    before = (zoo / "zoo.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_zoo(zoo, cfg)
    assert time.perf_counter() - t0 < 1.0
    assert again == manifest
    assert (zoo / "zoo.json").stat().st_mtime_ns == before
    assert not is_built(zoo, ZooConfig.miniature(seed=1))


def _run(args, **kw):
    return subprocess.run(DMM + args, capture_output=True, text=True, timeout=120, **kw)


def test_cli_rejects_bad_seed_in_one_line(tmp_path):
    r = _run(["zoo", "build", "--miniature", "--seed", "-1", "--out", str(tmp_path / "z")])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "seed" in lines[0], r.stderr
    assert not (tmp_path / "z").exists()


def test_cli_rejects_invalid_config(tmp_path):
    cfg = tmp_path / "params.yaml"
    cfg.write_text("zoo:\n  styles: [pastel, gothic]\n")
    r = _run(["zoo", "build", "--config", str(cfg), "--out", str(tmp_path / "z")])
    assert r.returncode == 2 and "gothic" in r.stderr and "Traceback" not in r.stderr
    cfg.write_text("zoo:\n  no_such_field: 1\n")
    r = _run(["zoo", "build", "--config", str(cfg), "--out", str(tmp_path / "z")])
    assert r.returncode == 2 and "no_such_field" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_cli_unwritable_output_dir(tmp_path):
    # A regular file where a directory is needed fails for root as well.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    r = _run(["zoo", "build", "--miniature", "--out", str(blocker / "zoo")])
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import dmm.zoo.build as build

    def boom(*a, **k):
        raise RuntimeError("simulated crash mid-build")

    monkeypatch.setattr(build, "_measure", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        build.build_zoo(tmp_path / "zoo", ZooConfig.miniature())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_zoo_styles_are_separable(full_zoo):
    """The embedded default zoo: the style classifier tells teachers apart (>= 95%)."""
    _, m = full_zoo
    metrics = m["metrics"]
    print(json.dumps({"timings_s": m["timings_s"], "metrics": metrics}, indent=1))
    assert metrics["classifier_accuracy"] >= 0.95
    assert min(metrics["classifier_accuracy_per_style"].values()) >= 0.85
    # Colour is what the tiny base follows reliably; shape comes out better than chance
    # (1/3). Position is reported but not asserted: at this size it stays near chance.
    base = metrics["caption_following"]["train_captions"]["base"]
    assert base["colour"] >= 0.8 and base["shape"] >= 0.45


def test_plain_import_dmm_makes_zoo_folders_loadable(mini_zoo):
    zoo, _ = mini_zoo
    index = json.loads((zoo / "base/model_index.json").read_text())
    assert index["vae"] == ["dmm", "PatchAutoencoder"]
    code = (
        "import dmm, sys\n"
        "assert 'dmm.zoo.autoencoder' not in sys.modules\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(zoo / 'base')!r}, local_files_only=True)\n"
        "print(type(p.vae).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("PatchAutoencoder")
