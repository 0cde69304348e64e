"""Atomic writes: nothing a user produced is half-written or lost when a process is killed.

Every directory (checkpoint, adapter, merged export) and result file is written next to its
final place and renamed into it; an existing target is only removed once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def _replace_dir(src: str, dst: str) -> None:
    """Move `src` to `dst`; an existing `dst` is kept aside until the move has succeeded."""
    if not os.path.exists(dst):
        os.replace(src, dst)
        return
    aside = f"{dst}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, aside)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
    """Yield a sibling temp directory to fill; on success it replaces `out_dir`, on error it is removed."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a sibling temp path to write; on success it is renamed to `path`, on error removed."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cache_root() -> str:
    """Where PeRL caches what it builds once (the toy cold start, converted GGUF models, held-out
    evaluations of a base model): $PERL_CACHE, else ~/.cache/perl."""
    return os.environ.get("PERL_CACHE", os.path.expanduser("~/.cache/perl"))


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (checkpoint manifests, the held-out cache key)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
