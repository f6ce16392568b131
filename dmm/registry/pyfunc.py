"""The student as an MLflow pyfunc model: a DataFrame of prompts and styles in, PNGs out.

Input columns: ``prompt`` and ``style`` (a style name, an index, or JSON weights
such as ``{"pastel": 0.3, "neon": 0.7}``), and optionally ``seed``, ``steps``
and ``guidance_scale`` per row; a row that leaves one empty takes the request's
``params`` (``{"steps": 20, "seed": 0, "guidance_scale": 3.0}`` by default).
Output: one row per input row, column ``image`` holding a base64-encoded PNG.

Rows that share ``steps`` and ``guidance_scale`` run as one pipeline batch
(each with its own style and seed), so a request costs about one call per
setting. A bad request raises an ``MlflowException`` with
``INVALID_PARAMETER_VALUE``: the server answers 400 with that one-line message
and no traceback.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from dmm.student.limits import DEFAULTS, check_count, check_guidance, check_steps

STUDENT_ARTIFACT = "student"
# Rows denoised together: bounds peak memory whatever the request holds.
BATCH = 8
_INT_PARAMS = ("seed", "steps")


def model_signature():
    """Inputs, outputs and the ``params`` schema (request-wide settings with defaults).

    The per-row setting columns are untyped (``AnyType``): pandas makes a column
    that only some rows fill float (NaN elsewhere) and a full one int, and
    MLflow casts neither into the other. ``predict`` checks their values.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "style"),
            ColSpec(AnyType(), "seed", required=False),
            ColSpec(AnyType(), "steps", required=False),
            ColSpec(AnyType(), "guidance_scale", required=False),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("steps", "long", DEFAULTS["steps"]),
            ParamSpec("seed", "long", DEFAULTS["seed"]),
            ParamSpec("guidance_scale", "double", DEFAULTS["guidance_scale"]),
        ]
    )
    return ModelSignature(
        inputs=inputs, outputs=Schema([ColSpec("string", "image")]), params=params
    )


def input_example(styles: list[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A two-row request (a name and a mix) with params, for ``log_model(input_example=...)``."""
    mix = {styles[0]: 0.5, styles[-1]: 0.5}
    import json

    frame = pd.DataFrame(
        {"prompt": ["a red circle", "a blue square"], "style": [styles[0], json.dumps(mix)]}
    )
    return frame, {"steps": 4, "seed": 0, "guidance_scale": 3.0}


def png_base64(image) -> str:
    """A (3, H, W) tensor in [0, 1] as a base64 PNG string."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _setting(row: pd.Series, column: str, defaults: dict[str, Any]) -> Any:
    value = row.get(column, None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return defaults[column]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{column} must be a number, got {value!r}")
    if column in _INT_PARAMS:
        if float(value) != int(value):
            raise ValueError(f"{column} must be a whole number, got {value}")
        return int(value)
    return float(value)


def plan_request(
    frame: pd.DataFrame, params: dict[str, Any] | None, resolve
) -> list[tuple[tuple[int, float], list[int], list[str], list[Any], list[int]]]:
    """Check every row, then group them: [((steps, guidance), rows, prompts, weights, seeds)].

    ``resolve`` turns one parsed style into its weight vector (the codebook's
    ``resolve``), so a group's styles stack unambiguously into (B, N). Raises
    ValueError (or DmmError) naming the first problem; nothing runs before this.
    """
    from dmm.student.generate import parse_style

    missing = [c for c in ("prompt", "style") if c not in frame.columns]
    if missing:
        raise ValueError(f"input is missing column(s) {', '.join(missing)}")
    check_count(len(frame), "rows per request")
    defaults = {**DEFAULTS, **(params or {})}
    groups: dict[tuple[int, float], list] = {}
    for i, (_, row) in enumerate(frame.iterrows()):
        weights = resolve(parse_style(str(row["style"])))
        steps = check_steps(_setting(row, "steps", defaults))
        guidance = check_guidance(_setting(row, "guidance_scale", defaults))
        seed = _setting(row, "seed", defaults)
        groups.setdefault((steps, guidance), []).append((i, str(row["prompt"]), weights, seed))
    return [
        (
            key,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
        )
        for key, rows in groups.items()
    ]


class DMMStudentModel(mlflow.pyfunc.PythonModel):
    """Loads the student pipeline folder logged as the ``student`` artifact."""

    def load_context(self, context) -> None:
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from dmm.student.generate import load_student_pipeline

        # A model server's log is for requests, not for loading progress bars.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

        self._pipe = load_student_pipeline(Path(context.artifacts[STUDENT_ARTIFACT]))
        if torch.cuda.is_available():
            self._pipe.to("cuda")

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import torch

        from dmm.atomic import DmmError
        from dmm.student.generate import render

        frame = pd.DataFrame(model_input)
        try:
            groups = plan_request(frame, params, self._pipe.style_codebook.resolve)
        except (DmmError, ValueError) as exc:
            raise _bad_request(str(exc).splitlines()[0]) from None
        images: list[str | None] = [None] * len(frame)
        for (steps, guidance), rows, prompts, weights, seeds in groups:
            for start in range(0, len(rows), BATCH):
                part = slice(start, start + BATCH)
                styles = torch.stack(weights[part])
                out = render(self._pipe, prompts[part], styles, seeds[part], steps, guidance)
                for row, image in zip(rows[part], out, strict=True):
                    images[row] = png_base64(image)
        return pd.DataFrame({"image": images})
