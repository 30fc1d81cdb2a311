"""Decoder fuzzing: mutated real WAV and FLAC files through ``load_clip``, ``probe``, ``decode``.

Seeds are real UrbanSound8K clips: the 27 original-bytes WAVs (PCM 16/24-bit, WAVE_FORMAT_
EXTENSIBLE, mono/stereo, 44.1-96 kHz) and FLACs of the shared subset, plus one real clip
re-encoded to the other WAV codecs libsndfile decodes (8-bit, 32-bit int and float, IMA and MS
ADPCM, mu-law, A-law) so every decoder path is reached. Hypothesis mutates them where parsers
break: the RIFF/chunk sizes, format tag, channel count, sample rate, byte rate, block align,
bits per sample and the extensible sub-format; the FLAC STREAMINFO block (block and frame
sizes, rate/channels/bits, total samples) and the first frame header; random bit flips,
truncation, inserted bytes and appended garbage (including a second ``data`` chunk).

What must hold, for every input, given as bytes and as a file:
- the only exception is ``AudioError`` (a ``UserError``: the web app answers it as JSON 4xx);
- no hang: a per-example deadline (hypothesis), and a watchdog thread that kills the process
  if one call outlives ``WATCHDOG_S`` (a decoder stuck in C never returns to Python);
- no unbounded allocation: the loop runs in a child process whose address space is capped at
  what it had after start-up plus ``MEMORY_HEADROOM_MB``: a header claiming gigabytes that the
  decoder believed would fail loudly (MemoryError), not swap the machine;
- a native crash (segfault, abort) fails the test; the input being tried is always on disk.

Deterministic (``derandomize``: the same examples on every run) and bounded: ``FUZZ_EXAMPLES``
examples (``URBANSOUND_FUZZ_EXAMPLES`` overrides), well under a minute on one core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
FUZZ_EXAMPLES = int(os.environ.get("URBANSOUND_FUZZ_EXAMPLES", "1000"))
WATCHDOG_S = 30.0  # one call; the slowest honest call (96 kHz stereo, resampled) takes ~0.1 s
DEADLINE_MS = 5000  # hypothesis' per-example deadline (generous: the machine is shared)
MEMORY_HEADROOM_MB = 768  # the largest legal read: 4 s x 384 kHz x 32 ch x float32 = 197 MB


def test_decoders_survive_mutated_real_files(tmp_path):
    import pytest

    originals = sorted((SHARED / "us8k-originals" / "audio").glob("*/*.wav"))
    flacs = sorted((SHARED / "us8k" / "audio" / "fold1").glob("*.flac"))
    if not originals or not flacs:
        from web_helpers import unavailable

        unavailable(f"real clips not found under {SHARED}")
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(tmp_path), str(FUZZ_EXAMPLES)],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the fuzz child hung; last input: {tmp_path / 'last-input.bin'}\n"
                    f"{(exc.stdout or '')[-3000:]}{(exc.stderr or '')[-3000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"decoder fuzzing failed (rc {proc.returncode}; a negative rc is a native crash). "
        f"The input being tried is {tmp_path / 'last-input.bin'}.\n{output[-8000:]}")
    summary = json.loads(output.split("FUZZ-SUMMARY ")[-1].splitlines()[0])
    assert summary["tried"] >= FUZZ_EXAMPLES  # hypothesis really generated the budget
    assert summary["tried"] == summary["clean"]
    # Both outcomes are exercised: the mutations are not all harmless, nor all fatal.
    assert summary["refused"] > summary["tried"] // 10
    assert summary["decoded"] > summary["tried"] // 20
    assert summary["rss_growth_mb"] < MEMORY_HEADROOM_MB
    print("\nAUDIT " + json.dumps({"kind": "bad_input", "what": "decoder fuzz",
                                   "tried": summary["tried"], "clean": summary["clean"]}))


# --------------------------------------------------------------------------- the child

def seeds() -> list[tuple[str, bytes]]:
    import io

    import soundfile as sf

    found = [(p.name, p.read_bytes())
             for p in sorted((SHARED / "us8k-originals" / "audio").glob("*/*.wav"))]
    found += [(p.name, p.read_bytes())
              for p in sorted((SHARED / "us8k" / "audio" / "fold1").glob("*.flac"))[:8]]
    # One real clip (the first second: mutation costs scale with size) in every other codec.
    y, sr = sf.read(SHARED / "us8k-originals" / "audio" / "fold1" / "101415-3-0-2.wav",
                    frames=48_000, dtype="float32")
    for subtype in ("PCM_U8", "PCM_32", "FLOAT", "DOUBLE", "IMA_ADPCM", "MS_ADPCM", "ULAW",
                    "ALAW"):
        buf = io.BytesIO()
        sf.write(buf, y, sr, format="WAV", subtype=subtype)
        found.append((f"101415-3-0-2.{subtype}.wav", buf.getvalue()))
    buf = io.BytesIO()
    sf.write(buf, y, sr, format="FLAC", subtype="PCM_24")
    found.append(("101415-3-0-2.PCM_24.flac", buf.getvalue()))
    return found


def fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width in bytes, byte order) of every header field worth corrupting."""
    out: list[tuple[int, int, str]] = []
    if data[:4] == b"RIFF":
        out.append((4, 4, "little"))  # RIFF size
        pos = 12
        while pos + 8 <= len(data) and len(out) < 40:
            chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
            out.append((pos + 4, 4, "little"))  # chunk size
            if chunk == b"fmt ":
                # tag, channels, rate, byte rate, block align, bits, cbSize, valid bits,
                # channel mask, sub-format tag (WAVE_FORMAT_EXTENSIBLE), ADPCM block size
                for off, width in ((8, 2), (10, 2), (12, 4), (16, 4), (20, 2), (22, 2),
                                   (24, 2), (26, 2), (28, 4), (32, 2)):
                    if pos + off + width <= len(data):
                        out.append((pos + off, width, "little"))
            pos += 8 + size + (size & 1)
    elif data[:4] == b"fLaC":
        # STREAMINFO: min/max block size, min/max frame size, then rate (20 bits), channels
        # (3), bits (5), total samples (36) packed big-endian, then the MD5.
        out += [(4, 1, "big"), (5, 3, "big"), (8, 2, "big"), (10, 2, "big"), (12, 3, "big"),
                (15, 3, "big"), (18, 3, "big"), (20, 2, "big"), (21, 5, "big"), (26, 4, "big")]
        pos = 4
        while pos + 4 <= len(data):  # the metadata blocks, then the first frame header
            last, size = data[pos] & 0x80, int.from_bytes(data[pos + 1:pos + 4], "big")
            if pos != 4:
                out.append((pos + 1, 3, "big"))
            pos += 4 + size
            if last:
                break
        out += [(pos + i, 1, "big") for i in range(6) if pos + i < len(data)]
    return out


