"""Atomic writes: every artifact appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DmmError(Exception):
    """A user-facing error: its message is one line that names the problem."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path) -> None:
    """Remove temporaries of ``final`` left by processes that were killed (SIGKILL, OOM)."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)(?:-|$)")
    if not final.parent.is_dir():
        return
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path | str, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``final`` on success.

    The temporary directory lives next to ``final`` so the rename stays on one
    filesystem. On any exception it is removed and ``final`` is left untouched.
    """
    final = Path(final)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise DmmError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise DmmError(f"{final} already exists")
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path | str, mode: str = "w") -> Iterator:
    """Open a temporary sibling file that is renamed onto ``final`` on success."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent
        )
    except OSError as exc:
        raise DmmError(f"cannot write to {final.parent}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def exclusive_lock(directory: Path | str, what: str) -> Iterator[None]:
    """Hold an advisory lock on ``directory`` so a second concurrent run fails fast.

    The lock lives in the kernel (flock), so a killed holder releases it.
    """
    import fcntl

    directory = Path(directory)
    made_dir = not directory.exists()
    lock_file = directory / ".lock"
    made_file = not lock_file.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fh = open(lock_file, "a")  # noqa: SIM115  (held for the block)
    except OSError as exc:
        raise DmmError(f"cannot write to {directory}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise DmmError(f"another {what} is already running in {directory}") from exc
    # A lock file nobody holds was left by a killed run: this run owns it now.
    made_file = True
    try:
        yield
    finally:
        # Leave no trace of the lock itself: a failed run must not create files.
        if made_file:
            lock_file.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
        if made_dir:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds if the run wrote nothing
