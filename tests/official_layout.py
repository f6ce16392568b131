"""A small checkpoint in the official DMM layout (MCG-NJU/DMM), built from a zoo base.

Written from the layout of the reference code (``modeling/dmm_unet.py``,
``modeling/dmm_pipeline.py``), not from its files: ``unet/config.json`` carries
``addition_embed_type: "model_merge"`` and ``num_models``, and the UNet weights
gain ``model_embedding.weight`` (N, D) and ``add_embedding.linear_{1,2}``.
:func:`official_reference_eps` is the reference forward: a plain diffusers UNet
whose timestep embedding gets ``add_embedding(model_embedding[id])`` added, as
the official forward does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


def build_official_fixture(
    base_dir: Path, out: Path, num_models: int, seed: int = 0, table_width: int | None = None
) -> Path:
    """An official-layout folder: the base pipeline plus a random style table and MLP.

    ``table_width`` (default: the time-embedding width) makes a broken fixture.
    """
    g = torch.Generator().manual_seed(seed)
    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("unet"))
    cfg = json.loads((base_dir / "unet" / "config.json").read_text())
    state = load_file(base_dir / "unet" / WEIGHTS)
    dim = int(state["time_embedding.linear_1.weight"].shape[0])
    width = table_width or dim
    state["model_embedding.weight"] = torch.randn(num_models, width, generator=g)
    state["add_embedding.linear_1.weight"] = 0.2 * torch.randn(dim, width, generator=g)
    state["add_embedding.linear_1.bias"] = 0.1 * torch.randn(dim, generator=g)
    state["add_embedding.linear_2.weight"] = 0.2 * torch.randn(dim, dim, generator=g)
    state["add_embedding.linear_2.bias"] = 0.1 * torch.randn(dim, generator=g)
    cfg.update(
        _class_name="DMMUNet2DConditionModel",
        addition_embed_type="model_merge",
        num_models=num_models,
    )
    (out / "unet").mkdir()
    (out / "unet" / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, out / "unet" / WEIGHTS)
    index = json.loads((base_dir / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionDMMPipeline"
    index["unet"] = ["modeling.dmm_unet", "DMMUNet2DConditionModel"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


class OfficialReference(torch.nn.Module):
    """The official UNet's forward for one model id, from a plain diffusers UNet."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        state = load_file(folder / "unet" / WEIGHTS)
        for k in ("_class_name", "addition_embed_type", "num_models"):
            cfg.pop(k)
        self.unet = UNet2DConditionModel.from_config(cfg)
        self.table = state.pop("model_embedding.weight")
        dim = self.table.shape[1]
        self.mlp = TimestepEmbedding(dim, state["add_embedding.linear_2.weight"].shape[0])
        self.mlp.load_state_dict(
            {k[len("add_embedding.") :]: state.pop(k) for k in list(state) if k.startswith("add_")}
        )
        self.unet.load_state_dict(state)

    @torch.no_grad()
    def forward(self, sample, timestep, cond, model_id: int) -> torch.Tensor:
        aug = self.mlp(self.table[model_id][None])

        def add(_module, _inputs, emb):
            return emb + aug.to(emb.dtype)

        handle = self.unet.time_embedding.register_forward_hook(add)
        try:
            return self.unet(sample, timestep, cond).sample
        finally:
            handle.remove()
