"""Merge safetensors files key by key, with memory bounded by the largest tensor.

Inputs are validated with ``safetensors.safe_open``, but their data is read with
plain positional reads into fresh buffers, one key of each file at a time: a
memory map would leave every page it touched resident, so the process's RSS
would grow to the size of all inputs. The output is written incrementally: the
header is known up front from the base's dtypes and shapes, so it is written
first and each merged tensor's bytes go straight to its slot, which also lets a
small thread pool merge two keys at once. The file appears whole (temp file,
fsync, rename) or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from dmm.atomic import DmmError, atomic_dir, atomic_file
from dmm.hashing import sha256_file
from dmm.merge import methods
from dmm.merge.blocks import block_strengths
from dmm.merge.config import MergeConfig

log = logging.getLogger(__name__)

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
METADATA_PREFIX = "dmm."
# How DARE masks are seeded, recorded so that a merge can be reproduced elsewhere.
RNG_SCHEME = (
    "torch.Generator(cpu).manual_seed(sha256('<seed>:<key>')[:8] LE & (2**63-1)); torch.rand"
)


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


# Called with the number of keys to merge; the CLI passes a tqdm factory.
Progress = Callable[[int], ProgressBar]


class MergeError(DmmError, ValueError):
    """A bad merge input: one line naming the file or key.

    Both a DmmError (the CLI prints it on one line) and a ValueError (what
    callers of a merge function expect for bad arguments).
    """


# safetensors dtype name -> (torch dtype attribute, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.itemsize * math.prod(self.shape)

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, _DTYPES[self.dtype][0])


class SafetensorsWriter:
    """Write a safetensors file whose header is fixed before any data.

    Tensors may be written in any order and from several threads (sd-mecha's
    merge calls ``output[key] = value`` from a thread pool): each has a fixed
    byte range, so the writer seeks to it.
    """

    def __init__(
        self, fh: IO[bytes], specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]
    ) -> None:
        if sys.byteorder != "little":  # safetensors is little-endian; tensors are written raw
            raise DmmError("writing safetensors needs a little-endian machine")
        unknown = sorted({s.dtype for s in specs.values()} - set(_DTYPES))
        if unknown:
            raise MergeError(f"unsupported tensor dtype {unknown[0]}")
        self._fh = fh
        self.specs = dict(specs)
        # Widest dtypes first, as the safetensors library does: with a header
        # padded to 8 bytes, every tensor then starts at a multiple of its
        # element size, so readers can map it without copying.
        self.order = sorted(self.specs, key=lambda k: (-self.specs[k].itemsize, k))
        header: dict[str, Any] = {}
        offset = 0
        self._ranges: dict[str, tuple[int, int]] = {}
        for key in self.order:
            spec = self.specs[key]
            self._ranges[key] = (offset, offset + spec.nbytes)
            header[key] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-(8 + len(blob)) % 8)
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        self._data_start = 8 + len(blob)
        self.total_bytes = self._data_start + offset
        # Sized up front so that out-of-order writes never leave a short file.
        fh.truncate(self.total_bytes)
        self._lock = threading.Lock()
        self._written: set[str] = set()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self.specs[key]
        if tensor.dtype != spec.torch_dtype():
            raise DmmError(f"internal: {key} has dtype {tensor.dtype}, header says {spec.dtype}")
        if tuple(tensor.shape) != spec.shape:
            raise DmmError(f"internal: {key} has shape {tuple(tensor.shape)}, header {spec.shape}")
        start, end = self._ranges[key]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != end - start:
            raise DmmError(f"internal: {key} is {data.nbytes} bytes, header says {end - start}")
        with self._lock:
            self._fh.seek(self._data_start + start)
            self._fh.write(memoryview(data))
            self._written.add(key)

    def missing(self) -> list[str]:
        return [k for k in self.order if k not in self._written]


@contextlib.contextmanager
def open_safetensors(paths: Sequence[Path]):
    """Open every file with safe_open; a missing or corrupt file is one MergeError."""
    from safetensors import safe_open

    for p in paths:
        if not p.is_file():
            raise MergeError(f"file not found: {p}")
    with contextlib.ExitStack() as stack:
        handles = []
        for p in paths:
            try:
                handles.append(stack.enter_context(safe_open(str(p), framework="pt")))
            except Exception as exc:  # safetensors raises its own SafetensorError
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise MergeError(f"{p} is not a readable safetensors file: {msg}") from exc
        yield handles


class TensorReader:
    """Reads one tensor at a time from a safetensors file with ``os.preadv``.

    Only for files that ``safe_open`` has already accepted (open_safetensors):
    the header is parsed again here for the byte ranges, which safe_open does
    not expose. Each read lands in a new buffer that is freed with its tensor,
    so memory follows the keys in flight, not the files. Thread-safe (positional
    reads share no file offset).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8))
        except Exception:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()
        }

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):  # preadv may return short counts
            got = os.preadv(self._fd, [view[done:]], self._start + begin + done)
            if got <= 0:
                raise MergeError(f"{self.path}: unexpected end of file reading {key!r}")
            done += got
        return buf.view(getattr(torch, _DTYPES[dtype][0])).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def open_readers(paths: Sequence[Path]) -> Iterator[list[TensorReader]]:
    readers: list[TensorReader] = []
    try:
        for p in paths:
            readers.append(TensorReader(p))
        yield readers
    finally:
        for r in readers:
            r.close()