def child(workdir: Path, examples: int) -> None:
    import faulthandler
    import resource

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from src.errors import UserError
    from src.preprocessing import AudioError, AudioInfo, FeatureConfig, decode, load_clip, probe

    pool = seeds()
    config = FeatureConfig()
    last = workdir / "last-input.bin"
    as_file = workdir / "input.wav"
    stats = {"tried": 0, "clean": 0, "refused": 0, "decoded": 0}
    codes: dict[str, int] = {}

    interesting = [0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0xFFFFFF,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 44_100, 384_001, 2**24, 2**40]

    # The strategy draws a recipe (which seed, which edits), not the bytes: hypothesis keeps
    # what it generated, and a thousand multi-megabyte examples would exhaust the memory cap.
    @st.composite
    def recipes(draw) -> tuple[int, list[tuple]]:
        index = draw(st.integers(0, len(pool) - 1))
        data = pool[index][1]
        spots, size = fields(data), len(data)
        edits: list[tuple] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["field", "field", "field", "flip", "flip_head",
                                         "truncate", "append", "insert"]))
            if kind == "field" and spots:
                off, width, order = draw(st.sampled_from(spots))
                value = draw(st.one_of(st.sampled_from(interesting),
                                       st.integers(0, 2 ** (8 * width) - 1)))
                edits.append(("field", off, width, order, value))
            elif kind in ("flip", "flip_head") and size:
                end = min(size, 128) if kind == "flip_head" else size
                edits.append(("flip", draw(st.integers(0, end - 1)), draw(st.integers(1, 255))))
            elif kind == "truncate":
                size = draw(st.integers(0, size))
                edits.append(("truncate", size))
            elif kind == "append":
                tail = draw(st.one_of(st.binary(max_size=512),
                                      st.just(b"data\xff\xff\xff\xff" + bytes(64)),
                                      st.just(b"LIST\xff\xff\xff\x7f")))
                size += len(tail)
                edits.append(("append", tail))
            elif kind == "insert":
                chunk = draw(st.binary(min_size=1, max_size=16))
                edits.append(("insert", draw(st.integers(0, min(size, 256))), chunk))
                size += len(chunk)
        return index, edits

    def apply(index: int, edits: list[tuple]) -> bytes:
        buf = bytearray(pool[index][1])
        for edit in edits:
            if edit[0] == "field":
                _, off, width, order, value = edit
                if off + width <= len(buf):
                    buf[off:off + width] = (value & (2 ** (8 * width) - 1)).to_bytes(width, order)
            elif edit[0] == "flip" and edit[1] < len(buf):
                buf[edit[1]] ^= edit[2]
            elif edit[0] == "truncate":
                del buf[edit[1]:]
            elif edit[0] == "append":
                buf += edit[1]
            elif edit[0] == "insert":
                buf[edit[1]:edit[1]] = edit[2]
        return bytes(buf)

    def call(fn: str, data: bytes, via_file: bool):
        source: bytes | Path = data
        if via_file:
            as_file.write_bytes(data)
            source = as_file
        if fn == "probe":
            return probe(source)
        if fn == "decode":
            return decode(source, max_seconds=config.clip_seconds)
        return load_clip(source, config)

    @given(recipe=recipes(), fn=st.sampled_from(["load_clip", "load_clip", "probe", "decode"]),
           via_file=st.booleans())
    @settings(max_examples=examples, derandomize=True, database=None, deadline=DEADLINE_MS,
              print_blob=False, suppress_health_check=list(HealthCheck))
    def fuzz(recipe: tuple[int, list[tuple]], fn: str, via_file: bool) -> None:
        data = apply(*recipe)
        last.write_bytes(data)
        stats["tried"] += 1
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hang kills the process
        try:
            result = call(fn, data, via_file)
        except AudioError as exc:
            assert isinstance(exc, UserError) and exc.message and 400 <= exc.status < 500
            codes[exc.code] = codes.get(exc.code, 0) + 1
            stats["refused"] += 1
        else:
            if fn == "load_clip":
                assert result.shape == (config.n_samples,) and str(result.dtype) == "float32"
                assert bool(__import__("numpy").isfinite(result).all())
            elif fn == "probe":
                assert isinstance(result, AudioInfo)
            else:
                samples, sr = result
                assert samples.ndim == 2 and 1000 <= sr <= 384_000
                assert samples.shape[0] <= config.clip_seconds * sr + 1
            stats["decoded"] += 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        stats["clean"] += 1

    # Cap the address space at start-up's plus the headroom: a huge allocation fails loudly.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    cap = vm + MEMORY_HEADROOM_MB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fuzz()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print("FUZZ-SUMMARY " + json.dumps({**stats, "rss_growth_mb": round(rss_growth, 1),
                                        "seeds": len(pool), "codes": codes}))


if __name__ == "__main__":
    child(Path(sys.argv[1]), int(sys.argv[2]))
