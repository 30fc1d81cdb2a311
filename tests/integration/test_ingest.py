"""Upload ingestion against real databases, real UrbanSound8K clips and hostile inputs.

Real clips are read from ``../shared/us8k`` (copied into tmp_path only); everything else is
generated here: broken audio of every kind, and archives built to attack the extractor.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from web_helpers import audio_bytes

from src import db
from src.ingest import (
    IngestError,
    clips_as_dataset,
    count_unused,
    find_orphans,
    ingest,
    mark_used,
    unused_clips,
    upload_stats,
)
from src.jobs import get_or_create_job
from src.preprocessing import CLASSES
from src.settings import Settings

pytestmark = pytest.mark.integration

US8K = Path(__file__).resolve().parents[2].parent / "shared" / "us8k"


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def real_clips() -> list[tuple[str, Path]]:
    """Two clips of each of four classes from fold 1: (label, path), read-only."""
    folder = US8K / "audio" / "fold1"
    if not folder.is_dir():
        reason = f"UrbanSound8K subset not found at {US8K}"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    picked: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.flac")):
        label = CLASSES[int(path.stem.split("-")[1])]
        if label in ("dog_bark", "siren", "drilling", "car_horn") and len(
                picked.setdefault(label, [])) < 2:
            picked[label].append(path)
    return [(label, p) for label, paths in picked.items() for p in paths]


def settings_for(tmp_path: Path, url: str, **overrides) -> Settings:
    return Settings(state_dir=tmp_path / "state", database_url=url, **overrides)


def noise(seconds: float, sr: int = 22_050, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(round(seconds * sr))).astype(np.float32)


def stored_files(settings: Settings) -> list[Path]:
    """Every file under uploads_dir except the lock file."""
    root = settings.uploads_dir
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".ingest.lock")


def rows(url: str, model: type) -> list:
    with db.session_scope(url) as session:
        return list(session.scalars(sa.select(model)))


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def by_name(report) -> dict[str, object]:
    return {r.name: r for r in report.results}


# --------------------------------------------------------------------------- accepted clips

def test_real_clips_are_stored_and_recorded(db_url, tmp_path, real_clips):
    src = tmp_path / "incoming"
    for label, path in real_clips:
        (src / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / label / path.name)
    settings = settings_for(tmp_path, db_url)
    files = sorted(src.rglob("*.flac"))

    report = ingest(files, source="cli", client="tester", settings=settings)

    assert report.n_rejected == 0, report.to_dict()["rejected"]
    assert report.n_accepted == len(real_clips) == 8
    for r in report.accepted:
        original = src / r.name
        stored = settings.uploads_dir / r.path
        assert r.path == f"{r.label}/{r.sha256[:16]}.flac"
        assert stored.read_bytes() == original.read_bytes()  # stored byte for byte
        assert r.label == original.parent.name and r.sample_rate == 22_050 and r.channels == 1
        assert 0 < r.duration_s <= 4.0
    assert not list((settings.uploads_dir / ".incoming").iterdir())  # staging cleaned

    [upload] = rows(db_url, db.Upload)
    assert (upload.source, upload.client, upload.n_files, upload.n_accepted,
            upload.n_rejected) == ("cli", "tester", 8, 8, 0)
    clips = rows(db_url, db.UploadedClip)
    assert {c.sha256 for c in clips} == {r.sha256 for r in report.accepted}
    assert {c.id for c in clips} == {r.clip_id for r in report.accepted}
    assert all(c.upload_id == upload.id and c.used_in_job_id is None for c in clips)

    with db.session_scope(db_url) as session:
        waiting = unused_clips(session, lineage=[])  # no model served: all are new
        dataset = clips_as_dataset(waiting, settings.uploads_dir)
    assert len(dataset) == 8
    for clip in dataset:
        assert clip.source == "upload" and clip.path.is_file() and clip.fold is None
    # US8K-named uploads keep their recording id, so splits keep siblings together
    assert {c.group for c in dataset} == {p.stem.split("-")[0] for _, p in real_clips}


def test_unused_and_mark_used(db_url, tmp_path, real_clips):
    """"Learnt" means learnt by the served model or an ancestor: a failed job absorbs
    nothing, a succeeded one absorbs its clips while its version is in the served line, and
    after a rollback past it they wait again (the same rule the retrain plan uses)."""
    settings = settings_for(tmp_path, db_url)
    items = [(f"{label}/{p.name}", p.read_bytes()) for label, p in real_clips[:4]]
    ingest(items, source="api", client="token-a", settings=settings)
    served = ["v-new", "v-base"]
    with db.session_scope(db_url) as session:
        failed, _ = get_or_create_job(session)
        failed.status = "failed"
        failed.result_version = "v-new"
        session.commit()
        ids = [c.id for c in unused_clips(session, served)]
        assert mark_used(session, ids[:2], failed.id) == 2
    with db.session_scope(db_url) as session:
        assert len(unused_clips(session, served)) == 4  # a failed job absorbed nothing
        job, _ = get_or_create_job(session)
        assert mark_used(session, ids[:3], job.id) == 3
        job.status = "succeeded"
        job.result_version = "v-new"
    with db.session_scope(db_url) as session:
        assert [c.id for c in unused_clips(session, served)] == ids[3:]
        assert count_unused(session, served) == 1
        assert upload_stats(session, served)["n_unused"] == 1
        # rolled back to v-base: what only v-new learnt is new again
        assert [c.id for c in unused_clips(session, ["v-base"])] == ids
        assert upload_stats(session, ["v-base"])["n_unused"] == 4


def test_label_override_and_name_only_uploads(db_url, tmp_path, real_clips):
    settings = settings_for(tmp_path, db_url)
    (_, path), (_, other) = real_clips[0], real_clips[2]
    report = ingest([("clip.flac", path.read_bytes()), ("weird/x.flac", other.read_bytes())],
                    label="Gun Shot", source="ui", settings=settings)
    assert [r.label for r in report.results] == ["gun_shot", "gun_shot"]
    with pytest.raises(IngestError, match="Unknown label"):
        ingest([("a.wav", audio_bytes(noise(1)))], label="cats", settings=settings)
    with pytest.raises(IngestError, match="No files"):
        ingest([], settings=settings)


# --------------------------------------------------------------------------- rejections

def test_every_rejection_reason(db_url, tmp_path, real_clips):
    settings = settings_for(tmp_path, db_url, max_clip_mb=1)
    _, real = real_clips[0]
    good = audio_bytes(noise(1.0, seed=1))
    ingest([("siren/first.wav", good)], settings=settings)

    nan = noise(1.0, seed=2)
    nan[100:200] = np.nan
    # 10 min at 8 kHz, FLAC of a steady tone: a few kB
    ten_minutes = audio_bytes(np.full(8_000 * 600, 100, np.int16), 8_000, format="FLAC")
    cases = {
        "dog_bark/corrupt.wav": (os.urandom(4096), "undecodable"),
        "dog_bark/empty.wav": (b"", "empty"),
        "dog_bark/truncated_header.wav": (good[:20], "undecodable"),
        "dog_bark/header_only.wav": (good[:44], "empty"),
        "dog_bark/silent.wav": (audio_bytes(np.zeros(22_050, np.float32)), "silent"),
        "dog_bark/nan.wav": (audio_bytes(nan, subtype="FLOAT"), "non_finite"),
        "dog_bark/ten_ms.wav": (audio_bytes(noise(0.01, seed=3)), "too_short"),
        "dog_bark/ten_minutes.flac": (ten_minutes, "too_long"),
        "dog_bark/low_rate.wav": (audio_bytes(noise(1.0, sr=4_000, seed=4), 4_000), "bad_rate"),
        "dog_bark/huge.wav": (audio_bytes(noise(30.0, seed=5)), "too_large"),  # 1.3 MB > 1 MiB
        "cats/meow.wav": (audio_bytes(noise(1.0, seed=6)), "unknown_label"),
        "no_folder.wav": (audio_bytes(noise(1.0, seed=7)), "unknown_label"),
        "dog_bark/notes.txt": (b"hello", "not_audio"),
        "dog_bark/again.wav": (good, "duplicate"),  # same bytes as the earlier upload
        "dog_bark/batch_a.flac": (real.read_bytes(), ""),
        "dog_bark/batch_b.flac": (real.read_bytes(), "duplicate"),  # within this batch
        "dog_bark/archive.tar.gz": (b"\x1f\x8b" + os.urandom(64), "unsupported_archive"),
    }
    report = ingest([(name, data) for name, (data, _) in cases.items()], source="api",
                    settings=settings)

    got = {r.name: r.code for r in report.results}
    assert got == {name: code for name, (_, code) in cases.items()}
    for r in report.rejected:
        assert r.message and r.clip_id is None and r.path is None
    results = by_name(report)
    assert "Already uploaded" in results["dog_bark/again.wav"].message
    assert "batch_a.flac" in results["dog_bark/batch_b.flac"].message
    assert "cats" in results["cats/meow.wav"].message

    # rejects are recorded too, with their codes; only the two good files are stored
    rejects = [r for r in rows(db_url, db.UploadReject) if r.upload_id == report.upload_id]
    assert sorted(r.reason_code for r in rejects) == sorted(c for _, c in cases.values() if c)
    assert len(stored_files(settings)) == 2
    assert len(rows(db_url, db.UploadedClip)) == 2


def test_all_rejected_batch_stores_nothing(db_url, tmp_path):
    settings = settings_for(tmp_path, db_url)
    report = ingest([("dog_bark/a.wav", b"junk" * 100), ("dog_bark/b.wav", b"")],
                    settings=settings)
    assert report.n_accepted == 0 and report.n_rejected == 2 and report.upload_id is not None
    assert stored_files(settings) == []
    [upload] = rows(db_url, db.Upload)
    assert (upload.n_files, upload.n_accepted, upload.n_rejected) == (2, 0, 2)


def test_concurrent_uploads_of_the_same_file_accept_it_once(db_url, tmp_path, real_clips):
    """Two web replicas receiving the same clip at once: one wins, the other is told why."""
    settings = settings_for(tmp_path, db_url)
    _, path = real_clips[1]
    data = path.read_bytes()
    reports, errors = [], []
    start = threading.Barrier(2)

    def upload(i: int) -> None:
        try:
            start.wait()
            reports.append(ingest([(f"siren/copy{i}.flac", data)], settings=settings))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    codes = sorted(r.results[0].code for r in reports)
    assert codes == ["", "duplicate"]
    assert len(rows(db_url, db.UploadedClip)) == 1
    assert len(stored_files(settings)) == 1


# --------------------------------------------------------------------------- archives

def test_zip_upload_is_expanded(db_url, tmp_path, real_clips):
    settings = settings_for(tmp_path, db_url)
    (_, a), (_, b), (_, c) = real_clips[0], real_clips[2], real_clips[4]
    archive = make_zip({
        "batch/dog_bark/a.flac": a.read_bytes(),
        "batch\\siren\\b.flac": b.read_bytes(),  # a Windows zip: backslashes are separators
        "__MACOSX/batch/dog_bark/._a.flac": b"\x00\x05\x16\x07junk",
        "batch/dog_bark/.DS_Store": b"junk",
        "root.flac": c.read_bytes(),  # no folder: label from the archive's name
    })
    report = ingest([("uploads/drilling.zip", archive)], source="ui", settings=settings)
    labels = {r.name: r.label for r in report.accepted}
    assert labels == {
        "uploads/drilling.zip/batch/dog_bark/a.flac": "dog_bark",
        "uploads/drilling.zip/batch\\siren\\b.flac": "siren",
        "uploads/drilling.zip/root.flac": "drilling",
    }
    assert report.n_rejected == 0 and len(report.skipped) == 2
    assert len(stored_files(settings)) == 3


def test_zip_from_a_path_and_a_file_object(sqlite_migrated, tmp_path, real_clips):
    settings = settings_for(tmp_path, sqlite_migrated)
    (_, a), (_, b) = real_clips[0], real_clips[2]
    path = tmp_path / "car_horn" / "pack.zip"
    path.parent.mkdir()
    path.write_bytes(make_zip({"x.flac": a.read_bytes()}))
    report = ingest([path, ("pack2.zip", io.BytesIO(make_zip({"siren/y.flac": b.read_bytes()})))],
                    settings=settings)
    assert [(r.label, r.code) for r in report.results] == [("car_horn", ""), ("siren", "")]


def test_path_traversal_and_absolute_names_are_refused(sqlite_migrated, tmp_path):
    settings = settings_for(tmp_path, sqlite_migrated)
    good = audio_bytes(noise(1.0, seed=11))
    archive = make_zip({
        "../../evil/dog_bark/a.wav": good,
        "/etc/dog_bark/b.wav": good,
        "C:\\Windows\\dog_bark\\c.wav": good,
        "dog_bark/../../../d.wav": good,
        "..\\..\\dog_bark\\e.wav": good,
    })
    report = ingest([("attack.zip", archive)], settings=settings)
    assert report.n_files == 5
    assert {r.code for r in report.results} == {"unsafe_path"}
    assert stored_files(settings) == []
    assert not any(p.name in {"a.wav", "b.wav", "d.wav", "evil"} for p in tmp_path.rglob("*"))
    # top-level names are held to the same rule
    report = ingest([("../../dog_bark/x.wav", good)], settings=settings)
    assert report.results[0].code == "unsafe_path"


def test_symlink_members_are_refused(sqlite_migrated, tmp_path):
    settings = settings_for(tmp_path, sqlite_migrated)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("dog_bark/link.wav")
        link.create_system = 3
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("dog_bark/real.wav", audio_bytes(noise(1.0, seed=12)))
    report = ingest([("links.zip", buf.getvalue())], settings=settings)
    codes = {r.name.rsplit("/", 1)[-1]: r.code for r in report.results}
    assert codes == {"link.wav": "unsafe_path", "real.wav": ""}


def test_nested_archives_are_refused(sqlite_migrated, tmp_path):
    settings = settings_for(tmp_path, sqlite_migrated)
    inner = make_zip({"dog_bark/a.wav": audio_bytes(noise(1.0, seed=13))})
    archive = make_zip({
        "dog_bark/inner.zip": inner,
        "dog_bark/inner.tar.gz": b"\x1f\x8b\x08\x00" + os.urandom(32),
        "dog_bark/inner.7z": b"7z\xbc\xaf\x27\x1c" + os.urandom(32),
        "dog_bark/disguised": inner,  # no extension: recognised by its magic bytes
    })
    report = ingest([("outer.zip", archive)], settings=settings)
    assert {r.code for r in report.results} == {"nested_archive"} and report.n_files == 4
    assert stored_files(settings) == []


def test_too_many_members(sqlite_migrated, tmp_path):
    settings = settings_for(tmp_path, sqlite_migrated, max_archive_members=3)
    archive = make_zip({f"dog_bark/{i}.wav": audio_bytes(noise(0.5, seed=20 + i))
                        for i in range(4)})
    report = ingest([("many.zip", archive)], settings=settings)
    [result] = report.results
    assert result.code == "too_many_files" and "3 files" in result.message
    assert stored_files(settings) == []


def test_corrupt_zip_is_a_clear_error(sqlite_migrated, tmp_path):
    settings = settings_for(tmp_path, sqlite_migrated)
    valid = make_zip({"dog_bark/a.wav": audio_bytes(noise(1.0, seed=30))})
    report = ingest([("random.zip", os.urandom(2048)), ("cut.zip", valid[: len(valid) // 2]),
                     ("empty.zip", make_zip({}))], settings=settings)
    codes = {r.name: r.code for r in report.results}
    assert codes == {"random.zip": "bad_archive", "cut.zip": "bad_archive", "empty.zip": "empty"}
    assert "zip" in report.results[0].message
    # a member whose compressed bytes are damaged (CRC/deflate error) is refused on its own
    damaged = bytearray(make_zip({"dog_bark/a.wav": audio_bytes(noise(1.0, seed=31)),
                                  "dog_bark/b.wav": audio_bytes(noise(1.0, seed=32))}))
    first_data = 30 + len("dog_bark/a.wav")
    damaged[first_data + 100 : first_data + 200] = bytes(range(100))
    report = ingest([("damaged.zip", bytes(damaged))], settings=settings)
    codes = {r.name.rsplit("/", 1)[-1]: r.code for r in report.results}
    assert codes == {"a.wav": "bad_archive", "b.wav": ""}


def zip_bomb(path: Path, name: str, size: int) -> None:
    """A real deflated zip whose one member inflates to ``size`` zero bytes, written in a
    streaming way: the deflate stream of 1 MiB of zeros after a full flush is the same every
    time, so it is computed once and repeated; nothing near ``size`` is ever in memory."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    assert size % (1 << 20) == 0
    n_blocks = size >> 20
    crc = 0
    zeros = bytes(64 << 20)
    for _ in range(size // len(zeros)):
        crc = zlib.crc32(zeros, crc)
    comp_size = len(block) * n_blocks + len(tail)
    fname = name.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, comp_size, size,
                            len(fname), 0) + fname)
        for _ in range(n_blocks):
            f.write(block)
        f.write(tail)
        cd_offset = f.tell()
        central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc,
                              comp_size, size, len(fname), 0, 0, 0, 0, 0, 0) + fname
        f.write(central)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), cd_offset, 0))


