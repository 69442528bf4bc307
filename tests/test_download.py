"""flowerdist data download on tarballs the tests build: verified, safe, atomic (no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from flowerdist.data.download import download, safe_extract
from flowerdist.errors import FlowerdistError


def add(tar, name, data=b"x", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def make_archive(path, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        for c in ("daisy", "roses"):
            add(tar, f"flower_photos/{c}/1.jpg", b"jpeg-" + c.encode())
        add(tar, "flower_photos/LICENSE.txt", b"CC-BY")
        for name, kw in extra:
            add(tar, name, **kw)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(tmp_path):
    src = tmp_path / "src" / "flower_photos.tgz"
    src.parent.mkdir()
    digest = make_archive(src)
    out = tmp_path / "data"
    folder = download(out, url=src.as_uri(), sha256=digest, progress=False)
    assert folder == out / "flower_photos"
    assert (folder / "daisy" / "1.jpg").read_bytes() == b"jpeg-daisy" and (folder / "LICENSE.txt").is_file()
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.part"))
    src.unlink()  # done once: a second call reads nothing
    assert download(out, url=src.as_uri(), sha256=digest, progress=False) == folder


def test_wrong_checksum_deletes_the_file_and_extracts_nothing(tmp_path):
    src = tmp_path / "a.tgz"
    make_archive(src)
    out = tmp_path / "data"
    with pytest.raises(FlowerdistError, match="has SHA-256 .* expected 0000"):
        download(out, url=src.as_uri(), sha256="0" * 64, progress=False)
    assert not (out / "flower_photos").exists() and not (out / "flower_photos.tgz").exists()


def test_unreachable_url_says_where_to_put_the_file(tmp_path):
    with pytest.raises(FlowerdistError, match="cannot download .*put it at .*flower_photos.tgz"):
        download(tmp_path, url=(tmp_path / "missing.tgz").as_uri(), progress=False)


def test_manually_placed_archive_is_used(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    digest = make_archive(out / "flower_photos.tgz")
    assert (download(out, url="http://unreachable.invalid/x.tgz", sha256=digest, progress=False) / "roses" / "1.jpg").is_file()


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/abs_evil.txt", "flower_photos/../../evil.txt"])
def test_path_escapes_refuse_the_archive(tmp_path, name):
    src = tmp_path / "bad.tgz"
    make_archive(src, [(name, {})])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FlowerdistError, match="unsafe path"):
        safe_extract(src, out)
    assert list(out.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_links_and_devices_are_skipped(tmp_path):
    src = tmp_path / "links.tgz"
    make_archive(src, [
        ("flower_photos/daisy/link.jpg", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
        ("flower_photos/daisy/hard.jpg", {"type": tarfile.LNKTYPE, "linkname": "flower_photos/roses/1.jpg"}),
        ("flower_photos/daisy/fifo", {"type": tarfile.FIFOTYPE}),
    ])
    folder = safe_extract(src, tmp_path / "out")
    assert sorted(p.name for p in (folder / "daisy").iterdir()) == ["1.jpg"]


def test_damaged_archive_leaves_no_folder(tmp_path):
    src = tmp_path / "cut.tgz"
    make_archive(src)
    src.write_bytes(src.read_bytes()[:60])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FlowerdistError, match="is damaged"):
        safe_extract(src, out)
    assert list(out.iterdir()) == []
