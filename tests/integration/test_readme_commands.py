"""Every shell command the README shows is run, as a newcomer would paste it.

The fenced ``bash``/``sh``/``console`` blocks of README.md are extracted; each one either runs
here (against a real gunicorn server on a free port, with a fresh state folder, a copy of the
committed models and an empty data folder: the README's defaults) or carries a marker on the
line before its fence saying why it cannot::

    <!-- readme-test: skip (needs Docker) -->

A block that is neither run nor marked fails the run, and every skipped block is reported with
its reason. A block fails on a non-zero exit (pipelines are judged by their last command, as
in a shell: ``| head -3`` is fine), on "error"/"Traceback" in stderr, or on an API error body
(``{"error": {...}}``) in stdout.

What is substituted before running: the server's address for ``127.0.0.1:8000``, the test
token for ``change-me``, absolute paths for ``../shared/`` and ``.venv/bin/``, a temporary
folder for ``/tmp/...`` and for the working directory (files a block creates, such as
``clips.zip``, land there), and placeholders (``<job-id>``, ``<version>``,
``<prediction-id>``) by values the server gives at that point of the block.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from web_helpers import ROOT, TOKEN, US8K, Gunicorn, unavailable

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
SHELLS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*\n(?P<body>.*?)^[ \t]*```[ \t]*$",
                   re.M | re.S)
SKIP = re.compile(r"^\s*<!--\s*readme-test:\s*skip\s*\((?P<reason>.*)\)\s*-->\s*$")
MARKER = re.compile(r"<!--\s*readme-test")
API_ERROR = re.compile(r'"error"\s*:\s*\{')
STDERR_ERROR = re.compile(r"\berror\b|Traceback", re.I)
PLACEHOLDER = re.compile(r"<[a-z][a-z-]*>")

# Values a placeholder stands for, computed by the shell at that point of the block (the job
# the block's POST /retrain created, a prediction kept a moment before).
JSON_FIELD = "python3 -c 'import json,sys; print(json.load(sys.stdin){})'"
PLACEHOLDERS = {
    "<job-id>": "$(curl -s $API/jobs | " + JSON_FIELD.format('["items"][0]["id"]') + ")",
    "<prediction-id>": ('$(curl -s -F file=@{other} "$API/predict?keep=true" | '
                        + JSON_FIELD.format('["prediction_id"]') + ")"),
    "<version>": "{version}",
}
# A fold-2 clip of the same recording as the README's examples: not the gate's test set.
OTHER_CLIP = US8K / "audio" / "fold2" / "104817-4-0-2.flac"


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the marker's reason, None when unmarked

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def shell_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    lines = text.splitlines()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in SHELLS:
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = next((lines[i] for i in range(line - 2, -1, -1) if lines[i].strip()), "")
        skip = SKIP.match(before)
        indent = len(m.group("indent"))
        code = "\n".join(row[indent:] if row[:indent].isspace() else row
                         for row in m.group("body").splitlines())
        if m.group("lang") == "console":  # "$ command" lines; the rest is shown output
            code = "\n".join(row[2:] for row in code.splitlines() if row.startswith("$ "))
        blocks.append(Block(line, m.group("lang"), code, skip.group("reason").strip()
                            if skip else None))
    return blocks


BLOCKS = shell_blocks()
RAN: set[str] = set()


# --------------------------------------------------------------------------- no server needed

def test_the_readme_has_shell_blocks_and_the_markers_are_well_formed():
    assert len(BLOCKS) >= 8, "the README's shell blocks were not found"
    text = README.read_text()
    lines = text.splitlines()
    fences = {b.line for b in BLOCKS}
    for i, row in enumerate(lines, 1):
        if MARKER.search(row):
            m = SKIP.match(row)
            assert m and m.group("reason").strip(), f"README.md:{i}: a marker needs a reason: {row}"
            nxt = next(j for j in range(i + 1, len(lines) + 1) if lines[j - 1].strip())
            assert nxt in fences, f"README.md:{i}: the marker is not right before a shell block"


def test_the_first_run_commands_are_not_skipped_wholesale():
    """The README's promise is that its commands work: most blocks must really run here."""
    ran = [b for b in BLOCKS if b.skip is None]
    assert len(ran) >= 3, [b.id for b in ran]
    assert any("/predict" in b.code and "/uploads" in b.code for b in ran), "the API examples"
    assert any("urbansound predict" in b.code for b in ran)


