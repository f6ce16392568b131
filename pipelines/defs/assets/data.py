"""The data layer: teacher manifest, base model, prompts, teachers and their samples.

Every asset that writes under data/ does so through ``dvc repro <stage>``, so
DVC records (and pushes) each version and ``dvc repro`` alone rebuilds the
same layer without Dagster.
"""

import json
from pathlib import Path

import dagster as dg

from dmm import layout
from pipelines.defs.metadata import dvc_metadata, md_table
from pipelines.defs.partitions import SINGLE_RUN, TEACHER_PARTITIONS, sync_partitions
from pipelines.defs.resources import DvcResource, ProjectResource

GROUP = "data"
# Bumped when an asset's own code changes what it makes (its stages are DVC's concern).
CODE_VERSION = "2"


def teacher_records(project: ProjectResource, names: list[str]) -> dict[str, dict]:
    from dmm.atomic import DmmError
    from dmm.plan import teacher_records as read_records

    try:
        return read_records(project.root, names)
    except DmmError as exc:
        raise dg.Failure(description=str(exc)) from exc


@dg.asset(
    group_name=GROUP,
    kinds={"yaml"},
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="data/teachers.yaml, validated; keeps one `teachers` partition per entry.",
)
def teacher_manifest(context: dg.AssetExecutionContext, project: ProjectResource):
    manifest = project.manifest()
    names = [t.name for t in manifest.teachers]
    # The sensor does this on a running deployment; doing it here as well lets
    # a headless `dagster asset materialize` (make demo) run without a daemon.
    added, removed = sync_partitions(context.instance, names)
    if added or removed:
        context.log.info("teacher partitions: added %s, removed %s", added, removed)
    sha = project.manifest_sha256()
    table = md_table(
        ["teacher", "source", "pinned sha256", "allow_pickle"],
        [(t.name, t.origin, t.sha256 or "-", t.allow_pickle) for t in manifest.teachers],
    )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(project.path(layout.MANIFEST))),
            "manifest_sha256": sha,
            "base": manifest.base,
            "num_teachers": len(names),
            "teachers": dg.MetadataValue.md(table),
            "partitions_added": dg.MetadataValue.json(added),
            "partitions_removed": dg.MetadataValue.json(removed),
        },
        data_version=dg.DataVersion(sha),
    )


@dg.asset(
    group_name=GROUP,
    deps=[teacher_manifest],
    kinds={"dvc", "diffusers"},
    pool="dvc",
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="The manifest's base pipeline, and the toy zoo with its style classifier "
    "(`dvc repro zoo`).",
)
def base_model(context: dg.AssetExecutionContext, project: ProjectResource, dvc: DvcResource):
    from dmm.hashing import weights_sha256

    manifest = project.manifest()
    # The zoo is built for every base: its style classifier is evaluation's feature net.
    dvc.repro(context, ["zoo"])
    base = project.base_dir(manifest)
    zoo = json.loads(project.path(layout.ZOO).joinpath("zoo.json").read_text())
    unet_sha = weights_sha256(base / "unet")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(base)),
            "unet_sha256": unet_sha,
            "zoo_teachers": dg.MetadataValue.json(list(zoo["teachers"])),
            "style_classifier_accuracy": float(zoo["metrics"]["classifier_accuracy"]),
            "zoo_fingerprint": zoo["fingerprint"],
            **dvc_metadata(dvc.out_hashes("zoo")),
        },
        data_version=dg.DataVersion(unet_sha),
    )


@dg.asset(
    group_name=GROUP,
    deps=[base_model],
    kinds={"dvc"},
    pool="dvc",
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    description="Train / eval prompt sets (`dvc repro prompts`).",
)
def prompt_set(context: dg.AssetExecutionContext, project: ProjectResource, dvc: DvcResource):
    dvc.repro(context, ["prompts"])
    info = json.loads(project.path(layout.PROMPTS).joinpath("prompts.json").read_text())
    train = project.path(layout.PROMPTS).joinpath("train.jsonl").read_text().splitlines()
    examples = [json.loads(line)["prompt"] for line in train[:5] if line.strip()]
    hashes = dvc.out_hashes("prompts")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(project.path(layout.PROMPTS))),
            "train": info["counts"]["train"],
            "eval": info["counts"]["eval"],
            "examples": dg.MetadataValue.json(examples),
            **dvc_metadata(hashes),
        },
        data_version=dg.DataVersion(next(iter(hashes.values()), info["sha256"]["train.jsonl"])),
    )


