"""A student folder loads in plain diffusers, without dmm, through its shipped code.

The no-dmm side runs in a subprocess started with ``python -I`` from a temp
folder, with the venv's editable-install finder for dmm removed, and checks
that ``dmm`` cannot be found before it loads anything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmm import DMMStudentPipeline
from dmm.student.remote import REMOTE_FILE, REMOTE_MODULE, remote_code_source
from tests.pipeline_support import tool_env

STYLES = ["pastel", "neon", "sepia"]
MIX = {"pastel": 0.25, "sepia": 0.75}
GEN = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, output_type="pt")

NO_DMM = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path
                 if not getattr(f, "__module__", "").startswith("__editable___dmm")]
assert importlib.util.find_spec("dmm") is None, "dmm is importable in the no-dmm process"
import torch
from diffusers import DiffusionPipeline

folder, out, module = sys.argv[1], sys.argv[2], sys.argv[4]
try:
    DiffusionPipeline.from_pretrained(folder, custom_pipeline=module)
    default = "loaded"
except ValueError as exc:
    default = str(exc)
assert "dmm" not in sys.modules
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=module, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
gen = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, output_type="pt")
images = {name: pipe("a red circle", style=style, generator=torch.Generator().manual_seed(0),
                     **gen).images
          for name, style in [("neon", "neon"), ("mix", json.loads(sys.argv[3]))]}
torch.save(images, out)
print(json.dumps({"default": default, "class": type(pipe).__name__,
                  "vae": type(pipe.vae).__name__, "styles": pipe.style_names}))
"""


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    from dmm import StyleStudent
    from dmm.zoo.build import make_pipeline, vocabulary
    from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder, make_unet
    from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

    root = tmp_path_factory.mktemp("remote")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocabulary(), root / "_tok", MAX_TOKENS)
    vocab = tokenizer.get_vocab()
    text_encoder = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    make_pipeline(make_unet(16), text_encoder, tokenizer, make_autoencoder()).save_pretrained(
        root / "base"
    )
    base = UNet2DConditionModel.from_pretrained(root / "base", subfolder="unet")
    student = StyleStudent.from_base(base, STYLES, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.unet.class_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return student.save_pipeline(root / "student", root / "base")


def test_shipped_module_is_self_contained():
    source = remote_code_source()
    tree = ast.parse(source)
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert "dmm" not in imported
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DMMStudentPipeline", "StyleCodebook", "PatchAutoencoder"} <= classes


def test_folder_ships_its_code_and_card(student_dir):
    assert (student_dir / REMOTE_FILE).read_text() == remote_code_source()
    card = (student_dir / "README.md").read_text()
    assert all(f"`{s}`" in card for s in STYLES) and "trust_remote_code=True" in card
    # The default loader is unchanged: dmm's own classes, no remote code.
    pipe = DMMStudentPipeline.from_pretrained(student_dir, local_files_only=True)
    assert type(pipe.style_codebook).__module__ == "dmm"


@pytest.mark.timeout(600)
def test_plain_diffusers_without_dmm_loads_the_folder_and_style_works(student_dir, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "images.pt"
    env = tool_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            NO_DMM,
            str(student_dir),
            str(out),
            json.dumps(MIX),
            REMOTE_MODULE,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "trust_remote_code=True" in info["default"]  # no remote code unless asked
    assert info["class"] == "DMMStudentPipeline" and info["vae"] == "PatchAutoencoder"
    assert info["styles"] == STYLES
    remote = torch.load(out)
    pipe = DMMStudentPipeline.from_pretrained(student_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name, style in [("neon", "neon"), ("mix", MIX)]:
        want = pipe("a red circle", style=style, generator=torch.Generator().manual_seed(0), **GEN)
        assert torch.equal(remote[name], want.images), name
    assert not torch.equal(remote["neon"], remote["mix"])


def test_retired_copy_gets_a_card_of_its_own_styles(student_dir, tmp_path):
    from dmm.student.edit import retire_styles

    out = retire_styles(student_dir, ["neon"], tmp_path / "retired")
    card = (out / "README.md").read_text()
    assert "Styles: `pastel`, `sepia`" in card and "`neon`" not in card
    assert (out / REMOTE_FILE).read_text() == remote_code_source()
