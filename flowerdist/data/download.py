"""Download and safely extract TensorFlow's flower_photos set (3,670 photos, 5 classes, CC-BY).

`download(out)` fetches the archive into `out` (streamed to a ``.part`` file, SHA-256 checked),
then `safe_extract`s it to ``out/flower_photos``. Nothing is fetched when that folder exists, and an
archive already placed at ``out/flower_photos.tgz`` (e.g. copied by hand on an offline machine) is
used when its checksum matches.

`safe_extract` writes only regular files and folders that stay inside the target, skips links and
special files (and says how many), refuses archives whose paths escape the target, and extracts into
a hidden sibling folder that is renamed into place only when complete: a failure or a kill never
leaves a partial ``flower_photos`` folder behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from flowerdist.errors import FlowerdistError
from flowerdist.files import temp_dir

__all__ = [
    "FLOWER_PHOTOS_SHA256",
    "FLOWER_PHOTOS_SIZE",
    "FLOWER_PHOTOS_URL",
    "download",
    "safe_extract",
    "sha256sum",
]

log = logging.getLogger(__name__)

FLOWER_PHOTOS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWER_PHOTOS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWER_PHOTOS_SIZE = 228_813_984  # bytes
FOLDER = "flower_photos"  # the archive's top-level folder

_CHUNK = 1 << 20
_TIMEOUT_S = 60
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def sha256sum(path: Path) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _archive_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name or f"{FOLDER}.tgz"


def _fetch(url: str, dest: Path, sha256: str | None, progress: bool) -> None:
    """Stream `url` to ``dest.part``, check its digest, then rename it to `dest`."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    manual = f"download {url} by other means, put it at {dest} and rerun"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp, open(part, "wb") as f:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except _NETWORK_ERRORS as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise FlowerdistError(f"could not reach {url} ({reason}): {manual}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if total is not None and part.stat().st_size != total:
        size = part.stat().st_size
        part.unlink()
        raise FlowerdistError(f"download of {url} stopped after {size} of {total} bytes: rerun, or {manual}")
    actual = h.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        part.unlink()
        raise FlowerdistError(
            f"{dest.name} downloaded from {url} has SHA-256 {actual}, expected {sha256}: the file was deleted; "
            f"rerun, or {manual}"
        )
    os.replace(part, dest)


def download(
    out: str | Path = "data",
    url: str = FLOWER_PHOTOS_URL,
    sha256: str | None = FLOWER_PHOTOS_SHA256,
    progress: bool = True,
) -> Path:
    """Fetch and extract flower_photos under `out`; return the extracted ``out/flower_photos`` folder.

    Skipped when that folder exists. An archive already at ``out/<archive name>`` whose digest
    matches `sha256` is used as is; `sha256=None` skips the check. The archive is kept after
    extraction. Raises `FlowerdistError` for an unreachable URL, a checksum mismatch or a bad archive.
    """
    out = Path(out)
    final = out / FOLDER
    if final.is_dir():
        log.info("%s exists: nothing to download", final)
        return final
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FlowerdistError(f"--out {out} cannot be a folder ({err.strerror}): pass --out DIR, a folder to download into") from None
    archive = out / _archive_name(url)
    if archive.is_file():
        actual = sha256sum(archive)
        if sha256 is not None and actual != sha256.lower():
            raise FlowerdistError(
                f"{archive} has SHA-256 {actual}, expected {sha256}: it is damaged or another file; delete it and rerun"
            )
        log.info("using %s (checksum ok)", archive)
    else:
        _fetch(url, archive, sha256, progress)
    extracted = safe_extract(archive, out)
    if extracted != final or not final.is_dir():
        raise FlowerdistError(
            f"{archive} has no single top-level {FOLDER}/ folder: it is not the flower_photos archive; "
            f"delete it and what it extracted under {out}, then rerun"
        )
    return final


def _check_member(m: tarfile.TarInfo, target: Path, archive: Path) -> bool:
    """True to extract `m`, False to skip it (a link or special file); raises if its path escapes `target`."""
    name = m.name
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise FlowerdistError(
            f"{archive} contains the unsafe path {name!r} (absolute or with '..'): refusing to extract it; "
            "get the archive from a trusted source"
        )
    dest = (target / name).resolve()
    if dest != target and target not in dest.parents:
        raise FlowerdistError(
            f"{archive} contains {name!r}, which would be written outside {target}: refusing to extract it; "
            "get the archive from a trusted source"
        )
    return m.isreg() or m.isdir()


def safe_extract(archive: Path, out: Path) -> Path:
    """Extract `archive` into `out` safely and atomically; return what it created.

    Only regular files and folders whose paths stay inside `out` are written; symlinks, hardlinks,
    devices and fifos are skipped (their count is logged as a warning); an absolute path, a ``..`` or
    any other escape refuses the whole archive. Everything is extracted into a hidden sibling folder
    and each top-level entry is renamed into `out` only when all of it is there, so a failure leaves
    nothing behind. Returns ``out/<name>`` when the archive has a single top-level entry, else `out`.
    Raises `FlowerdistError` for an unsafe, damaged or truncated archive, or a top-level entry that
    already exists in `out`.
    """
    archive, out = Path(archive), Path(out)
    skipped = 0

    def members(tar: tarfile.TarFile, target: Path):
        nonlocal skipped
        for m in tar:
            if _check_member(m, target, archive):
                yield m
            else:
                skipped += 1

    with temp_dir(out, f"extract-{archive.name}") as tmp:
        target = tmp.resolve()
        try:
            with tarfile.open(archive, "r:*") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(target, members=members(tar, target), filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(target, members=members(tar, target))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise FlowerdistError(
                f"could not extract {archive} ({e}): if it is truncated or damaged, delete it and rerun"
            ) from None
        entries = sorted(p.name for p in tmp.iterdir())
        if not entries:
            raise FlowerdistError(f"{archive} holds no files to extract: delete it and rerun")
        clash = [name for name in entries if (out / name).exists() or (out / name).is_symlink()]
        if clash:
            raise FlowerdistError(
                f"{out / clash[0]} already exists: delete it (or move it away) and rerun to extract {archive}"
            )
        for name in entries:
            os.replace(tmp / name, out / name)
    if skipped:
        log.warning("skipped %d link(s) or special file(s) in %s", skipped, archive)
    return out / entries[0] if len(entries) == 1 else out
