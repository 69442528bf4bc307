"""download() over file:// URLs and safe_extract() on hostile or broken tarballs built here."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile

import pytest

from flowerdist.data import FLOWER_CLASSES
from flowerdist.data.download import download, safe_extract
from flowerdist.errors import FlowerdistError


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _flower_tarball(path, extra=()):
    """flower_photos/<class>/x.jpg for every class, a LICENSE.txt, then `extra` (name, data, attrs) entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "flower_photos", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "flower_photos/LICENSE.txt", b"CC-BY\n")
        for name in FLOWER_CLASSES:
            _add(tar, f"flower_photos/{name}", type=tarfile.DIRTYPE, mode=0o755)
            _add(tar, f"flower_photos/{name}/x.jpg", f"jpeg of {name}".encode())
        for name, data, attrs in extra:
            _add(tar, name, data, **attrs)
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def served(tmp_path):
    """A good archive outside the output folder, with its file:// URL and digest."""
    archive = _flower_tarball(tmp_path / "server" / "flower_photos.tgz")
    return archive, archive.as_uri(), _sha(archive)


def test_download_fetches_verifies_and_extracts(tmp_path, served):
    _, url, digest = served
    out = tmp_path / "data"
    final = download(out, url=url, sha256=digest, progress=False)
    assert final == out / "flower_photos"
    for name in FLOWER_CLASSES:
        assert (final / name / "x.jpg").read_bytes() == f"jpeg of {name}".encode()
    assert (final / "LICENSE.txt").is_file()
    assert _tree(out)[0] == "flower_photos"  # no .part, no hidden temp folder
    assert sorted(p.name for p in out.iterdir()) == ["flower_photos", "flower_photos.tgz"]


def test_wrong_checksum_deletes_the_file_and_extracts_nothing(tmp_path, served):
    _, url, digest = served
    out = tmp_path / "data"
    wrong = "0" * 64
    with pytest.raises(FlowerdistError, match=f"flower_photos.tgz.*{digest}.*expected {wrong}"):
        download(out, url=url, sha256=wrong, progress=False)
    assert list(out.iterdir()) == []


def test_existing_folder_is_kept_without_reading_the_url(tmp_path):
    out = tmp_path / "data"
    (out / "flower_photos").mkdir(parents=True)
    missing = (tmp_path / "nowhere" / "flower_photos.tgz").as_uri()
    assert download(out, url=missing, progress=False) == out / "flower_photos"
    assert _tree(out) == ["flower_photos"]


def test_archive_placed_by_hand_is_used_without_downloading(tmp_path, served):
    archive, _, digest = served
    out = tmp_path / "data"
    out.mkdir()
    (out / "flower_photos.tgz").write_bytes(archive.read_bytes())
    missing = (tmp_path / "nowhere" / "flower_photos.tgz").as_uri()
    final = download(out, url=missing, sha256=digest, progress=False)
    assert (final / "daisy" / "x.jpg").is_file()


def test_archive_placed_by_hand_with_a_wrong_digest_is_refused(tmp_path, served):
    _, url, _ = served
    out = tmp_path / "data"
    out.mkdir()
    (out / "flower_photos.tgz").write_bytes(b"not the archive")
    with pytest.raises(FlowerdistError, match="flower_photos.tgz has SHA-256 .* delete it and rerun"):
        download(out, url=url, progress=False)
    assert not (out / "flower_photos").exists()


