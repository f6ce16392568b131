"""Incremental merging: new teachers, the previous student as teacher for old styles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dmm.atomic import DmmError
from dmm.distill.trainer import distill
from tests.test_distill import _launch_two, make_cfg, max_diff, student_weights


@pytest.fixture(scope="module")
def previous(distill_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prev") / "run"
    distill(make_cfg(distill_data, out, ["pastel", "neon", "sepia"], steps=2))
    return out / "student"


def test_appending_styles_leaves_old_styles_unchanged(previous):
    import copy

    from dmm.student.model import StyleStudent

    prev = StyleStudent.from_pipeline(previous)
    grown = copy.deepcopy(prev)
    grown.set_codebook(prev.style_codebook.append_styles(["stripes"]))
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 16, 64)
    for name in prev.style_names:
        assert torch.equal(prev(x, t, cond, style=name), grown(x, t, cond, style=name))


def test_incremental_merge_adds_styles_and_records_lineage(distill_data, previous, tmp_path):
    from dmm.student.pipeline import DMMStudentPipeline

    out = tmp_path / "inc"
    cfg = make_cfg(distill_data, out, ["stripes"], steps=3, init_from=previous, old_style_ratio=0.5)
    final = distill(cfg)
    pipe = DMMStudentPipeline.from_pretrained(final, local_files_only=True)
    assert pipe.style_names == ["pastel", "neon", "sepia", "stripes"]
    lineage = json.loads((final / "dmm_lineage.json").read_text())
    assert lineage["merge_kind"] == "incremental"
    assert lineage["old_styles"] == ["pastel", "neon", "sepia"]
    assert lineage["new_styles"] == ["stripes"]
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # Both kinds of source contribute: the new teacher, and the frozen previous
    # student once per old style (each with a full micro-batch every step).
    old = [f"previous-student:{n}" for n in ("pastel", "neon", "sepia")]
    assert rec["loss_score/stripes"] > 0 and all(f"loss_score/{o}" in rec for o in old)
    ranks = json.loads((out / "rank-0.json").read_text())
    assert ranks["samples"] == {"stripes": 3 * 4, **{o: 3 * 4 for o in old}}


def test_without_regularization_only_new_teachers_train(distill_data, previous, tmp_path):
    out = tmp_path / "noreg"
    distill(
        make_cfg(distill_data, out, ["stripes"], steps=1, init_from=previous, old_style_ratio=0.0)
    )
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert not any(k.startswith("loss_score/previous-student") for k in rec)


def test_name_collision_needs_replace(distill_data, previous, tmp_path):
    cfg = make_cfg(distill_data, tmp_path / "x", ["neon"], steps=1, init_from=previous)
    with pytest.raises(DmmError, match="collide with existing styles: neon"):
        distill(cfg)
    cfg = make_cfg(
        distill_data, tmp_path / "y", ["neon"], steps=1, init_from=previous, replace=["neon"]
    )
    final = distill(cfg)
    lineage = json.loads((final / "dmm_lineage.json").read_text())
    assert lineage["old_styles"] == ["pastel", "sepia"] and lineage["styles"] == [
        "pastel",
        "neon",
        "sepia",
    ]


def test_retired_style_is_gone_and_generation_by_it_fails(distill_data, previous, tmp_path):
    final = distill(
        make_cfg(
            distill_data, tmp_path / "r", ["stripes"], steps=1, init_from=previous, retire=["sepia"]
        )
    )
    assert json.loads((final / "dmm_lineage.json").read_text())["styles"] == [
        "pastel",
        "neon",
        "stripes",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "dmm.cli", "generate", "--student", str(final), "--style", "sepia",
         "--out", str(tmp_path / "gen"), "--steps", "1", "a red circle"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2
    assert "unknown style 'sepia'; known styles: pastel, neon, stripes" in r.stderr
    assert not (tmp_path / "gen").exists()


def test_retire_without_training_keeps_other_styles_bit_identical(previous, tmp_path):
    from dmm.student.codebook import StyleCodebook
    from dmm.student.edit import retire_styles

    out = retire_styles(previous, ["neon"], tmp_path / "retired")
    old = StyleCodebook.from_pretrained(previous / "style_codebook")
    new = StyleCodebook.from_pretrained(out / "style_codebook")
    assert new.style_names == ["pastel", "sepia"]
    assert torch.equal(new.vectors[0], old.vectors[0]) and torch.equal(
        new.vectors[1], old.vectors[2]
    )
    with pytest.raises(DmmError, match="cannot retire unknown styles: gothic"):
        retire_styles(previous, ["gothic"], tmp_path / "r2")


def test_previous_student_on_another_base_is_refused(distill_data, previous, tmp_path):
    import shutil

    moved = tmp_path / "prev"
    shutil.copytree(previous, moved)
    lineage = json.loads((moved / "dmm_lineage.json").read_text())
    lineage["base_sha256"] = "0" * 64
    (moved / "dmm_lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(DmmError, match="merged on another base; run a full merge"):
        distill(make_cfg(distill_data, tmp_path / "x", ["stripes"], steps=1, init_from=moved))


def test_auto_ratio_gives_every_style_its_full_merge_share(distill_data, tmp_path, previous):
    from dmm.distill.trainer import make_sources

    cfg = make_cfg(distill_data, tmp_path / "x", ["stripes"], init_from=previous,
                   old_style_batches="shared")  # fmt: skip
    assert cfg.old_style_ratio == "auto"
    sources = make_sources(cfg, ["pastel", "neon", "sepia"])
    assert [s.name for s in sources] == ["stripes", "previous-student"]
    assert [s.weight for s in sources] == pytest.approx([0.25, 0.75])
    assert [s.weight for s in make_sources(cfg, [])] == [1.0]  # a full merge
    fixed = make_cfg(distill_data, tmp_path / "x", ["stripes"], init_from=previous,
                     old_style_ratio=0.4, old_style_batches="shared")  # fmt: skip
    assert [s.weight for s in make_sources(fixed, ["pastel"])] == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError, match="old_style_ratio must be 'auto' or in"):
        make_cfg(distill_data, tmp_path / "x", ["stripes"], old_style_ratio=1.5)


def test_config_rejects_inconsistent_incremental_fields(distill_data, tmp_path, previous):
    with pytest.raises(ValueError, match="retire/replace need init_from"):
        make_cfg(distill_data, tmp_path / "x", ["stripes"], retire=["neon"])
    with pytest.raises(ValueError, match="replace lists styles with no new teacher"):
        make_cfg(distill_data, tmp_path / "x", ["stripes"], init_from=previous, replace=["neon"])


def test_old_styles_are_replayed_from_the_previous_student(distill_data, previous, tmp_path):
    # With replay, each old-style x0 is the previous student's own image of one
    # old style, and that style is what the step asks of it.
    import torch

    from dmm.distill.config import DistillConfig
    from dmm.distill.trainer import TeacherData, replay_old_styles
    from dmm.student.model import StyleStudent

    zoo, root, teachers = distill_data
    prev = StyleStudent.from_pipeline(previous)
    pool = TeacherData.load(root / "samples" / "sepia", "sepia")
    cfg = DistillConfig(
        base=zoo / "base", init_from=previous, old_style_samples=5, old_style_sample_steps=2,
        teachers=[{"name": "sepia", "path": teachers["sepia"], "samples": root / "samples" / "sepia"}],
    )  # fmt: skip
    index = torch.tensor([prev.style_names.index(n) for n in prev.style_names])
    data = replay_old_styles(prev, pool, len(index), index, cfg, torch.device("cpu"), torch.float32)
    assert data.latents.shape == (5 * len(index), *pool.latents.shape[1:])
    assert data.styles.tolist() == [i for i in range(len(index)) for _ in range(5)]
    assert torch.isfinite(data.latents).all()
    # Not the pool's x0: freshly sampled, and different per style.
    assert not any(torch.allclose(data.latents[0], x) for x in pool.latents)
    assert not torch.allclose(data.latents[:5], data.latents[5:10])
    again = replay_old_styles(
        prev, pool, len(index), index, cfg, torch.device("cpu"), torch.float32
    )
    assert torch.equal(data.latents, again.latents)  # seeded: a resumed run replays the same x0


def test_shared_old_style_batch_with_replayed_x0_trains_them(distill_data, previous, tmp_path):
    out = tmp_path / "replay"
    cfg = make_cfg(
        distill_data, out, ["stripes"], steps=1, init_from=previous, old_style_batches="shared",
        old_style_x0="previous_student", old_style_samples=4, old_style_sample_steps=2,
    )  # fmt: skip
    distill(cfg)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # The replayed old-style steps ran; before any update the student is its
    # parent on old styles, so it matches the parent's predictions exactly.
    assert rec["loss_score/previous-student"] == 0.0


def test_per_style_old_batches_give_each_old_style_a_full_micro_batch(
    distill_data, previous, tmp_path
):
    from dmm.distill.trainer import make_sources

    cfg = make_cfg(distill_data, tmp_path / "x", ["stripes"], init_from=previous)
    assert cfg.old_style_batches == "per_style"  # the default
    sources = make_sources(cfg, ["pastel", "neon", "sepia"])
    assert [(s.name, s.old_style) for s in sources] == [
        ("stripes", None),
        ("previous-student:pastel", 0),
        ("previous-student:neon", 1),
        ("previous-student:sepia", 2),
    ]
    # The same shares as one shared micro-batch: each style as in a full merge.
    assert [s.weight for s in sources] == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("x0", ["previous_student", "new_teachers"])
def test_per_style_old_batches_train_each_old_style_from_the_parent(
    distill_data, previous, tmp_path, x0
):
    out = tmp_path / "per-style"
    cfg = make_cfg(
        distill_data, out, ["stripes"], steps=1, init_from=previous, old_style_x0=x0,
        old_style_batches="per_style", old_style_samples=4, old_style_sample_steps=2,
    )  # fmt: skip
    distill(cfg)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # Each old style ran its own micro-batch; before any update the student is
    # its parent on old styles, so each matches the parent exactly, while the
    # new style (no effect yet) does not match its teacher.
    for name in ("pastel", "neon", "sepia"):
        assert rec[f"loss_score/previous-student:{name}"] == 0.0
    assert rec["loss_score/stripes"] > 0


def test_per_style_old_batches_on_two_processes_match_one(distill_data, previous, tmp_path):
    """The old styles' sources spread over the ranks like teachers do."""
    import yaml

    single = tmp_path / "single"
    distill(make_cfg(distill_data, single, ["stripes"], steps=2, init_from=previous))
    double = tmp_path / "double"
    cfg = make_cfg(distill_data, double, ["stripes"], steps=2, init_from=previous)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"distill": json.loads(cfg.model_dump_json())}))
    r = _launch_two(cfg_file, 29513)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((double / f"rank-{i}.json").read_text()) for i in range(2)]
    assert set(ranks[0]["samples"]) == {"stripes", "previous-student:neon"}
    assert set(ranks[1]["samples"]) == {"previous-student:pastel", "previous-student:sepia"}
    assert max_diff(student_weights(single), student_weights(double)) < 1e-5


