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
