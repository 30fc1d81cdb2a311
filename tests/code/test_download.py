"""Download (resume, restart, checksums, errors), safe unpacking and the UrbanSound8K import.

The HTTP tests run against a real server on 127.0.0.1 written here, so Range handling is
exercised over a socket, not mocked; nothing leaves the machine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner
from web_helpers import free_port

from src import download as dl
from src.cli.data import app
from src.datasets import read_dataset, read_manifest, read_us8k
from src.preprocessing import CLASSES, load_clip

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------- a test server

@dataclass
class Served:
    """What the client asked for and what it got, per request."""

    range: str | None
    status: int
    sent: int
    encoding: str | None = None


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    cut_next_after: int | None = None  # drop the connection after this many body bytes, once
    log: list[Served] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        body = state.files.get(self.path)
        asked = self.headers.get("Range")
        if body is None:
            self._empty(404, asked)
            return
        start, status = 0, 200
        if asked and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
            if start >= len(body):
                self._empty(416, asked, {"Content-Range": f"bytes */{len(body)}"})
                return
            status = 206
        chunk = body[start:]
        length = len(chunk)
        if state.cut_next_after is not None:
            chunk, state.cut_next_after = chunk[: state.cut_next_after], None
            self.close_connection = True
        # Logged before answering: once the client has its bytes, the test may read the log.
        state.log.append(Served(asked, status, len(chunk), self.headers.get("Accept-Encoding")))
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        self.wfile.write(chunk)
        self.wfile.flush()

    def _empty(self, status: int, asked: str | None, headers: dict | None = None) -> None:
        self.server.state.log.append(Served(asked, status, 0))  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def server() -> Iterator[tuple[str, ServerState]]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState(files={"/data.bin": PAYLOAD})  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state  # type: ignore
    finally:
        httpd.shutdown()
        httpd.server_close()


def _get(url: str, dest: Path, **kwargs) -> Path:
    return dl.download(url, dest, progress=False, timeout=10, **kwargs)


# --------------------------------------------------------------------------- download

def test_full_download_with_checksums(server, tmp_path):
    base, state = server
    dest = tmp_path / "sub" / "data.bin"
    assert _get(f"{base}/data.bin", dest, md5=MD5, sha256=SHA256) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("data.bin.part").exists()
    assert [(s.range, s.status, s.sent) for s in state.log] == [(None, 200, len(PAYLOAD))]
    assert state.log[0].encoding == "identity"  # offsets must count the file's own bytes


def test_a_folder_as_dest_takes_the_name_from_the_url(server, tmp_path):
    base, _ = server
    assert _get(f"{base}/data.bin", tmp_path, md5=MD5) == tmp_path / "data.bin"


def test_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    base, state = server
    dest = tmp_path / "data.bin"
    done = 123_457
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:done])
    _get(f"{base}/data.bin", dest, md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert [(s.range, s.status, s.sent) for s in state.log] == [
        (f"bytes={done}-", 206, len(PAYLOAD) - done)]


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    base, state = server
    state.ignore_range = True
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:1000])
    _get(f"{base}/data.bin", dest, sha256=SHA256)
    assert dest.read_bytes() == PAYLOAD  # not the 1000 bytes twice
    assert [(s.range, s.status, s.sent) for s in state.log] == [
        ("bytes=1000-", 200, len(PAYLOAD))]


def test_416_on_a_complete_part_file_finishes(server, tmp_path):
    base, state = server
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD)
    _get(f"{base}/data.bin", dest, md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert [(s.status, s.sent) for s in state.log] == [(416, 0)]


def test_part_file_longer_than_the_file_is_discarded(server, tmp_path):
    base, state = server
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD + b"junk")
    _get(f"{base}/data.bin", dest, md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert [s.status for s in state.log] == [416, 200]


def test_broken_connection_is_resumed_automatically(server, tmp_path):
    base, state = server
    state.cut_next_after = 50_000
    dest = tmp_path / "data.bin"
    _get(f"{base}/data.bin", dest, md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert [(s.range, s.sent) for s in state.log] == [
        (None, 50_000), ("bytes=50000-", len(PAYLOAD) - 50_000)]


def test_checksum_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    base, _ = server
    dest = tmp_path / "data.bin"
    with pytest.raises(dl.ChecksumError, match="md5 mismatch") as err:
        _get(f"{base}/data.bin", dest, md5="0" * 32)
    assert "deleted" in err.value.message
    assert not dest.exists() and not dest.with_name("data.bin.part").exists()


def test_existing_good_file_is_not_downloaded_again(server, tmp_path):
    base, state = server
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    _get(f"{base}/data.bin", dest, md5=MD5)
    assert state.log == []


def test_http_404_is_a_clear_error(server, tmp_path):
    base, _ = server
    dest = tmp_path / "nope.bin"
    with pytest.raises(dl.DownloadError, match="HTTP 404") as err:
        _get(f"{base}/nope.bin", dest)
    assert "\n" not in err.value.message
    assert not dest.exists() and not dest.with_name("nope.bin.part").exists()


def test_connection_refused_is_a_clear_error(tmp_path):
    port = free_port()  # a port that was free a moment ago: nothing listens there
    with pytest.raises(dl.NetworkError, match="connection refused") as err:
        _get(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path / "x.tar.gz")
    assert err.value.message.startswith("cannot reach 127.0.0.1")


def test_official_constants():
    assert dl.US8K_URL == "https://zenodo.org/records/1203745/files/UrbanSound8K.tar.gz"
    assert re.fullmatch(r"[0-9a-f]{32}", dl.US8K_MD5)
    assert dl.archive_name(dl.US8K_URL) == "UrbanSound8K.tar.gz"


# --------------------------------------------------------------------------- extraction

def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"hello") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@pytest.mark.parametrize(("member", "reason"), [
    (_file("../evil.txt"), "leaves the target"),
    (_file("UrbanSound8K/../../evil.txt"), "leaves the target"),
    (_file("/tmp/evil-urbansound-test.txt"), "absolute"),
])
def test_extract_refuses_escaping_members(tmp_path, member, reason):
    archive = _tar(tmp_path / "bad.tar.gz", [_file("UrbanSound8K/ok.txt"), member])
    dest = tmp_path / "out"
    with pytest.raises(dl.ArchiveError, match=reason):
        dl.extract_archive(archive, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil-urbansound-test.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # nothing at all was written


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_extract_refuses_links_and_devices(tmp_path, kind):
    info = tarfile.TarInfo("UrbanSound8K/trap")
    info.type, info.linkname = kind, "/etc/passwd"
    archive = _tar(tmp_path / "bad.tar.gz", [(info, None)])
    with pytest.raises(dl.ArchiveError, match=r"link|device"):
        dl.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "UrbanSound8K" / "trap").exists()


def test_extract_a_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(dl.ArchiveError, match="cannot unpack"):
        dl.extract_archive(archive, tmp_path / "out")


def test_extract_returns_the_data_set_root_and_skips_a_second_time(tmp_path):
    src = _fake_us8k(tmp_path / "src")
    archive = tmp_path / "UrbanSound8K.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="UrbanSound8K")
    root = dl.extract_archive(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "UrbanSound8K"
    assert len(read_us8k(root)) == len(read_us8k(src))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".extracting")]
    marker = root / "audio" / "fold1" / "note.txt"
    marker.write_text("kept")  # a second call with the same archive must not unpack again
    assert dl.extract_archive(archive, tmp_path / "out") == root
    assert marker.read_text() == "kept"


# --------------------------------------------------------------------------- import

FAKE = [  # file, fsID, fold, classID, samplerate, channels, subtype
    ("100-3-0-0.wav", "100", 1, 3, 22050, 1, "PCM_16"),
    ("100-3-0-1.wav", "100", 1, 3, 22050, 1, "PCM_16"),
    ("200-8-0-0.wav", "200", 1, 8, 44100, 2, "PCM_24"),
    ("300-0-1-4.wav", "300", 2, 0, 48000, 1, "FLOAT"),
    ("400-6-0-0.wav", "400", 3, 6, 16000, 1, "PCM_U8"),
    ("500-9-2-7.wav", "500", 3, 9, 8000, 2, "PCM_16"),
]
MISSING = ("999-1-0-0.wav", "999", 2, 1)  # in the metadata, not on disk: subsets are normal


def _fake_us8k(root: Path) -> Path:
    """A tiny UrbanSound8K tree with the format variety of the real one."""
    rng = np.random.default_rng(1)
    (root / "metadata").mkdir(parents=True)
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold",
                         "classID", "class"])
        for name, fsid, fold, class_id, sr, channels, subtype in FAKE:
            path = root / "audio" / f"fold{fold}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, rng.uniform(-0.5, 0.5, (sr // 2, channels)), sr, subtype=subtype)
            writer.writerow([name, fsid, 0, 0.5, 1, fold, class_id, CLASSES[class_id]])
        name, fsid, fold, class_id = MISSING
        writer.writerow([name, fsid, 0, 0.5, 1, fold, class_id, CLASSES[class_id]])
    return root


def test_import_fake_us8k_keeps_folds_groups_and_bytes(tmp_path):
    src = _fake_us8k(tmp_path / "UrbanSound8K")
    data = tmp_path / "data"
    summary = dl.import_us8k(src, data, test_folds={3}, progress=False)
    assert (summary["train"], summary["test"]) == (4, 2)
    assert summary["linked"] + summary["copied"] == 6 and summary["skipped"] == 0
    assert summary["folds"] == [1, 2, 3]
    clips = {c.path.name: c for c in read_dataset(data)}
    assert set(clips) == {name for name, *_ in FAKE}
    for name, fsid, fold, class_id, *_ in FAKE:
        clip = clips[name]
        split = "test" if fold == 3 else "train"
        assert clip.path == data / split / CLASSES[class_id] / name
        assert (clip.label, clip.fold, clip.group, clip.source) == (
            CLASSES[class_id], fold, fsid, "us8k")
        assert clip.path.read_bytes() == (src / "audio" / f"fold{fold}" / name).read_bytes()
        assert load_clip(clip.path).ndim == 1  # every format variant decodes
    assert read_manifest(data / "test")["gun_shot/400-6-0-0.wav"]["group"] == "400"


def test_import_hardlinks_when_it_can_and_copies_when_asked(tmp_path):
    src = _fake_us8k(tmp_path / "UrbanSound8K")
    original = src / "audio" / "fold1" / "100-3-0-0.wav"
    linked = dl.import_us8k(src, tmp_path / "a", progress=False)
    assert linked["linked"] == 6  # same file system: no bytes duplicated
    assert (tmp_path / "a" / "train" / "dog_bark" / original.name).samefile(original)
    copied = dl.import_us8k(src, tmp_path / "b", progress=False, link=False)
    assert copied["copied"] == 6
    assert not (tmp_path / "b" / "train" / "dog_bark" / original.name).samefile(original)


def test_import_is_idempotent_and_moves_clips_between_splits(tmp_path):
    src = _fake_us8k(tmp_path / "UrbanSound8K")
    data = tmp_path / "data"
    dl.import_us8k(src, data, test_folds={3}, progress=False)
    before = sorted(p.relative_to(data) for p in data.rglob("*.wav"))
    again = dl.import_us8k(src, data, test_folds={3}, progress=False)
    assert again["skipped"] == 6 and again["moved"] == 0
    assert sorted(p.relative_to(data) for p in data.rglob("*.wav")) == before
    assert len(read_dataset(data)) == 6
    moved = dl.import_us8k(src, data, test_folds={1}, progress=False)
    assert moved["moved"] == 5  # fold 1 (3 clips) to test, fold 3 (2 clips) to train
    names = [p.name for p in data.rglob("*.wav")]
    assert len(names) == len(set(names)) == 6  # a clip is never in both splits
    clips = read_dataset(data)
    assert {c.fold for c in clips if c.path.is_relative_to(data / "test")} == {1}
    assert len(read_manifest(data / "train")) == 3 and len(read_manifest(data / "test")) == 3


def test_import_accepts_the_folder_the_archive_was_unpacked_into(tmp_path):
    _fake_us8k(tmp_path / "downloads" / "UrbanSound8K")
    summary = dl.import_us8k(tmp_path / "downloads", tmp_path / "data", progress=False)
    assert summary["train"] == 6 and summary["test"] == 0


def test_import_errors_are_clear(tmp_path):
    with pytest.raises(dl.ImportDataError, match="no such folder"):
        dl.import_us8k(tmp_path / "missing", tmp_path / "data", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(dl.ImportDataError, match=r"metadata/UrbanSound8K\.csv"):
        dl.import_us8k(tmp_path / "empty", tmp_path / "data", progress=False)
    src = _fake_us8k(tmp_path / "UrbanSound8K")
    with pytest.raises(dl.ImportDataError, match="folds"):
        dl.import_us8k(src, tmp_path / "data", folds={7}, progress=False)


def test_import_refuses_a_folder_holding_the_synthetic_set(tmp_path):
    from src.synth import generate

    generate(tmp_path / "data", per_class=1, test_per_class=0, progress=False)
    src = _fake_us8k(tmp_path / "UrbanSound8K")
    with pytest.raises(dl.ImportDataError, match="not UrbanSound8K"):
        dl.import_us8k(src, tmp_path / "data", progress=False)
    assert {c.source for c in read_dataset(tmp_path / "data")} == {"synthetic"}
    for split in ("train", "test"):  # once the synthetic clips are gone, so is their label
        shutil.rmtree(tmp_path / "data" / split)
    dl.import_us8k(src, tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "SYNTHETIC.md").exists()


def test_import_real_subset_folds_4_to_9(us8k, tmp_path):
    """The real thing: FLAC clips named by the official metadata, imported without touching
    the shared copy (``link=False``: not even a new hardlink count on its files)."""
    data = tmp_path / "data"
    summary = dl.import_us8k(us8k, data, test_folds={9}, folds=set(range(4, 10)),
                             progress=False, link=False)
    expected = read_us8k(us8k, set(range(4, 10)))
    assert summary["train"] + summary["test"] == len(expected) == 37
    assert summary["test"] == len([c for c in expected if c.fold == 9])
    clips = {c.path.name: c for c in read_dataset(data)}
    for ref in expected:
        clip = clips[ref.path.name]
        split = "test" if ref.fold == 9 else "train"
        assert clip.path == data / split / ref.label / ref.path.name
        assert (clip.label, clip.fold, clip.group, clip.source) == (
            ref.label, ref.fold, ref.group, "us8k")
        assert clip.path.stat().st_size == ref.path.stat().st_size
        assert not clip.path.samefile(ref.path)
    assert load_clip(next(iter(clips.values())).path).shape == (88_200,)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return result.stderr


def test_cli_import_missing_dir(tmp_path):
    result = runner.invoke(app, ["import", str(tmp_path / "nowhere"), "--data",
                                 str(tmp_path / "data")])
    assert "no such folder" in _one_line_error(result)


def test_cli_import_into_the_configured_data_dir(isolated_settings, tmp_path):
    src = _fake_us8k(tmp_path / "UrbanSound8K")
    result = runner.invoke(app, ["import", str(src), "--test-fold", "2", "--test-fold", "3",
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert "3 train, 3 test" in result.stdout
    clips = read_dataset(isolated_settings.data_dir)
    assert {c.fold for c in clips if c.path.is_relative_to(
        isolated_settings.data_dir / "test")} == {2, 3}


def test_cli_download_fetches_unpacks_and_imports(server, isolated_settings, tmp_path):
    base, state = server
    src = _fake_us8k(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="UrbanSound8K")
    state.files["/UrbanSound8K.tar.gz"] = buf.getvalue()
    md5 = hashlib.md5(buf.getvalue()).hexdigest()
    result = runner.invoke(app, ["download", "--url", f"{base}/UrbanSound8K.tar.gz",
                                 "--md5", md5, "--test-fold", "3", "-q"])
    assert result.exit_code == 0, result.output
    assert "md5 verified" in result.stdout
    archive = isolated_settings.state_dir / "downloads" / "UrbanSound8K.tar.gz"
    assert archive.read_bytes() == buf.getvalue()
    clips = read_dataset(isolated_settings.data_dir)
    assert len(clips) == 6 and {c.source for c in clips} == {"us8k"}


def test_cli_download_bad_checksum_is_one_line(server, isolated_settings, tmp_path):
    base, _ = server
    result = runner.invoke(app, ["download", "--url", f"{base}/data.bin", "--md5", "0" * 32,
                                 "--dest", str(tmp_path / "dl"), "--no-import", "-q"])
    assert "md5 mismatch" in _one_line_error(result)
    assert not (tmp_path / "dl" / "data.bin").exists()


def test_cli_download_checks_the_import_target_before_downloading(server, isolated_settings):
    from src.synth import generate

    base, state = server
    generate(isolated_settings.data_dir, per_class=1, test_per_class=0, progress=False)
    result = runner.invoke(app, ["download", "--url", f"{base}/data.bin", "-q"])
    assert "not UrbanSound8K" in _one_line_error(result)
    assert state.log == []  # refused before a single byte was fetched