def _spec(handle, key: str) -> TensorSpec:
    sl = handle.get_slice(key)
    return TensorSpec(sl.get_dtype(), tuple(int(d) for d in sl.get_shape()))


def plan_merge(handles: Sequence, names: Sequence[str]) -> dict[str, TensorSpec]:
    """The output layout (the base's keys, dtypes, shapes), after checking teachers.

    Every check runs before the output is created, so a bad input leaves nothing
    behind.
    """
    base, teachers = handles[0], handles[1:]
    specs = {key: _spec(base, key) for key in base.keys()}
    if not specs:
        raise MergeError(f"{names[0]} holds no tensors")
    for name, t in zip(names[1:], teachers, strict=True):
        tkeys = set(t.keys())
        missing = [k for k in specs if k not in tkeys]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MergeError(f"key {missing[0]!r} is missing in teacher {name}{more}")
        for key, spec in specs.items():
            tshape = tuple(int(d) for d in t.get_slice(key).get_shape())
            if tshape != spec.shape:
                raise MergeError(
                    f"shape mismatch for key {key!r}: base {spec.shape}, teacher {name} {tshape}"
                )
        extra = sorted(tkeys - set(specs))
        if extra:
            # Extra keys (e.g. an EMA copy) cannot be merged without a base value.
            log.warning(
                "teacher %s: %d keys not in the base ignored, e.g. %s", name, len(extra), extra[0]
            )
    return specs


def _is_float(spec: TensorSpec) -> bool:
    return spec.dtype.startswith(("F", "BF"))


def _in_prefix(key: str, only_prefix: str | None) -> bool:
    return not only_prefix or key.startswith(only_prefix)


def _check_finite(tensor: torch.Tensor, key: str, who: str) -> None:
    """Refuse NaN/inf inputs: weighted sums would spread them into the output and
    TIES's sign election would silently drop them. Checked key by key as the
    merge reads them (no extra pass over the files); the output is discarded."""
    if not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"{who} has NaN/inf values in {key!r}: nothing was written")


def merge_record(
    cfg: MergeConfig,
    base: Path,
    teachers: Sequence[Path],
    labels: Sequence[str] | None = None,
    only_prefix: str | None = None,
) -> dict[str, Any]:
    """Everything needed to reproduce a merge: method, parameters, inputs' sha256."""
    import dmm

    paths = [base, *teachers]
    labels = list(labels) if labels is not None else [p.name for p in paths]
    # hashlib releases the GIL on large blocks: hash the files side by side.
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, paths))
    files = [{"name": n, "sha256": h} for n, h in zip(labels, digests, strict=True)]
    params = cfg.params(len(teachers))
    return {
        "method": cfg.method,
        "params": params,
        "block_weights": None,  # filled by the merge once the base's blocks are known
        "weights": params["weights"],
        "seed": cfg.seed if cfg.random else None,
        "rng": RNG_SCHEME if cfg.random else None,
        "only_prefix": only_prefix,
        "base": files[0],
        "teachers": files[1:],
        "version": dmm.__version__,
        "torch": torch.__version__,
    }