def test_zip_bomb_stops_early(sqlite_migrated, tmp_path):
    settings = settings_for(tmp_path, sqlite_migrated)
    bomb = tmp_path / "bomb.zip"
    zip_bomb(bomb, "dog_bark/bomb.wav", 2 << 30)  # 2 GiB of zeros in ~2 MB
    assert bomb.stat().st_size < 4 << 20
    with zipfile.ZipFile(bomb) as zf:  # an honest archive, not a malformed one
        assert zf.getinfo("dog_bark/bomb.wav").file_size == 2 << 30

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = ingest([bomb], settings=settings)
    elapsed = time.perf_counter() - started
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024

    [result] = report.results
    assert result.code == "too_large"
    assert elapsed < 10, f"took {elapsed:.1f} s: the member was not cut short"
    assert rss_growth_mb < 300
    assert stored_files(settings) == []


def test_archive_decompressed_total_is_capped(sqlite_migrated, tmp_path):
    """Many members each under the per-clip cap still stop at the per-archive cap, and the
    members accepted before the cap was hit are discarded with the archive."""
    settings = settings_for(tmp_path, sqlite_migrated, max_archive_bytes_mb=1)
    members = {f"dog_bark/{i}.wav": audio_bytes(noise(10.0, seed=40 + i))  # 441 kB
               for i in range(3)}
    report = ingest([("big.zip", make_zip(members)),
                     ("siren/ok.wav", audio_bytes(noise(1.0, seed=50)))], settings=settings)
    codes = {r.name: r.code for r in report.results}
    assert codes == {"big.zip": "archive_too_large", "siren/ok.wav": ""}
    assert len(stored_files(settings)) == 1
    assert len(rows(sqlite_migrated, db.UploadedClip)) == 1


