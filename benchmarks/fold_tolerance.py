"""How exact is a folded style? ``dmm export --style`` against the student it came from.

Builds the tiny SD1.5-layout student of tests/test_export_style.py, folds a
style and a mix, and prints the max abs difference of UNet outputs (fp32 and
fp16 weights) and of images (single files in fp32 and fp16, loaded with
``StableDiffusionPipeline.from_single_file``), and the file's load time.
Run: ``python benchmarks/fold_tolerance.py`` (about a minute on one core).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmm import DMMStudentPipeline  # noqa: E402
from dmm.student.fold import export_style, fold_style  # noqa: E402
from tests.test_export_style import (  # noqa: E402
    MIX,
    _base,
    _from_single_file,
    _images,
    _student,
    _tiny_kl,
    _unet_out,
)


def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    base = _base(root, _tiny_kl())
    folder = _student(base, root / "student")
    student = DMMStudentPipeline.from_pretrained(folder, local_files_only=True)
    student.set_progress_bar_config(disable=True)
    for style in ("neon", MIX):
        folded = fold_style(student.unet, student.style_codebook, style)
        with torch.no_grad():
            want = _unet_out(student.unet, class_labels=student.style_codebook.embed(style, 2))
            fp32 = float((want - _unet_out(folded)).abs().max())
            half = folded.to(torch.float16).to(torch.float32)
            fp16 = float((want - _unet_out(half)).abs().max())
        print(f"{style}: UNet fp32 {fp32:.2g}, fp16 weights {fp16:.2g}, "
              f"mean |output| {float(want.abs().mean()):.3g}")  # fmt: skip
        for dtype in ("fp32", "fp16"):
            out = root / f"{dtype}-{len(str(style))}.safetensors"
            export_style(
                folder, out, style, fmt="single-file", dtype=None if dtype == "fp32" else dtype
            )
            t0 = time.perf_counter()
            plain = _from_single_file(out, base)
            load_s = time.perf_counter() - t0
            diff = float(
                (_images(student, style=style) - _images(plain.to(torch.float32))).abs().max()
            )
            print(f"  images {dtype}: {diff:.2g}; from_single_file {load_s:.2f} s")


if __name__ == "__main__":
    main()