def test_unreachable_url_says_how_to_place_the_archive(tmp_path):
    out = tmp_path / "data"
    url = (tmp_path / "nowhere" / "flower_photos.tgz").as_uri()
    with pytest.raises(FlowerdistError) as err:
        download(out, url=url, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"could not reach {url}" in msg and str(out / "flower_photos.tgz") in msg
    assert list(out.iterdir()) == []


def test_truncated_archive_leaves_no_partial_folder(tmp_path):
    full = tmp_path / "full.tgz"
    with tarfile.open(full, "w:gz") as tar:
        for i in range(8):
            _add(tar, f"flower_photos/daisy/{i}.jpg", os.urandom(64 * 1024))  # incompressible
    archive = tmp_path / "src" / "flower_photos.tgz"
    archive.parent.mkdir()
    archive.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out = tmp_path / "data"
    with pytest.raises(FlowerdistError, match="could not extract .*flower_photos.tgz.*delete it and rerun"):
        safe_extract(archive, out)
    assert list(out.iterdir()) == []  # neither flower_photos nor the hidden temp folder


def test_truncated_download_with_a_matching_digest_still_fails_cleanly(tmp_path):
    full = tmp_path / "full.tgz"
    with tarfile.open(full, "w:gz") as tar:
        _add(tar, "flower_photos/daisy/a.jpg", os.urandom(256 * 1024))
    archive = tmp_path / "server" / "flower_photos.tgz"
    archive.parent.mkdir()
    archive.write_bytes(full.read_bytes()[:-1000])
    out = tmp_path / "data"
    with pytest.raises(FlowerdistError, match="could not extract"):
        download(out, url=archive.as_uri(), sha256=_sha(archive), progress=False)
    assert not (out / "flower_photos").exists()


@pytest.mark.parametrize(
    "evil",
    ["flower_photos/../../evil.txt", "../evil.txt", "{tmp}/evil-absolute.txt", "flower_photos/a/../../../evil.txt"],
)
def test_path_escape_refuses_the_whole_archive(tmp_path, evil):
    evil = evil.format(tmp=tmp_path)  # an absolute path, inside this test's own folder
    archive = _flower_tarball(tmp_path / "src" / "flower_photos.tgz", [(evil, b"pwned", {})])
    out = tmp_path / "deep" / "data"
    with pytest.raises(FlowerdistError, match=re.escape(repr(evil)) + ".*refusing"):
        safe_extract(archive, out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "evil-absolute.txt").exists()


def test_links_and_special_files_are_skipped(tmp_path, caplog):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    extra = [
        ("flower_photos/daisy/link.jpg", None, {"type": tarfile.SYMTYPE, "linkname": str(outside)}),
        ("flower_photos/daisy/rel.jpg", None, {"type": tarfile.SYMTYPE, "linkname": "../../../outside.txt"}),
        ("flower_photos/daisy/hard.jpg", None, {"type": tarfile.LNKTYPE, "linkname": "flower_photos/daisy/x.jpg"}),
        ("flower_photos/daisy/hard2.jpg", None, {"type": tarfile.LNKTYPE, "linkname": str(outside)}),
        ("flower_photos/fifo", None, {"type": tarfile.FIFOTYPE}),
        ("flower_photos/dev", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
    ]
    archive = _flower_tarball(tmp_path / "src" / "flower_photos.tgz", extra)
    out = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="flowerdist.data.download"):
        final = safe_extract(archive, out)
    assert final == out / "flower_photos"
    assert "skipped 6 link(s) or special file(s)" in caplog.text
    assert sorted(p.name for p in (final / "daisy").iterdir()) == ["x.jpg"]
    assert not [p for p in out.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())]
    assert outside.read_text() == "secret"


def test_dot_slash_names_are_fine(tmp_path):
    archive = tmp_path / "src" / "flower_photos.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, ".", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "./flower_photos/daisy/x.jpg", b"abc")
    assert (safe_extract(archive, tmp_path / "data") / "daisy" / "x.jpg").read_bytes() == b"abc"


def test_extract_refuses_to_overwrite_an_existing_folder(tmp_path, served):
    archive, _, _ = served
    out = tmp_path / "data"
    (out / "flower_photos").mkdir(parents=True)
    (out / "flower_photos" / "mine.txt").write_text("keep")
    with pytest.raises(FlowerdistError, match="flower_photos already exists.*delete it"):
        safe_extract(archive, out)
    assert _tree(out) == ["flower_photos", "flower_photos/mine.txt"]


def test_extracted_files_are_plain_and_readable(tmp_path):
    archive = tmp_path / "src" / "flower_photos.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, "flower_photos/daisy/x.jpg", b"abc", mode=0o4777)  # setuid and world-writable
    final = safe_extract(archive, tmp_path / "data")
    mode = (final / "daisy" / "x.jpg").stat().st_mode
    assert not mode & 0o4000 and not mode & 0o002
