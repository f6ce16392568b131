"""The teacher manifest (``data/teachers.yaml``): which teachers to merge, from where.

```yaml
base: zoo:base
teachers:
  - name: pastel
    source: zoo:pastel       # zoo:<style> | diffusers folder | .safetensors | .ckpt/.pt | hub:<repo>@<rev>
    sha256: null             # optional pin: the file (or LoRA), or a folder's UNet weights file
    allow_pickle: false      # pickles are refused unless true (then torch.load(weights_only=True))
  - name: inkwash
    lora: loras/inkwash.safetensors  # the base plus this LoRA (kohya or diffusers/PEFT keys)
    scale: 1.0               # the LoRA's strength when it is fused
```

Importing this module is cheap (no torch): a Dagster sensor reads the manifest
on every tick.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from dmm.atomic import DmmError
from dmm.names import STYLE_NAME_RE

SourceKind = Literal["zoo", "diffusers", "single_file", "pickle", "hub", "lora"]

# A teacher name becomes a folder name, a Dagster partition key and a style name.
TEACHER_NAME_RE = STYLE_NAME_RE
HUB_RE = re.compile(r"^hub:(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)@(?P<rev>[\w./-]+)$")
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Model and archive formats people may point at by mistake: named, not guessed
# to be a folder.
_OTHER_SUFFIXES = (
    ".onnx", ".gguf", ".ggml", ".msgpack", ".h5", ".pb", ".tflite", ".npz", ".zip",
    ".tar", ".gz", ".tgz", ".7z", ".json", ".yaml", ".yml", ".txt", ".pkl", ".pickle",
)  # fmt: skip
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
KIND_HELP = (
    "expected zoo:<style>, a diffusers folder, a .safetensors file, a .ckpt/.pt pickle "
    "or hub:<repo_id>@<revision>"
)


def _kind_or_none(source: str) -> SourceKind | None:
    if source.startswith("zoo:"):
        return "zoo" if TEACHER_NAME_RE.match(source[4:]) else None
    if source.startswith("hub:"):
        return "hub" if HUB_RE.match(source) else None
    scheme = _SCHEME_RE.match(source)
    # "C:" is a Windows drive, not a URL scheme.
    if scheme and len(scheme.group(1)) > 1:
        return None
    suffix = Path(source).suffix.lower()
    if suffix in SINGLE_FILE_SUFFIXES:
        return "single_file"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    if suffix in _OTHER_SUFFIXES or not source.strip():
        return None
    return "diffusers"


def source_kind(source: str) -> SourceKind:
    """What a manifest ``source`` string points at; DmmError if it is none of the kinds."""
    kind = _kind_or_none(source)
    if kind is None:
        if source.startswith("hub:"):
            raise DmmError(f"bad hub source {source!r}: write hub:<repo_id>@<revision>")
        raise DmmError(f"unknown source kind {source!r}: {KIND_HELP}")
    return kind


def hub_parts(source: str) -> tuple[str, str]:
    """(repo_id, revision) of a ``hub:<repo_id>@<revision>`` source."""
    m = HUB_RE.match(source)
    if not m:
        raise DmmError(f"bad hub source {source!r}: write hub:<repo_id>@<revision>")
    return m["repo"], m["rev"]


def is_local(source: str) -> bool:
    return _kind_or_none(source) in ("diffusers", "single_file", "pickle")


class TeacherEntry(BaseModel):
    """One teacher: a name and where its weights come from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str | None = None
    lora: str | None = None
    scale: float = 1.0
    sha256: str | None = None
    allow_pickle: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TEACHER_NAME_RE.match(v):
            raise ValueError(
                f"invalid teacher name {v!r}: names must match {TEACHER_NAME_RE.pattern} "
                "(they become folder names, partition keys and style names)"
            )
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and _kind_or_none(v) is None:
            if v.startswith("hub:"):
                raise ValueError(f"bad hub source {v!r}: write hub:<repo_id>@<revision>")
            raise ValueError(f"unknown source kind {v!r}: {KIND_HELP}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError(f"sha256 must be 64 hex digits, got {v!r}")
        return v

    @field_validator("lora")
    @classmethod
    def _lora(cls, v: str | None) -> str | None:
        if v is not None and _kind_or_none(v) not in ("single_file", "pickle"):
            raise ValueError(f"lora {v!r} must be a local .safetensors (or .pt/.bin pickle) file")
        return v

    @model_validator(mode="after")
    def _one_origin(self) -> TeacherEntry:
        if (self.source is None) == (self.lora is None):
            raise ValueError(
                f"teacher {self.name!r} needs exactly one of 'source' (a model) and 'lora' "
                "(a LoRA on the base)"
            )
        if self.lora is None and self.scale != 1.0:
            raise ValueError(f"teacher {self.name!r}: 'scale' applies to a 'lora' teacher only")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"teacher {self.name!r}: scale must be a finite non-zero number")
        return self

    @property
    def origin(self) -> str:
        """Where the teacher's weights come from: its source, or its LoRA file."""
        return self.lora if self.lora is not None else str(self.source)

    @property
    def kind(self) -> SourceKind:
        return "lora" if self.lora is not None else source_kind(str(self.source))