# --------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app as `urbansound up` serves it by default (SQLite, the embedded broker, no data
    set), under gunicorn on a free port, with a copy of the committed models (activating a
    version must not touch the repository's models/)."""
    if not (US8K / "audio").is_dir():
        unavailable(f"the UrbanSound8K subset is not at {US8K}")
    root = tmp_path_factory.mktemp("readme")
    models = root / "models"
    shutil.copytree(ROOT / "models", models)
    (root / "data").mkdir()
    env = {
        "URBANSOUND_STATE_DIR": str(root / "var"), "URBANSOUND_DATA_DIR": str(root / "data"),
        "URBANSOUND_MODELS_DIR": str(models), "URBANSOUND_DATABASE_URL": "",
        "URBANSOUND_BROKER_URL": "", "URBANSOUND_RESULT_BACKEND": "",
        "URBANSOUND_API_TOKEN": TOKEN, "URBANSOUND_TORCH_THREADS": "1",
        "URBANSOUND_ACCESS_LOG": "",
    }
    subprocess.run([sys.executable, "-m", "src.cli", "db", "upgrade"], cwd=ROOT, check=True,
                   env={**os.environ, **env}, capture_output=True, timeout=300)
    web = Gunicorn(env, root / "gunicorn.log", workers=1)
    web.start(timeout=300)
    try:
        yield web, env, root
    finally:
        web.stop()


def substitute(code: str, url: str, work: Path, version: str) -> str:
    venv_bin = Path(sys.executable).parent
    code = (code.replace("http://127.0.0.1:8000", url).replace("127.0.0.1:8000", url[7:])
            .replace("change-me", TOKEN).replace("../shared/", f"{US8K.parent}/")
            .replace(".venv/bin/", f"{venv_bin}/"))
    code = re.sub(r"(?<![\w./])/tmp/", f"{work}/tmp/", code)
    for name, value in PLACEHOLDERS.items():
        code = code.replace(name, value.format(other=OTHER_CLIP, version=version))
    bare = re.sub(r"(^|\s)#.*$", "", code, flags=re.M)  # comments may say <class>
    left = PLACEHOLDER.findall(re.sub(r"@[^\s]+|'[^']*'|\"[^\"]*\"", "", bare))
    assert not left, f"no value known for placeholder(s) {left}: add them to PLACEHOLDERS"
    return code


def previous_version(models: Path) -> str:
    import json

    return json.loads((models / "CURRENT").read_text()).get("previous") or \
        json.loads((models / "CURRENT").read_text())["version"]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, request):
    if block.skip is not None:
        pytest.skip(f"{block.id} ({block.lang}) marked skip: {block.skip}")
    web, env, root = request.getfixturevalue("server")
    work = root / "work" / str(block.line)
    (work / "tmp").mkdir(parents=True)
    version = previous_version(Path(env["URBANSOUND_MODELS_DIR"]))
    code = substitute(block.code, web.url, work, version)
    commands = logical_commands(code)
    script = work / "block.sh"
    script.write_text("set -e\n" + "".join(
        f"printf '\\n{SECTION}%s\\n' {shlex.quote(str(i))} | tee /dev/stderr\n{cmd}\n"
        for i, cmd in enumerate(commands)))
    proc = subprocess.run(["bash", str(script)], cwd=work, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    RAN.add(block.id)
    out, err = sections(proc.stdout), sections(proc.stderr)
    problems = []
    for i, cmd in enumerate(commands):
        if STDERR_ERROR.search(err.get(i, "")):
            problems.append(f"$ {cmd}\n  stderr: {err[i].strip()[:1500]}")
        elif API_ERROR.search(out.get(i, "")):
            problems.append(f"$ {cmd}\n  API error: {out[i].strip()[:1500]}")
    if proc.returncode != 0:
        last = max(out, default=0)
        problems.append(f"$ {commands[last]}\n  exit {proc.returncode}; stderr: "
                        f"{err.get(last, '').strip()[:1500]}")
    for i, cmd in enumerate(commands):  # shown with -s, or on failure
        print(f"$ {cmd}\n{' '.join(out.get(i, '').split())[:400]}")
    assert not problems, f"{block.id}: " + "\n".join(problems)


SECTION = ">>>readme-command "


def logical_commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only and blank lines dropped."""
    commands, current = [], ""
    for row in code.splitlines():
        current += row
        if row.rstrip().endswith("\\"):
            current = current.rstrip()[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def sections(text: str) -> dict[int, str]:
    """Output split by the markers the script prints before each command."""
    parts: dict[int, str] = {}
    key = -1
    for row in text.splitlines(keepends=True):
        if row.startswith(SECTION):
            key = int(row[len(SECTION):])
            parts[key] = ""
        else:
            parts[key] = parts.get(key, "") + row
    return parts


def test_every_block_was_run_or_marked_skip():
    """Runs last (pytest keeps definition order): lists what was skipped and why, and fails on
    any block that was neither run nor marked."""
    skipped = [f"{b.id}: {b.skip}" for b in BLOCKS if b.skip is not None]
    print("README blocks skipped, with their reasons:\n  " + "\n  ".join(skipped))
    not_run = [b.id for b in BLOCKS if b.skip is None and b.id not in RAN]
    assert not not_run, (f"README blocks neither run nor marked skip: {not_run} (run this "
                         "whole file, or mark them with <!-- readme-test: skip (reason) -->)")
