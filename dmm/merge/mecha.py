"""Run dmm's static merges through sd-mecha, for cross-checks and benchmarks.

sd-mecha is optional: nothing here imports it until a function needs it, and
:func:`mecha_available` tells whether it is installed. The recipes pin every
parameter; dmm/merge/methods.py's module docstring says why each one is set the
way it is. The output is written by dmm's own safetensors writer so that both
engines produce the same layout, dtypes (the base's) and metadata; tensors
sd-mecha does not produce (non-float ones such as int64 ``position_ids``, which
it would turn into floats, and keys outside ``component``) are copied from the
base, as dmm does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Iterator, MutableMapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from dmm.atomic import DmmError, atomic_file
from dmm.merge.blocks import block_strengths
from dmm.merge.config import MergeConfig
from dmm.merge.stream import (
    MergeError,
    SafetensorsWriter,
    TensorSpec,
    _check_out_not_input,
    _is_float,
    merge_record,
    open_readers,
    open_safetensors,
    plan_merge,
    record_to_metadata,
)

MECHA_VERSION = "1.1.8"


def mecha_available() -> bool:
    return importlib.util.find_spec("sd_mecha") is not None


def _sd_mecha():
    try:
        import sd_mecha
    except ImportError as exc:
        raise DmmError(f"sd-mecha is not installed: pip install sd-mecha=={MECHA_VERSION}") from exc
    return sd_mecha


class _NoProgress:
    """sd-mecha's tqdm hook, silenced: a progress bar per key floods test logs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def teacher_seed(seed: int, index: int) -> int:
    """sd-mecha takes one seed per ``dropout`` call: give each teacher its own,
    or all teachers would drop the same entries."""
    digest = hashlib.sha256(f"{seed}:teacher:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _running_mean(mm, nodes: Sequence, weights: Sequence[float]):
    """sum_i w_i x_i (weights summing to 1) as a chain of lerps, sd-mecha's own idiom."""
    acc, total = nodes[0], weights[0]
    for node, w in zip(nodes[1:], weights[1:], strict=True):
        total += w
        acc = mm("weighted_sum")(acc, node, alpha=w / total if total > 0 else 0.0)
    return acc


def _strength(sd_mecha, blocks: dict[str, float] | None, scale: float):
    """``scale`` times the block weights as a per-key sd-mecha parameter: a
    ``sd1-supermerger_blocks`` literal converted to ``sd1-ldm`` (sd-mecha's
    own MBW path), or the plain float without block weights."""
    if blocks is None:
        return scale
    literal = sd_mecha.literal(
        {name: scale * v for name, v in blocks.items()}, config="sd1-supermerger_blocks"
    )
    return sd_mecha.convert(literal, "sd1-ldm")


def build_recipe(
    cfg: MergeConfig,
    base: Path,
    teachers: Sequence[Path],
    component: str | None = None,
    blocks: dict[str, float] | None = None,
):
    """The sd-mecha recipe equivalent to ``cfg`` (see methods.py for the mapping).

    ``blocks`` are the resolved block weights (BASE first, as recorded by
    dmm/merge/blocks.py); sd-mecha supports them for SD1.5 LDM files only. With
    them, ``weighted`` is ``weighted_sum(base, mean, alpha=b)`` and the delta
    methods get ``alpha = lam * b``.
    """
    sd_mecha = _sd_mecha()
    from sd_mecha.extensions.merge_methods import resolve as mm

    b = sd_mecha.model(Path(base))
    ts = [sd_mecha.model(Path(t)) for t in teachers]
    w = cfg.normalized_weights(len(ts))
    alpha = _strength(sd_mecha, blocks, cfg.lam)
    if cfg.method == "weighted":
        recipe = _running_mean(mm, ts, w)
        if blocks is not None:
            recipe = mm("weighted_sum")(b, recipe, alpha=_strength(sd_mecha, blocks, 1.0))
    elif cfg.method == "task_arithmetic":
        deltas = [mm("subtract")(t, b) for t in ts]
        recipe = mm("add_difference")(b, _running_mean(mm, deltas, w), alpha=alpha)
    elif cfg.method in ("ties", "dare_ties"):
        if len(set(w)) > 1:
            raise MergeError(
                f"sd-mecha's TIES takes no teacher weights; {cfg.method} needs uniform ones"
            )
        deltas = [mm("subtract")(t, b) for t in ts]
        if cfg.method == "ties":
            tau = mm("ties_sum")(*deltas, k=cfg.k, vote_sgn=True)
        else:
            tau = mm("ties_sum_with_dropout")(
                *deltas,
                probability=cfg.p,
                della_eps=0.0,
                rescale=True,
                k=cfg.k,
                vote_sgn=True,
                apply_stock=True,  # True = no model-stock factor (inverted flag)
                apply_median=False,
                seed=cfg.seed,
            )
        recipe = mm("add_difference")(b, tau, alpha=alpha)
    elif cfg.method == "dare_linear":
        dropped = [
            mm("dropout")(
                mm("subtract")(t, b),
                probability=cfg.p,
                rescale=1.0,
                overlap=1.0,
                overlap_emphasis=0.0,
                seed=teacher_seed(cfg.seed, i),
            )
            for i, t in enumerate(ts)
        ]
        recipe = mm("add_difference")(b, _running_mean(mm, dropped, w), alpha=alpha)
    else:  # MergeConfig's Literal makes this unreachable
        raise MergeError(f"unknown merge method {cfg.method!r}")
    if component is not None:
        recipe = sd_mecha.pick_component(recipe, component)
    return recipe


def detect_config(path: Path | str) -> str | None:
    """The model config sd-mecha infers for a file (e.g. "sd1-ldm"), or None."""
    sd_mecha = _sd_mecha()
    from sd_mecha.graph_finalization import open_graph

    with open_graph(sd_mecha.model(Path(path))) as graph:
        root = graph.finalize_root(check_mandatory_keys=False, check_extra_keys=False)
    cfg = root.model_config
    return None if cfg is None else cfg.identifier


class _WriterSink(MutableMapping):
    """The ``output`` mapping handed to sd_mecha.merge: writes through, keeps nothing."""

    def __init__(self, writer: SafetensorsWriter, specs: dict[str, TensorSpec]) -> None:
        self.writer = writer
        self.specs = specs
        self.extra: list[str] = []
        self.received = 0

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "__metadata__":
            return  # the recipe is already in the header, serialised before the merge
        spec = self.specs.get(key)
        if spec is None:
            self.extra.append(key)
            return
        if not _is_float(spec):
            return  # sd-mecha cast it to float; the base's copy is written instead
        self.writer.write(key, value.to(spec.torch_dtype()))
        self.received += 1

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def merge_files_mecha(
    base: Path,
    teachers: list[Path],
    out: Path,
    method: str,
    *,
    component: str | None = None,
    threads: int | None = None,
    merge_options: dict[str, Any] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Like :func:`dmm.merge.stream.merge_files`, but sd-mecha does the merging.

    ``component`` restricts the merge to one sd-mecha component (``"diffuser"``
    is the UNet of an ``sd1-ldm`` file; dmm's equivalent is
    ``only_prefix="model.diffusion_model."``). ``merge_options`` go to
    ``sd_mecha.merge`` (e.g. ``omit_non_finite_inputs=False`` to skip its
    per-tensor finiteness scans); dtypes, devices, output and progress are pinned.
    """
    sd_mecha = _sd_mecha()
    cfg = MergeConfig(method=method, **params)
    paths = [Path(base), *(Path(t) for t in teachers)]
    if len(paths) < 2:
        raise MergeError("at least one teacher is needed")
    out = Path(out)
    if out.is_dir():
        raise MergeError(f"output {out} is a folder: give a .safetensors file path")
    _check_out_not_input(out, paths)
    t0 = time.perf_counter()
    with open_safetensors(paths) as handles:
        specs = plan_merge(handles, [str(p) for p in paths])
        blocks = None
        if cfg.block_weights is not None:
            blocks, _ = block_strengths(cfg.block_weights, specs)
        recipe = build_recipe(cfg, paths[0], paths[1:], component, blocks)
        record = merge_record(cfg, paths[0], paths[1:])
        record["block_weights"] = blocks
        record["engine"] = f"sd-mecha {importlib_metadata.version('sd-mecha')}"
        record["mecha_config"] = detect_config(paths[0])
        record["mecha_component"] = component
        try:
            record["mecha_recipe"] = sd_mecha.serialize(recipe)
        except Exception:  # serialisation is provenance only; never fail the merge on it
            record["mecha_recipe"] = None
        options = {
            "strict_mandatory_keys": False,
            "check_extra_keys": False,
            **(merge_options or {}),
            "merge_device": "cpu",
            "merge_dtype": torch.float32,
            "output_device": "cpu",
            "output_dtype": None,
            "threads": threads,
            "tqdm": _NoProgress,
        }
        with atomic_file(out, "wb") as fh:
            writer = SafetensorsWriter(fh, specs, record_to_metadata(record))
            sink = _WriterSink(writer, specs)
            sd_mecha.merge(recipe, output=sink, **options)
            restored = writer.missing()
            # Positional reads, not safe_open's memory map: mapped pages would
            # stay resident and count against sd-mecha's peak RSS.
            with open_readers(paths[:1]) as (reader,):
                for key in restored:
                    writer.write(key, reader.read(key))
    return {
        "out": str(out),
        "keys": len(specs),
        "merged": sink.received,
        "copied": len(restored),
        "ignored": sink.extra,
        "bytes": writer.total_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "record": record,
    }