class TeacherManifest(BaseModel):
    """The base model and the list of teachers to merge into it."""

    model_config = ConfigDict(extra="forbid")

    base: str = "zoo:base"
    teachers: list[TeacherEntry]

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if _kind_or_none(v) is None:
            raise ValueError(f"unknown base source kind {v!r}: {KIND_HELP}")
        if _kind_or_none(v) == "pickle":
            raise ValueError(f"base {v!r} is a pickle; give a diffusers folder or .safetensors")
        return v

    @model_validator(mode="after")
    def _unique(self) -> TeacherManifest:
        seen: dict[str, list[str]] = {}
        for t in self.teachers:
            # Case-insensitive: the names become folders, and two names that
            # differ only in case collide on macOS and Windows.
            seen.setdefault(t.name.lower(), []).append(t.name)
        dupes = [names for names in seen.values() if len(names) > 1]
        if dupes:
            listed = ", ".join("/".join(dict.fromkeys(names)) for names in dupes)
            raise ValueError(f"duplicate teacher names: {listed}")
        return self

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def get(self, name: str) -> TeacherEntry:
        for t in self.teachers:
            if t.name == name:
                return t
        raise DmmError(f"no teacher named {name!r} in the manifest; known: {', '.join(self.names)}")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ""
        for p in err["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else (f".{p}" if loc else str(p))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def check_inside(path: Path, repo_root: Path, what: str, shown: str | None = None) -> Path:
    """``path`` resolved (symlinks followed); DmmError if it lies outside ``repo_root``.

    ``shown`` is how the user wrote the path, for the message.
    """
    root = Path(repo_root).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        written = shown if shown is not None else str(path)
        raise DmmError(f"{what} {written!r} resolves to {resolved}, outside the project {root}")
    return resolved


def local_path(source: str, repo_root: Path | None) -> Path:
    """A local source as a path: relative paths are relative to ``repo_root`` (or the cwd)."""
    p = Path(source).expanduser()
    return p if p.is_absolute() else (Path(repo_root) if repo_root else Path.cwd()) / p


def load_manifest(path: Path, repo_root: Path | None = None) -> TeacherManifest:
    """Read and check ``data/teachers.yaml``; every problem is a one-line DmmError naming it.

    With ``repo_root``, local sources must resolve (following symlinks) inside it.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DmmError(f"{path}: teacher manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DmmError(f"{path}: cannot read the teacher manifest ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DmmError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise DmmError(f"{path}: expected a mapping with 'base' and 'teachers', got {got}")
    try:
        manifest = TeacherManifest.model_validate(raw)
    except ValidationError as exc:
        raise DmmError(f"{path}: {_validation_message(exc)}") from None
    if repo_root is not None:
        sources = [("base", manifest.base)]
        sources += [
            (f"teachers[{i}] ({t.name}) {'lora' if t.lora else 'source'}", t.origin)
            for i, t in enumerate(manifest.teachers)
        ]
        for what, source in sources:
            if is_local(source):
                try:
                    check_inside(local_path(source, repo_root), repo_root, what, source)
                except DmmError as exc:
                    raise DmmError(f"{path}: {exc}") from None
    return manifest


def manifest_sha256(path: Path) -> str:
    """SHA-256 of the manifest file's bytes (what a DVC-tracked change looks like)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise DmmError(f"{path}: teacher manifest not found") from None
