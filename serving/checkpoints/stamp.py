"""The cache stamp shared by the local checkpoint builders: a folder is reused only while it provably holds
what its recipe builds.

A build writes into a ``.partial`` sibling, hashes every file it wrote, adds a stamp file with the recipe's
digest and those sha256s, and only then renames the folder into place: an interrupted build never looks
complete, and a file altered afterwards (a truncated copy, a restored CI cache gone wrong, a hand edit) or
a recipe changed since makes the folder stale, so it is built afresh. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAMP = "tempo-recipe.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks (checkpoints run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the stamp, keyed by its POSIX path relative to ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != STAMP)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def read_stamp(folder: Path) -> dict[str, Any]:
    """The stamp's contents (``OSError``/``ValueError`` when missing or half-written)."""
    stamp = json.loads((folder / STAMP).read_text())
    if not isinstance(stamp, dict):
        raise ValueError(f"{folder / STAMP} is not a JSON object")
    return stamp


def is_current(folder: Path, digest: str) -> bool:
    """Whether ``folder`` was built by the recipe with ``digest`` and every stamped file still has its sha256."""
    try:
        stamp = read_stamp(folder)
        return stamp["digest"] == digest and all(sha256_file(folder / n) == h for n, h in stamp["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # missing, half-written or altered


def build_atomically(target: Path, digest: str, write: Callable[[Path], object], **info: Any) -> Path:
    """Run ``write(folder)`` on an empty ``<target>.partial``, stamp it and rename it to ``target``.

    ``info`` (JSON-serialisable, e.g. the recipe) is recorded in the stamp between the digest and the hashes.
    A previous ``target`` is replaced; on failure the partial folder is removed and ``target`` left as it was.
    """
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        stamp = {"digest": digest, **info, "sha256": file_hashes(tmp)}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # a build interrupted half-way never looks complete
    return target