@dg.asset(
    group_name=GROUP,
    partitions_def=TEACHER_PARTITIONS,
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    deps=[teacher_manifest, base_model],
    kinds={"dvc", "diffusers"},
    pool="dvc",
    description="One teacher per partition: fetched or built, validated against the base, "
    "converted and hashed into data/teachers/<name> (`dvc repro teachers@<i>`).",
)
def teachers(context: dg.AssetExecutionContext, project: ProjectResource, dvc: DvcResource):
    manifest = project.manifest()
    index = {t.name: i for i, t in enumerate(manifest.teachers)}
    names = list(context.partition_keys)
    gone = [n for n in names if n not in index]
    if gone:
        raise dg.Failure(description=f"teachers {gone} are no longer in {layout.MANIFEST}")
    stages = [layout.teacher_stage(index[n]) for n in names]
    dvc.repro(context, stages)
    records = teacher_records(project, names)
    hashes = {p: h for s in stages for p, h in dvc.out_hashes(s).items()}
    table = md_table(
        ["teacher", "source", "sha256", "own text encoder"],
        [
            (n, r["source"], r.get("sha256", "?"), r.get("trained_text_encoder", "?"))
            for n, r in records.items()
        ],
    )
    metadata: dict = {"teachers": dg.MetadataValue.md(table), **dvc_metadata(hashes)}
    if len(names) == 1:
        metadata["sha256"] = records[names[0]].get("sha256", "")
        metadata["path"] = dg.MetadataValue.path(str(project.path(layout.TEACHERS) / names[0]))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=GROUP,
    partitions_def=TEACHER_PARTITIONS,
    backfill_policy=SINGLE_RUN,
    code_version=CODE_VERSION,
    deps=[teachers, prompt_set],
    kinds={"dvc", "safetensors"},
    pool="dvc",
    description="Teacher-generated x0 latents and text embeddings for distillation "
    "(`dvc repro samples@<i>`), checked to come from exactly the partition's teacher weights.",
)
def teacher_samples(context: dg.AssetExecutionContext, project: ProjectResource, dvc: DvcResource):
    from dmm.hashing import weights_sha256

    names = list(context.partition_keys)
    position = {t.name: i for i, t in enumerate(project.manifest().teachers)}
    gone = [n for n in names if n not in position]
    if gone:
        raise dg.Failure(description=f"teachers {gone} are no longer in {layout.MANIFEST}")
    stages = [layout.sample_stage(position[n]) for n in names]
    dvc.repro(context, stages)
    rows = []
    for name in names:
        index = json.loads((project.path(layout.SAMPLES) / name / "index.json").read_text())
        teacher_unet = Path(project.path(layout.TEACHERS)) / name / "unet"
        expected = weights_sha256(teacher_unet)
        if index["teacher_sha256"] != expected:
            raise dg.Failure(
                description=f"samples of {name!r} were drawn from UNet {index['teacher_sha256'][:12]}, "
                f"but the teacher partition holds {expected[:12]}"
            )
        rows.append((name, index["num_samples"], index["teacher_sha256"][:16], index["dtype"]))
    table = md_table(["teacher", "samples", "teacher UNet sha256", "dtype"], rows)
    metadata: dict = {
        "samples": dg.MetadataValue.md(table),
        **dvc_metadata({p: h for s in stages for p, h in dvc.out_hashes(s).items()}),
    }
    if len(names) == 1:
        metadata["num_samples"] = rows[0][1]
        metadata["path"] = dg.MetadataValue.path(str(project.path(layout.SAMPLES) / names[0]))
    return dg.MaterializeResult(metadata=metadata)
