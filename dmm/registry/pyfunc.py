"""The student as an MLflow pyfunc model: a DataFrame of prompts and styles in, PNGs out.

Input columns: ``prompt`` and ``style`` (a style name, an index, or JSON weights
such as ``{"pastel": 0.3, "neon": 0.7}``), optionally ``seed``, ``steps`` and
``guidance_scale`` per row. Output: one row per input row, column ``image``
holding a base64-encoded PNG (JSON-safe, so the REST server can return it).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

STUDENT_ARTIFACT = "student"
DEFAULTS = {"seed": 0, "steps": 20, "guidance_scale": 3.0}
# A request is served synchronously; unbounded step counts would let one row
# hold a server for minutes.
MAX_STEPS = 200


def model_signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "style"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("double", "guidance_scale", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "image")]))


def _cell(row: pd.Series, column: str) -> Any:
    value = row.get(column, None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DEFAULTS[column]
    return value


def png_base64(image) -> str:
    """A (3, H, W) tensor in [0, 1] as a base64 PNG string."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
        from dmm.atomic import DmmError
        from dmm.student.generate import parse_style, render

        frame = pd.DataFrame(model_input)
        missing = [c for c in ("prompt", "style") if c not in frame.columns]
        if missing:
            raise DmmError(f"input is missing column(s) {', '.join(missing)}")
        images = []
        for _, row in frame.iterrows():
            style = parse_style(str(row["style"]))
            # Fail on an unknown style before any denoising, with the known names.
            self._pipe.style_codebook.resolve(style)
            steps = int(_cell(row, "steps"))
            if not 1 <= steps <= MAX_STEPS:
                raise DmmError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
            image = render(
                self._pipe,
                [str(row["prompt"])],
                style,
                [int(_cell(row, "seed"))],
                steps,
                float(_cell(row, "guidance_scale")),
            )[0]
            images.append(png_base64(image))
        return pd.DataFrame({"image": images})
