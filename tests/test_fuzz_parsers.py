"""Property-based fuzzing of the manifest and config parsers.

Whatever the input, a parser either returns a valid object or raises one of
our user-facing errors with a one-line message: never a traceback-only crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dmm.atomic import DmmError
from dmm.config import load_stage_config, parse_overrides
from dmm.distill.config import DistillConfig
from dmm.zoo.config import ZooConfig

pytestmark = pytest.mark.bad_input
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.text(max_size=30),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True),
    st.text(max_size=12),
    st.sampled_from(["../etc", "a/b", "", " ", "ü-style", "x" * 70, "con", ".hidden", "a\nb"]),
)


def _one_line(exc: BaseException) -> None:
    text = str(exc).strip()
    if isinstance(exc, ValidationError):
        return  # rendered to one line by the CLI
    assert text and "\n" not in text, repr(text)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(list(ZooConfig.model_fields) + ["bogus"]), values, max_size=5)
)
def test_zoo_config_accepts_or_rejects_cleanly(data):
    try:
        cfg = ZooConfig(**data)
    except ValidationError:
        return
    assert cfg.seed >= 0 and len(cfg.styles) >= 2


@FUZZ
@given(st.lists(st.text(max_size=20), max_size=4))
def test_override_parser_never_crashes(items):
    try:
        out = parse_overrides(items)
    except ValueError as exc:
        _one_line(exc)
        return
    assert isinstance(out, dict)


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {"name": names, "path": st.text(max_size=8), "samples": st.text(max_size=8)}
        ),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(["steps", "lr", "batch_size", "mixed_precision", "seed", "retire"]),
        values,
        max_size=3,
    ),
)
def test_distill_config_accepts_or_rejects_cleanly(teachers, extra):
    try:
        cfg = DistillConfig(base="b", teachers=teachers, **extra)
    except ValidationError:
        return
    assert len({t.name for t in cfg.teachers}) == len(cfg.teachers)
    for t in cfg.teachers:
        assert "/" not in t.name and ".." not in t.name and t.name.strip() == t.name


@FUZZ
@given(st.text(max_size=200))
def test_stage_config_from_arbitrary_yaml_text(text):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "cfg.yaml"
        f.write_text(text)
        try:
            load_stage_config(ZooConfig, f, "zoo", None)
        except ValidationError:
            pass
        except (ValueError, TypeError) as exc:
            _one_line(exc)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda base, entries: yaml.safe_dump({"base": base, "teachers": entries}),
            st.one_of(st.just("zoo:base"), st.text(max_size=12)),
            st.lists(
                st.fixed_dictionaries(
                    {
                        "name": names,
                        "source": st.one_of(
                            st.sampled_from(
                                [
                                    "zoo:pastel",
                                    "hub:org/m@abc",
                                    "../x.safetensors",
                                    "/etc/passwd",
                                    "model.ckpt",
                                    "ftp://x",
                                    "zoo:",
                                    "data/t",
                                ]
                            ),
                            st.text(max_size=15),
                        ),
                    },
                    optional={
                        "sha256": st.one_of(st.none(), st.text(max_size=70)),
                        "allow_pickle": values,
                    },
                ),
                max_size=5,
            ),
        ),
    )
)
def test_manifest_parser_accepts_or_rejects_cleanly(text):
    import tempfile

    from dmm.teachers.manifest import load_manifest

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        f = root / "teachers.yaml"
        f.write_text(text)
        try:
            m = load_manifest(f, repo_root=root)
        except (DmmError, ValueError) as exc:
            _one_line(exc)
            return
        seen = [t.name for t in m.teachers]
        assert len(seen) == len(set(seen))
        for t in m.teachers:
            assert "/" not in t.name and not t.name.startswith(".")


def test_override_with_a_control_character_is_a_one_line_error():
    # Found by the fuzzer: YAML rejects control characters with a multi-line error.
    with pytest.raises(ValueError, match="unreadable value") as info:
        parse_overrides(["0=\x1f"])
    _one_line(info.value)