# --------------------------------------------------------------------------- failures

def test_failed_commit_leaves_no_orphans_and_keeps_earlier_clips(db_url, tmp_path, real_clips,
                                                                 monkeypatch):
    settings = settings_for(tmp_path, db_url)
    (_, first), (_, second), (_, third) = real_clips[0], real_clips[2], real_clips[4]
    earlier = ingest([(f"dog_bark/{first.name}", first.read_bytes())], settings=settings)
    kept = settings.uploads_dir / earlier.accepted[0].path
    assert kept.is_file()

    def broken_commit(self):
        raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(sa.orm.Session, "commit", broken_commit)
    with pytest.raises(sa.exc.OperationalError):
        ingest([(f"siren/{second.name}", second.read_bytes()),
                (f"drilling/{third.name}", third.read_bytes()),
                ("siren/bad.wav", b"junk")], settings=settings)
    monkeypatch.undo()

    assert stored_files(settings) == [kept]  # the batch's files are gone, the earlier one not
    assert [u.id for u in rows(db_url, db.Upload)] == [earlier.upload_id]
    assert [c.sha256 for c in rows(db_url, db.UploadedClip)] == [earlier.accepted[0].sha256]
    assert rows(db_url, db.UploadReject) == []
    assert not list((settings.uploads_dir / ".incoming").iterdir())

    # and the same files go through once the database works again
    report = ingest([(f"siren/{second.name}", second.read_bytes())], settings=settings)
    assert report.n_accepted == 1 and len(stored_files(settings)) == 2


