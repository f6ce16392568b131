"""``dmm config show STAGE``: the keys a stage's ``--set`` and params.yaml section accept.

Read from the stage's pydantic model, so the listing cannot drift from what
the stage validates. Importing this module does not import torch.
"""

from __future__ import annotations

import importlib
import types
import typing
from collections.abc import Iterator
from enum import Enum
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# Stage -> its config model ("module:Class"), imported only when shown.
STAGE_MODELS: dict[str, str] = {
    "zoo": "dmm.zoo.config:ZooConfig",
    "prompts": "dmm.data.config:PromptsConfig",
    "sample": "dmm.data.config:SampleConfig",
    "distill": "dmm.distill.config:DistillConfig",
    "merge": "dmm.merge.config:MergeConfig",
    "evaluate": "dmm.evaluation.config:EvaluateConfig",
    "registry": "dmm.registry.config:RegistryConfig",
    "request": "dmm.plan:MergeRequest",
}

config_app = typer.Typer(
    help="The settings each stage accepts (params.yaml sections and --set keys).",
    no_args_is_help=True,
)


def stage_model(stage: str) -> type[BaseModel]:
    from dmm.atomic import DmmError

    if stage not in STAGE_MODELS:
        raise DmmError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODELS)}")
    module, _, name = STAGE_MODELS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def type_name(annotation: Any) -> str:
    """A short, readable spelling of a field's type (``int``, ``list[str]``, ``a | b``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see below)"
    if value is None:
        return "null"
    return str(value.value if isinstance(value, Enum) else value)


def bounds_text(field: FieldInfo) -> str:
    """The field's numeric bounds (ge=1 -> ">= 1"), as pydantic keeps them in metadata."""
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _nested_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field holds directly (``losses``) or as list items (``teachers[]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, "[]"
    return None


def config_rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, ...]]:
    """(key, type, default, description) per setting; nested models as dotted keys."""
    for name, field in model.model_fields.items():
        key = prefix + name
        nested = _nested_model(field.annotation)
        if nested is not None:
            sub, suffix = nested
            kind = f"list[{sub.__name__}]" if suffix else sub.__name__
            note = "one entry per item; set in YAML" if suffix else "the keys below"
            yield key, kind, default_text(field), field.description or note
            yield from config_rows(sub, f"{key}{suffix}.")
            continue
        description = field.description or ""
        bounds = bounds_text(field)
        if bounds:
            description = f"{description} ({bounds})" if description else f"({bounds})"
        yield key, type_name(field.annotation), default_text(field), description


def format_rows(rows: list[tuple[str, ...]]) -> str:
    header = ("KEY", "TYPE", "DEFAULT", "DESCRIPTION")
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in table
    ).rstrip()


def show_command(
    stage: Annotated[
        str, typer.Argument(help=f"One of: {', '.join(STAGE_MODELS)}.", show_default=False)
    ],
) -> None:
    """Print every key STAGE accepts (`--set KEY=VALUE`, or its params.yaml section): type, default, description."""
    model = stage_model(stage)
    typer.echo(f"{stage}: {model.__module__}.{model.__name__}")
    typer.echo(format_rows(list(config_rows(model))))
