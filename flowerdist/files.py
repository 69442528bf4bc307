"""Writing folders so that a crash, a kill or an error never leaves half a result behind.

Every multi-file result (a checkpoint, the decoded-image cache, a generated data set, an
extracted archive) is written into a hidden temporary sibling and only renamed into place when
complete. A rename within one file system is atomic, so readers see the old state or the new
one, never a mix; on any error the temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temp_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder `parent/.tmp-<name>-<pid>`, removed when the block ends (success or not)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False, exist_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` when the block completes without error.

    `replace`: an existing `final` is removed first (the caller owns it, e.g. a checkpoint being
    rewritten). `exist_ok`: if another process created `final` in the meantime, ours is dropped
    (for content-addressed results such as the image cache, where both copies are identical).
    Otherwise an existing non-empty `final` makes the rename fail with OSError.
    """
    final = Path(final)
    with temp_dir(final.parent, final.name) as tmp:
        yield tmp
        if replace and (final.exists() or final.is_symlink()):
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (exist_ok and final.is_dir()):
                raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file (config.yaml, run.json, result.json) so that a kill mid-write keeps the old one whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_symlink(link: Path, target_name: str) -> None:
    """Point `link` at `target_name` (relative), replacing any previous link in one rename.

    A real folder in its place is a copy a tool made by following the link (`cp -r` of a run): the
    original it duplicates stays, so the copy is removed.
    """
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)
    os.replace(tmp, link)