def test_orphans_left_by_a_crash_are_found_and_adopted(db_url, tmp_path, real_clips):
    """A process killed after moving a file but before committing leaves an unrecorded file:
    ``find_orphans`` lists it, and a re-upload of the same content simply takes it over."""
    settings = settings_for(tmp_path, db_url)
    (_, first), (_, second) = real_clips[0], real_clips[2]
    kept = ingest([(f"dog_bark/{first.name}", first.read_bytes())], settings=settings)
    sha = hashlib.sha256(second.read_bytes()).hexdigest()
    orphan = settings.uploads_dir / "siren" / f"{sha[:16]}.flac"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(second.read_bytes()[:1000])  # even a torn one
    with db.session_scope(db_url) as session:
        assert find_orphans(session, settings) == [orphan]

    report = ingest([(f"siren/{second.name}", second.read_bytes())], settings=settings)
    assert report.accepted[0].path == f"siren/{sha[:16]}.flac"
    assert orphan.read_bytes() == second.read_bytes()  # replaced by the complete file
    with db.session_scope(db_url) as session:
        assert find_orphans(session, settings) == []
        stray = settings.uploads_dir / "dog_bark" / "stray.wav"
        stray.write_bytes(b"x")
        assert find_orphans(session, settings, remove=True) == [stray]
    assert not stray.exists()
    assert (settings.uploads_dir / kept.accepted[0].path).is_file()


