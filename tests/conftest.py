import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mini_zoo(tmp_path_factory):
    """A miniature zoo (seconds to build): every code path, few steps."""
    from dmm.zoo.build import build_zoo
    from dmm.zoo.config import ZooConfig

    out = tmp_path_factory.mktemp("zoo") / "zoo"
    manifest = build_zoo(out, ZooConfig.miniature())
    return out, manifest


@pytest.fixture(scope="session")
def full_zoo(tmp_path_factory):
    """The embedded default zoo: reused from data/zoo when up to date, else built (minutes)."""
    from pathlib import Path

    from dmm.zoo.build import build_zoo, is_built, read_manifest
    from dmm.zoo.config import ZooConfig

    cfg = ZooConfig()
    repo_zoo = Path(__file__).resolve().parents[1] / "data" / "zoo"
    if is_built(repo_zoo, cfg):
        return repo_zoo, read_manifest(repo_zoo)
    out = tmp_path_factory.mktemp("fullzoo") / "zoo"
    return out, build_zoo(out, cfg)


@pytest.fixture(scope="session")
def distill_data(mini_zoo, tmp_path_factory):
    """Prompts and teacher samples for four mini-zoo teachers plus the base itself."""
    from dmm.data.config import PromptsConfig, SampleConfig
    from dmm.data.prompts import build_prompts
    from dmm.data.samples import sample_all

    zoo, manifest = mini_zoo
    root = tmp_path_factory.mktemp("distill_data")
    build_prompts(PromptsConfig(n_train=24, n_eval=8), root / "prompts", manifest)
    teachers = {
        s: zoo / manifest["teachers"][s]["path"] for s in ["pastel", "neon", "sepia", "stripes"]
    }
    teachers["base"] = zoo / "base"
    sample_all(
        teachers, zoo / "base", root / "prompts/train.jsonl", root / "samples",
        SampleConfig(steps=2, batch_size=32), progress=False,
    )  # fmt: skip
    return zoo, root, teachers


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A miniature project checkout with the whole Dagster graph materialized once.

    Shared by the pipeline and UI tests: the build is the expensive part (minutes).
    """
    from tests.pipeline_support import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("pipeline"))
