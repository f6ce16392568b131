"""Static merges of SD1.5-shaped single-file checkpoints: dmm's streaming merge vs sd-mecha.

The parent writes a base and three teachers (random fp16, teachers = base +
small noise, sd-mecha's own sd1-ldm key layout and shapes) and then runs every
(engine, method, repeat) in a fresh child process, so each child's peak RSS is
its own merge's and nothing else's. Repeats are interleaved (ours, mecha, ours,
...) so that slow phases of a shared machine hit both engines.

Run as a script, this module is the child: ``bench_merge.py child ENGINE METHOD
DIR OUT`` prints one JSON line.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
METHODS: dict[str, dict[str, Any]] = {
    "weighted": {},
    "ties": {"k": 0.2},
    "dare_linear": {"p": 0.9, "seed": 0},
}
N_TEACHERS = 3
# Quick mode keeps whole blocks at SD1.5's real shapes: the first four input
# blocks and the last three output blocks (the 320-wide level: resnets with
# convs up to 640->320 3x3, transformers with 768-wide cross-attention), the
# time embedding and the out conv: 31.4M of the UNet's 860M parameters (3.7%).
# The rest of the file is the text-encoder and VAE tensors of up to 4096
# entries, copied from the base as in a full merge.
QUICK_UNET_BLOCKS = (
    *(f"input_blocks.{i}." for i in range(4)),
    *(f"output_blocks.{i}." for i in range(9, 12)),
    "time_embed.",
    "out.",
)


def sd15_layout(quick: bool) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype) of an SD1.5 single file, from sd-mecha's sd1-ldm config."""
    import sd_mecha
    import yaml

    cfg = Path(sd_mecha.__file__).parent / "extensions/builtin/model_configs/sd1-ldm.yaml"
    comps = yaml.safe_load(cfg.read_text())["components"]
    layout: dict[str, tuple[list[int], str]] = {}
    for comp in ("diffuser", "clip_l", "vae"):
        for key, meta in sorted(comps[comp].items()):
            if quick:
                if comp == "diffuser":
                    if not key[len(UNET_PREFIX) :].startswith(QUICK_UNET_BLOCKS):
                        continue
                elif math.prod(meta["shape"]) > 4096 and meta["dtype"] != "int64":
                    continue
            layout[key] = (list(meta["shape"]), meta["dtype"])
    return layout


def write_checkpoints(out_dir: Path, quick: bool, seed: int = 0) -> dict[str, Any]:
    """base.safetensors + t0..t2.safetensors, written key by key (bounded memory)."""
    import torch

    from dmm.atomic import atomic_file
    from dmm.merge.stream import SafetensorsWriter, TensorSpec

    layout = sd15_layout(quick)
    specs = {
        k: TensorSpec("I64" if dt == "int64" else "F16", tuple(shape))
        for k, (shape, dt) in layout.items()
    }
    names = ["base", *(f"t{i}" for i in range(N_TEACHERS))]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{n}.safetensors" for n in names]
    g = torch.Generator().manual_seed(seed)
    with (
        atomic_file(paths[0], "wb") as f0,
        atomic_file(paths[1], "wb") as f1,
        atomic_file(paths[2], "wb") as f2,
        atomic_file(paths[3], "wb") as f3,
    ):
        writers = [SafetensorsWriter(f, specs, {"format": "pt"}) for f in (f0, f1, f2, f3)]
        for key in writers[0].order:
            spec = specs[key]
            if spec.dtype == "I64":
                value = torch.arange(math.prod(spec.shape)).view(spec.shape)
                for w in writers:
                    w.write(key, value)
                continue
            base = 0.02 * torch.randn(spec.shape, generator=g)
            writers[0].write(key, base.half())
            for w in writers[1:]:
                # Teachers as fine-tunes: base + a small delta, as TIES/DARE assume.
                w.write(key, (base + 0.002 * torch.randn(spec.shape, generator=g)).half())
    n_unet = sum(math.prod(s) for k, (s, _) in layout.items() if k.startswith(UNET_PREFIX))
    n_unet_keys = sum(k.startswith(UNET_PREFIX) for k in layout)
    return {
        "files": [str(p) for p in paths],
        "keys": len(layout),
        "unet_keys": n_unet_keys,
        "unet_params": n_unet,
        "params": sum(math.prod(s) for s, _ in layout.values()),
        "file_bytes": paths[0].stat().st_size,
        "subset": (
            f"quick: UNet input_blocks.0-3, output_blocks.9-11, time_embed, out "
            f"({n_unet / 859_520_964:.1%} of the UNet's parameters) + "
            f"{len(layout) - n_unet_keys} small text-encoder/VAE tensors"
        )
        if quick
        else "full SD1.5 single file (UNet + CLIP-L + VAE, 1.07B params)",
    }