def record_to_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: every value is stored as JSON."""
    meta = {"format": "pt"}  # diffusers / transformers check this key
    meta.update({METADATA_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in record.items()})
    return meta


def read_merge_metadata(path: Path | str) -> dict[str, Any]:
    """The merge record stored in a merged file's metadata (decoded from JSON)."""
    with open_safetensors([Path(path)]) as (handle,):
        meta = handle.metadata() or {}
    return {
        k[len(METADATA_PREFIX) :]: json.loads(v)
        for k, v in meta.items()
        if k.startswith(METADATA_PREFIX)
    }


def _check_out_not_input(out: Path, inputs: Sequence[Path]) -> None:
    o = out.resolve()
    for p in inputs:
        r = p.resolve()
        if o == r or o in r.parents or r in o.parents:
            raise MergeError(f"output {out} overlaps input {p}: choose another --out")


def _workers(requested: int | None) -> int:
    """Keys merged at once: two by default (one reads and writes while the
    other computes, and single-threaded kernels such as the DARE draws and
    kthvalue overlap); more only multiplies the memory of keys in flight."""
    if requested is not None:
        if requested < 1:
            raise MergeError(f"workers must be >= 1, got {requested}")
        return requested
    return min(2, os.cpu_count() or 1)


def _run_bounded(fn, keys: Sequence[str], workers: int) -> list:
    """``[fn(k) for k in keys]`` on ``workers`` threads, at most ``workers`` keys in
    flight (memory stays bounded). After the first exception no key is started;
    the keys in flight finish and that exception is raised."""
    if workers == 1:
        return [fn(k) for k in keys]
    results: list = [None] * len(keys)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future, int] = {}
        for i, key in enumerate(keys):
            if len(pending) >= workers:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    results[pending.pop(f)] = f.result()  # raises a worker's exception
            pending[pool.submit(fn, key)] = i
        for f, i in pending.items():
            results[i] = f.result()
    return results


