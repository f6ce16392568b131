"""Reading stage configs: a YAML file (or one section of params.yaml) plus overrides."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel


def load_config(model: type[BaseModel], path: Path | None, section: str | None = None, **overrides):
    """Build a stage config from a YAML file (optionally one section of it) plus overrides.

    This is how the CLI reads params.yaml, so DVC and the CLI share one source.
    """
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ValueError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        if section is not None:
            loaded = loaded.get(section, {}) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"section {section!r} of {path} must be a mapping")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return model(**data)


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ``["steps=10", "losses.feature=0"]`` into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ValueError(f"override {item!r} has an unreadable value ({problem})") from None
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_stage_config(
    model: type[BaseModel], path: Path | None, section: str | None, overrides: list[str] | None
):
    """A stage config from YAML (a section of it when present) plus ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ValueError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ValueError(
                f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        if section and section in loaded:
            loaded = loaded[section] or {}
        data = loaded
    return model(**deep_merge(data, parse_overrides(overrides)))