def test_commit_refused_by_postgres_itself(pg_clean, tmp_path, real_clips):
    """Not a mock: a deferred constraint trigger makes the real COMMIT fail."""
    settings = settings_for(tmp_path, pg_clean)
    (_, first), (_, second) = real_clips[0], real_clips[2]
    ingest([(f"dog_bark/{first.name}", first.read_bytes())], settings=settings)
    engine = db.get_engine(pg_clean)
    with engine.begin() as conn:
        conn.exec_driver_sql("""
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
            CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON clips
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();
        """)
    try:
        with pytest.raises(sa.exc.SQLAlchemyError, match="refused at commit"):
            ingest([(f"siren/{second.name}", second.read_bytes())], settings=settings)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_at_commit ON clips; DROP FUNCTION refuse();")
    assert len(stored_files(settings)) == 1
    assert len(rows(pg_clean, db.UploadedClip)) == 1 and len(rows(pg_clean, db.Upload)) == 1


def test_postgres_down_is_database_unavailable(closed_port_url, tmp_path, real_clips):
    settings = settings_for(tmp_path, closed_port_url)
    _, path = real_clips[0]
    started = time.perf_counter()
    with pytest.raises(db.DatabaseUnavailable) as info:
        ingest([(f"dog_bark/{path.name}", path.read_bytes())], settings=settings)
    assert time.perf_counter() - started < 15
    assert "Database unavailable" in info.value.message
    assert closed_port_url.rsplit(":", 1)[1].split("/")[0] in info.value.message  # the port
    assert stored_files(settings) == []
    with pytest.raises(db.DatabaseUnavailable):
        db.check_connection(closed_port_url)