def _merge_files(
    cfg: MergeConfig,
    base: Path,
    teachers: Sequence[Path],
    out: Path,
    labels: Sequence[str] | None = None,
    only_prefix: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    paths = [Path(base), *(Path(t) for t in teachers)]
    if len(paths) < 2:
        raise MergeError("at least one teacher is needed")
    names = list(labels) if labels is not None else [str(p) for p in paths]
    params = cfg.params(len(paths) - 1)  # a weight-count error before any file is opened
    with open_safetensors(paths) as handles, open_readers(paths) as readers:
        specs = plan_merge(handles, names)
        strengths: dict[str, float] = {}
        block_record = None
        if cfg.block_weights is not None:
            block_record, strengths = block_strengths(cfg.block_weights, specs)
        record = merge_record(cfg, paths[0], paths[1:], labels, only_prefix)
        record["block_weights"] = block_record

        to_merge = [k for k in specs if _is_float(specs[k]) and _in_prefix(k, only_prefix)]
        bar = progress(len(to_merge)) if progress is not None else None

        def merge_one(key: str) -> bool:
            b = readers[0].read(key)
            if not _is_float(specs[key]) or not _in_prefix(key, only_prefix):
                writer.write(key, b)
                return False
            ts = [r.read(key) for r in readers[1:]]
            _check_finite(b, key, f"base {names[0]}")
            for name, t in zip(names[1:], ts, strict=True):
                _check_finite(t, key, f"teacher {name}")
            s = strengths.get(key, 1.0)
            writer.write(key, methods.merge_tensor(cfg.method, key, b, ts, strength=s, **params))
            if bar is not None:
                bar.update(1)
            return True

        with atomic_file(out, "wb") as fh, contextlib.ExitStack() as closing:
            if bar is not None:
                closing.callback(bar.close)
            writer = SafetensorsWriter(fh, specs, record_to_metadata(record))
            done = _run_bounded(merge_one, writer.order, _workers(workers))
            merged = sum(done)
            copied = len(done) - merged
    seconds = time.perf_counter() - t0
    log.info("merged %d keys (%d copied from base) into %s in %.1fs", merged, copied, out, seconds)
    return {
        "out": str(out),
        "keys": len(specs),
        "merged": merged,
        "copied": copied,
        "bytes": writer.total_bytes,
        "seconds": round(seconds, 3),
        "record": record,
    }


def merge_files(
    base: Path,
    teachers: list[Path],
    out: Path,
    method: str,
    *,
    only_prefix: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Merge safetensors files key by key into ``out``; return a summary.

    ``params`` are MergeConfig fields (weights, lam, k, p, seed, block_weights);
    defaults are recorded too. A NaN/inf input tensor stops the merge with a
    MergeError naming the file, and no output is written. Keys outside ``only_prefix`` (e.g. the text encoder and VAE of
    a single-file SD checkpoint when ``only_prefix="model.diffusion_model."``)
    and non-float tensors are copied from the base. ``workers`` keys are merged
    at once (default 2); the output is the same bytes for any value.
    """
    cfg = MergeConfig(method=method, **params)
    paths = [Path(base), *(Path(t) for t in teachers)]
    out = Path(out)
    if out.is_dir():
        raise MergeError(f"output {out} is a folder: give a .safetensors file path")
    _check_out_not_input(out, paths)
    return _merge_files(
        cfg, paths[0], paths[1:], out, only_prefix=only_prefix, workers=workers, progress=progress
    )


def _pipeline_weights(folder: Path) -> Path:
    if not folder.is_dir():
        raise MergeError(f"pipeline folder not found: {folder}")
    weights = folder / UNET_WEIGHTS
    if not weights.is_file():
        raise MergeError(
            f"{weights} not found: a diffusers pipeline folder with safetensors UNet weights is needed"
        )
    return weights


def merge_unets(
    base_pipeline_dir: Path,
    teacher_dirs: list[Path],
    out_dir: Path,
    method: str,
    progress: Progress | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Merge the UNets of diffusers pipeline folders into a new pipeline folder.

    The output is a copy of the base pipeline (its text encoder, VAE, tokenizer
    and scheduler, as the method notes prescribe) with merged UNet weights and a
    ``merge.json`` record. It is built next to ``out_dir`` and renamed into place.
    """
    cfg = MergeConfig(method=method, **params)
    base_dir = Path(base_pipeline_dir)
    dirs = [base_dir, *(Path(d) for d in teacher_dirs)]
    if len(dirs) < 2:
        raise MergeError("at least one teacher is needed")
    weights = [_pipeline_weights(d) for d in dirs]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"output {out_dir} is a file: give a folder path for a pipeline")
    _check_out_not_input(out_dir, dirs)
    labels = [f"{d.name}/{UNET_WEIGHTS.as_posix()}" for d in dirs]

    def skip_unet_weights(folder: str, names: list[str]) -> list[str]:
        # Any stale base UNet weights (.bin, fp16 variants) must not ship.
        if Path(folder).resolve() == (base_dir / "unet").resolve():
            return [n for n in names if n.startswith("diffusion_pytorch_model")]
        return []

    with atomic_dir(out_dir) as tmp:
        shutil.copytree(base_dir, tmp, dirs_exist_ok=True, ignore=skip_unet_weights)
        summary = _merge_files(
            cfg, weights[0], weights[1:], tmp / UNET_WEIGHTS, labels, progress=progress
        )
        (tmp / "merge.json").write_text(json.dumps(summary["record"], indent=2, sort_keys=True))
    summary["out"] = str(out_dir)
    return summary
