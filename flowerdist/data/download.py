"""`flowerdist data download`: TensorFlow's flower_photos, verified and extracted safely.

The archive is streamed to a `.part` file with a progress bar, checked against its SHA-256,
and extracted into a temporary sibling folder that is renamed into place only when complete.
Only regular files and folders inside the target are extracted: absolute paths and `..`
refuse the archive; links, devices and FIFOs are skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from flowerdist.errors import FlowerdistError

FLOWER_PHOTOS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWER_PHOTOS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWER_PHOTOS_BYTES = 228_813_984
ARCHIVE_NAME = "flower_photos.tgz"
FOLDER_NAME = "flower_photos"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(out: str | Path = "data", url: str = FLOWER_PHOTOS_URL, sha256: str = FLOWER_PHOTOS_SHA256, progress: bool = True) -> Path:
    """Fetch, verify and extract; returns OUT/flower_photos. Skips the work that is already done."""
    out = Path(out)
    final = out / FOLDER_NAME
    if final.is_dir():
        return final
    out.mkdir(parents=True, exist_ok=True)
    archive = out / ARCHIVE_NAME
    if not (archive.is_file() and sha256_of(archive) == sha256):
        _fetch(url, archive, progress)
        digest = sha256_of(archive)
        if digest != sha256:
            archive.unlink()
            raise FlowerdistError(f"{archive} from {url} has SHA-256 {digest}, expected {sha256}; the file was deleted, run the command again")
    return safe_extract(archive, out, FOLDER_NAME)


def _fetch(url: str, dest: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, part.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        raise FlowerdistError(
            f"cannot download {url} ({getattr(err, 'reason', err)}); download it elsewhere and put it at {dest}, then run the command again"
        ) from None
    os.replace(part, dest)


def safe_extract(archive: Path, out: Path, folder: str = FOLDER_NAME) -> Path:
    """Extract `folder/` of the archive into OUT atomically; returns OUT/folder."""
    out = Path(out)
    final = out / folder
    tmp = out / f".{folder}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    skipped = 0
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                name = m.name
                if name.startswith("/") or ".." in Path(name).parts or not (tmp / name).resolve().is_relative_to(tmp.resolve()):
                    raise FlowerdistError(f"{archive} holds the unsafe path '{name}' (outside the target folder); refusing to extract it")
                if m.isfile() or m.isdir():
                    members.append(m)
                else:
                    skipped += 1  # symlinks, hard links, devices, FIFOs
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / folder).is_dir():
            raise FlowerdistError(f"{archive} has no top-level '{folder}/' folder; is it the flower_photos archive?")
        os.replace(tmp / folder, final)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise FlowerdistError(f"{archive} is damaged ({err}); delete it and run the command again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if skipped:
        print(f"flowerdist: skipped {skipped} link/device entries of {archive.name}")
    return final