# --------------------------------------------------------------------------- command line

def test_cli_upload(sqlite_migrated, tmp_path, real_clips, monkeypatch):
    import json

    import typer
    from typer.testing import CliRunner

    from src.cli.ops import upload
    from src.settings import get_settings

    monkeypatch.setenv("URBANSOUND_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("URBANSOUND_DATABASE_URL", sqlite_migrated)
    get_settings.cache_clear()
    app = typer.Typer()
    app.command()(upload)
    folder = tmp_path / "mine"
    for label, path in real_clips[:3]:
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / label / path.name)
    (folder / "cats").mkdir()
    (folder / "cats" / "meow.wav").write_bytes(audio_bytes(noise(1.0, seed=60)))
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("hidden folders are not walked")
    runner = CliRunner()
    try:
        result = runner.invoke(app, [str(folder), "--json"])
        assert result.exit_code == 2, result.output  # some accepted, some rejected
        report = json.loads(result.stdout)
        assert (report["n_accepted"], report["n_rejected"]) == (3, 1)
        assert report["rejected"][0]["code"] == "unknown_label"

        result = runner.invoke(app, [str(folder / "dog_bark")])
        assert result.exit_code == 1  # everything was a duplicate
        assert "rejected  duplicate" in result.stdout

        result = runner.invoke(app, [str(tmp_path / "nope")])
        assert result.exit_code == 1 and "no such file or folder" in result.output
        assert "Traceback" not in result.output
    finally:
        get_settings.cache_clear()