def child(engine: str, method: str, data_dir: Path, out: Path) -> dict[str, Any]:
    """One merge in this (fresh) process; peak RSS is VmHWM at the end."""
    from bench_common import current_rss_bytes, peak_rss_bytes

    files = [data_dir / "base.safetensors", *(data_dir / f"t{i}.safetensors" for i in range(3))]
    params = METHODS[method]
    if engine == "dmm":
        from dmm.merge.stream import merge_files

        baseline = current_rss_bytes()
        t0 = time.perf_counter()
        info = merge_files(files[0], files[1:], out, method, only_prefix=UNET_PREFIX, **params)
    else:
        import sd_mecha  # noqa: F401  (imported before the baseline is taken)

        from dmm.merge.mecha import merge_files_mecha

        baseline = current_rss_bytes()
        t0 = time.perf_counter()
        info = merge_files_mecha(files[0], files[1:], out, method, component="diffuser", **params)
    seconds = time.perf_counter() - t0
    return {
        "engine": engine,
        "method": method,
        "seconds": seconds,
        "peak_rss": peak_rss_bytes(),
        "baseline_rss": baseline,
        "merged": info["merged"],
        "copied": info["copied"],
    }


def run(quick: bool, repeats: int, work: Path, log=print) -> dict[str, Any]:
    from bench_common import BENCH_DIR, median, run_child, summary

    data_dir = work / "merge_inputs"
    t0 = time.perf_counter()
    fixture = write_checkpoints(data_dir, quick)
    log(
        f"  merge inputs: 4 files x {fixture['file_bytes'] / 2**20:.0f} MiB "
        f"({fixture['subset']}) in {time.perf_counter() - t0:.0f}s"
    )
    script = str(BENCH_DIR / "bench_merge.py")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {"dmm": [], "sd-mecha": []} for m in METHODS
    }
    for r in range(repeats):
        for method in METHODS:
            # Alternate which engine goes first, so neither always runs on a
            # page cache the other just warmed.
            order = ["dmm", "sd-mecha"] if r % 2 == 0 else ["sd-mecha", "dmm"]
            for engine in order:
                out = work / f"merged-{engine}-{method}.safetensors"
                res = run_child([script, "child", engine, method, str(data_dir), str(out)])
                out.unlink(missing_ok=True)
                runs[method][engine].append(res)
                log(
                    f"  merge r{r} {method:<11} {engine:<8} {res['seconds']:6.2f}s "
                    f"peak {res['peak_rss'] / 2**20:6.0f} MiB"
                )
    results: dict[str, Any] = {}
    for method, by_engine in runs.items():
        ours, theirs = by_engine["dmm"], by_engine["sd-mecha"]
        t_ours = [x["seconds"] for x in ours]
        t_theirs = [x["seconds"] for x in theirs]
        rss_ours = [x["peak_rss"] for x in ours]
        rss_theirs = [x["peak_rss"] for x in theirs]
        grow_ours = [x["peak_rss"] - x["baseline_rss"] for x in ours]
        grow_theirs = [x["peak_rss"] - x["baseline_rss"] for x in theirs]
        results[method] = {
            "time_ratio": round(median(t_ours) / median(t_theirs), 3),
            "rss_ratio": round(median(rss_ours) / median(rss_theirs), 3),
            "rss_growth_ratio": round(median(grow_ours) / max(median(grow_theirs), 1), 3),
            "dmm_seconds": summary(t_ours),
            "sd_mecha_seconds": summary(t_theirs),
            "dmm_peak_rss_mib": round(median(rss_ours) / 2**20, 1),
            "sd_mecha_peak_rss_mib": round(median(rss_theirs) / 2**20, 1),
            "dmm_rss_growth_mib": round(median(grow_ours) / 2**20, 1),
            "sd_mecha_rss_growth_mib": round(median(grow_theirs) / 2**20, 1),
            "params": METHODS[method],
        }
    shutil.rmtree(data_dir, ignore_errors=True)
    results["_setup"] = {
        **fixture,
        "files": None,
        "teachers": N_TEACHERS,
        "repeats": repeats,
        "merge_scope": "UNet only (dmm only_prefix='model.diffusion_model.', "
        "sd-mecha component='diffuser'); other keys copied from the base",
        "sd_mecha_options": "defaults of sd_mecha.merge (threads=None, finite checks on), "
        "via dmm.merge.mecha.merge_files_mecha",
        "rss": "rss_ratio: peak RSS (VmHWM) of the child process; rss_growth_ratio: "
        "peak minus the RSS after imports, i.e. the merge's own memory",
    }
    return results


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        res = child(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
        print(json.dumps(res))
    else:
        sys.exit("usage: bench_merge.py child ENGINE METHOD DATA_DIR OUT")
