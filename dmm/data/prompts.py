"""Prompt sets: read, normalise, deduplicate and split into train and eval.

Distillation needs prompts (the teachers make the images) and evaluation needs
prompts the student never trained on. For the toy zoo the eval prompts come
from held-out (shape, colour, position) combos, so they test composition, not
memorisation. For a user file the split is a seeded permutation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from dmm.atomic import DmmError, atomic_dir
from dmm.data.config import PromptsConfig
from dmm.hashing import sha256_file

log = logging.getLogger(__name__)

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
META_FILE = "prompts.json"
PROMPT_KEYS = ("prompt", "caption")


def sha256_prompts(prompts: list[str]) -> str:
    """Hash of a prompt list; JSON keeps it unambiguous whatever the prompts contain."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def normalise(text: str) -> str:
    return " ".join(text.split())


def dedupe(prompts: list[str]) -> list[str]:
    """Normalise, drop empties and case-insensitive duplicates; first spelling wins."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        p = normalise(p)
        key = p.casefold()
        if p and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _read_jsonl(path: Path, text: str) -> list[str]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DmmError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DmmError(f"{path}, line {lineno}: not a JSON object")
        key = next((k for k in PROMPT_KEYS if k in obj), None)
        if key is None:
            raise DmmError(f'{path}, line {lineno}: no "prompt" or "caption" key')
        if not isinstance(obj[key], str):
            raise DmmError(f'{path}, line {lineno}: "{key}" is not a string')
        out.append(obj[key])
    return out


def read_raw_prompts(path: Path | str) -> list[str]:
    """Every prompt of a .txt or .jsonl file, as written (not normalised)."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise DmmError(f"prompt file {path} must end in .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DmmError(f"prompt file not found: {path}") from None
    except IsADirectoryError:
        raise DmmError(f"prompt file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise DmmError(f"prompt file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DmmError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text)
    return text.splitlines()


def read_prompts(path: Path | str) -> list[str]:
    """Normalised, deduplicated prompts of a .txt or .jsonl file, in file order.

    Also reads this module's own train.jsonl / eval.jsonl, whose prompts are
    already unique, so list positions equal their "id" fields.
    """
    prompts = dedupe(read_raw_prompts(path))
    if not prompts:
        raise DmmError(f"prompt file {path} holds no prompts")
    return prompts


def zoo_captions(combos: list) -> list[str]:
    """The distinct captions of (shape, colour, position) combos: one per size."""
    from dmm.zoo.scenes import SIZES, Scene

    return [Scene(*combo, size=size).caption for combo in combos for size in SIZES]


def _check_manifest(cfg: PromptsConfig, held: list, manifest: dict | None) -> None:
    if manifest is None or "held_out_combos" not in manifest:
        return
    if sorted(map(tuple, manifest["held_out_combos"])) != sorted(map(tuple, held)):
        zc = manifest.get("config", {})
        raise DmmError(
            f"zoo_seed={cfg.zoo_seed}, held_out={cfg.held_out} do not reproduce the zoo's "
            f"held-out combos; the zoo was built with seed={zc.get('seed')}, "
            f"held_out_combos={zc.get('held_out_combos')}"
        )


def _cap(n: int, available: int, what: str) -> int:
    if n > available:
        log.warning(
            "only %d distinct %s prompts available; using %d, not %d", available, what, available, n
        )
        return available
    return n


def _zoo_split(cfg: PromptsConfig, manifest: dict | None) -> tuple[list[str], list[str], dict]:
    from dmm.zoo.scenes import split_combos

    train_combos, held = split_combos(cfg.zoo_seed, cfg.held_out)
    _check_manifest(cfg, held, manifest)
    train_pool, eval_pool = zoo_captions(train_combos), zoo_captions(held)
    rng = np.random.default_rng(cfg.seed)
    n_train = _cap(cfg.n_train, len(train_pool), "train")
    n_eval = _cap(cfg.n_eval, len(eval_pool), "eval")
    train = [train_pool[i] for i in rng.permutation(len(train_pool))[:n_train]]
    evals = [eval_pool[i] for i in rng.permutation(len(eval_pool))[:n_eval]]
    extra = {
        "held_out_combos": [list(c) for c in held],
        "available": {"train": len(train_pool), "eval": len(eval_pool)},
    }
    return train, evals, extra


def _file_split(cfg: PromptsConfig) -> tuple[list[str], list[str], dict]:
    path = Path(cfg.source)
    raw = read_raw_prompts(path)
    prompts = dedupe(raw)
    if not prompts:
        raise DmmError(f"prompt file {path} holds no prompts")
    n = len(prompts)
    want_eval = cfg.n_eval > 0 and cfg.eval_fraction > 0
    n_eval = min(cfg.n_eval, math.ceil(cfg.eval_fraction * n)) if want_eval else 0
    if n - n_eval < 1:
        raise DmmError(
            f"prompt file {path} has {n} unique prompt(s); a train/eval split needs at least "
            f"{n_eval + 1} (set n_eval=0 to skip eval)"
        )
    if n_eval < cfg.n_eval and want_eval:
        log.info("eval set: %d prompts (eval_fraction=%.3g of %d)", n_eval, cfg.eval_fraction, n)
    n_train = _cap(cfg.n_train, n - n_eval, "train")
    perm = np.random.default_rng(cfg.seed).permutation(n)
    evals = [prompts[i] for i in perm[:n_eval]]
    train = [prompts[i] for i in perm[n_eval : n_eval + n_train]]
    extra = {
        "source_sha256": sha256_file(path),
        "raw_prompts": len(raw),
        "unique_prompts": n,
        "duplicates_or_empty_dropped": len(raw) - n,
    }
    return train, evals, extra


def write_prompt_jsonl(path: Path, prompts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, p in enumerate(prompts):
            fh.write(json.dumps({"prompt": p, "id": i}, ensure_ascii=False) + "\n")


def build_prompts(
    cfg: PromptsConfig, out_dir: Path | str, zoo_manifest: dict | None = None
) -> dict:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``prompts.json`` into ``out_dir``.

    ``zoo_manifest`` (the zoo's zoo.json), when given for the zoo source, is
    checked so that the eval prompts really are the zoo's held-out combos.
    Returns the contents of prompts.json.
    """
    out_dir = Path(out_dir)
    if cfg.source == "zoo":
        train, evals, extra = _zoo_split(cfg, zoo_manifest)
    else:
        train, evals, extra = _file_split(cfg)
    # The splits are disjoint by construction; this guards future edits.
    overlap = {p.casefold() for p in train} & {p.casefold() for p in evals}
    if overlap:
        raise DmmError(f"internal error: {len(overlap)} prompts in both train and eval")
    with atomic_dir(out_dir) as tmp:
        write_prompt_jsonl(tmp / TRAIN_FILE, train)
        write_prompt_jsonl(tmp / EVAL_FILE, evals)
        meta = {
            "source": cfg.source,
            "seed": cfg.seed,
            "counts": {"train": len(train), "eval": len(evals)},
            "sha256": {name: sha256_file(tmp / name) for name in (TRAIN_FILE, EVAL_FILE)},
            "config": cfg.model_dump(),
            **extra,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    log.info("prompts: %d train, %d eval -> %s", len(train), len(evals), out_dir)
    return meta