def test_replayed_x0_split_by_old_style():
    import torch

    from dmm.distill.trainer import TeacherData

    emb = torch.arange(6.0).view(6, 1, 1)
    data = TeacherData(
        torch.arange(6.0).view(6, 1, 1, 1), emb, emb, emb[:1], emb[:1],
        styles=torch.tensor([0, 0, 1, 1, 2, 2]),
    )  # fmt: skip
    one = data.for_style(1)
    assert one.latents.flatten().tolist() == [2.0, 3.0]
    assert one.base_embeds.flatten().tolist() == [2.0, 3.0]
    assert one.styles.tolist() == [1, 1]
    pooled = TeacherData(data.latents, emb, emb, emb[:1], emb[:1])
    assert pooled.for_style(1) is pooled  # new-teacher x0 serve every old style


def test_style_warmup_moves_only_the_style_pathway(distill_data, previous, tmp_path):
    # For style_warmup_steps only the style MLP and codebook train: the UNet's
    # own weights leave the warmup exactly as the previous student had them.
    from safetensors.torch import load_file

    from dmm.distill.trainer import is_style_param
    from tests.test_distill import student_weights

    out = tmp_path / "warm"
    distill(
        make_cfg(distill_data, out, ["stripes"], steps=2, init_from=previous, style_warmup_steps=2)
    )
    before = load_file(previous / "unet" / "diffusion_pytorch_model.safetensors")
    after = student_weights(out)
    unet = [k for k in before if not is_style_param(f"unet.{k}")]
    style = [k for k in before if is_style_param(f"unet.{k}")]
    assert unet and style
    assert all(torch.equal(before[k], after[k]) for k in unet)
    assert any(not torch.equal(before[k], after[k]) for k in style)
