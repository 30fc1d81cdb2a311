"""Static checks of the deployment files; nothing here builds an image or starts a container
(``scripts/docker_e2e.sh`` does that, with a real engine):

* ``docker-compose.yml``, interpolated with ``.env.example`` as Compose would, validates
  against the Compose Specification JSON schema (the copy vendored by the ``check-jsonschema``
  package), and has the topology the project promises;
* every path a Dockerfile COPYs exists and is not excluded by ``.dockerignore``; every command
  the images and the compose file run exists (CLI subcommands, Celery app module); the images
  are multi-stage, slim, CPU torch, non-root, with a HEALTHCHECK and no compilers;
* the nginx template renders (both ways: ``urbansound stack`` and the nginx image's envsubst)
  and ``nginx -t`` accepts it under a temporary prefix; its body limit is the app's;
* gunicorn accepts ``deploy/gunicorn.conf.py`` (``--check-config``) and sizes torch threads
  so that workers x threads = cores;
* ``locustfile.py`` loads in Locust; ``urbansound stack`` gives one-line errors for a
  missing nginx and a busy port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from web_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "Dockerfile.web", ROOT / "Dockerfile.worker"]
TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
EXPECTED_SERVICES = {"postgres", "redis", "migrate", "web", "nginx", "worker", "flower"}
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cmake", "python3-dev")


def need(condition: bool, reason: str) -> None:
    """A missing tool fails in CI (it must be installed there) and skips elsewhere."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must provide it)", pytrace=False)
        pytest.skip(reason)


# --------------------------------------------------------------------------- compose

def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}"
                  r"|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR``
    and ``$$`` in every string of the parsed file (names without a value or default are
    collected in ``missing``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if name in env and (env[name] != "" or op != ":-"):
            return env[name]
        if op in (":-", "-"):
            return default or ""
        missing.add(name)
        return ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the << merge keys


@pytest.fixture(scope="module")
def compose(compose_raw) -> dict[str, Any]:
    missing: set[str] = set()
    out = interpolate(compose_raw, read_env_file(ROOT / ".env.example"), missing)
    assert not missing, f"variables with neither a value in .env.example nor a default: {missing}"
    return out


def compose_schema() -> dict[str, Any]:
    try:
        from importlib.resources import files

        vendor = files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        need(False, "check-jsonschema (it ships the Compose spec schema) is not installed")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_compose_matches_the_compose_spec_schema(compose) -> None:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                                 for e in errors[:10])


def test_the_schema_check_catches_mistakes(compose) -> None:
    """The validation above is not vacuous: typical mistakes are rejected."""
    import copy

    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    for path, bad in ((("services", "web", "deploy", "replicas"), [2]),
                      (("services", "nginx", "ports"), "8080:80"),
                      (("services", "web", "depends_on", "migrate", "condition"), "done"),
                      (("services", "web", "restart_policy"), "always")):
        broken = copy.deepcopy(compose)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        assert list(validator.iter_errors(broken)), f"{path} = {bad!r} was accepted"


def test_compose_topology(compose) -> None:
    services = compose["services"]
    assert set(services) == EXPECTED_SERVICES
    pg = services["postgres"]
    assert "healthcheck" in pg and any(v.endswith(":/var/lib/postgresql/data")
                                       for v in pg["volumes"])
    assert services["redis"].get("healthcheck")
    migrate = services["migrate"]
    assert migrate["command"][-2:] == ["db", "upgrade"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    web = services["web"]
    assert int(web["deploy"]["replicas"]) >= 2
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "ports" not in web, "replicas are reached through nginx only"
    shared = {v.split(":")[0] for v in web["volumes"]} & {v.split(":")[0] for v in
                                                           services["worker"]["volumes"]}
    assert shared & set(compose["volumes"]), "web and worker must share the models volume"
    for name in ("migrate", "web", "worker", "flower"):
        svc = services[name]
        # a plain path: Compose 1.29 (Debian's) rejects the `path:`/`required:` form
        assert svc["env_file"] == [".env"]
        env = svc["environment"]
        assert env["URBANSOUND_DATABASE_URL"].startswith("postgresql+psycopg2://")
        assert env["URBANSOUND_BROKER_URL"].startswith("redis://redis:6379/")
    for name, svc in services.items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
    assert services["flower"]["command"][:4] == ["celery", "-A", "worker.make_celery", "flower"]


def test_compose_runs_on_compose_1_29_and_publishes_on_loopback_only(compose_raw,
                                                                     compose) -> None:
    """What the first real run (Debian's Compose 1.29, no registry) needed: no top-level
    `name:` (1.29 rejects it), images of postgres/redis/nginx chosen by variables (the e2e
    script substitutes local stand-ins), and every published port bound to 127.0.0.1 unless
    the operator says otherwise."""
    assert "name" not in compose_raw
    for name, var in (("postgres", "POSTGRES_IMAGE"), ("redis", "REDIS_IMAGE"),
                      ("nginx", "NGINX_IMAGE")):
        assert compose_raw["services"][name]["image"].startswith(f"${{{var}:-"), name
    published = [(name, p) for name, svc in compose["services"].items()
                 for p in svc.get("ports", [])]
    assert {n for n, _ in published} == {"nginx", "flower"}
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_dockerfiles_build_without_a_registry_or_network() -> None:
    """No `# syntax=` line (it makes BuildKit pull a frontend image from a registry); the
    offline path installs from deploy/wheelhouse with --no-index, the online one from the
    PyTorch CPU index; the wheelhouse's contents stay out of git."""
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), dockerfile.name
        build = stages(dockerfile)[0]
        copies = [a for i, a in build if i == "COPY"]
        assert "deploy/wheelhouse/ /tmp/wheelhouse/" in copies
        runs = " ".join(a for i, a in build if i == "RUN")
        assert "--no-index --find-links /tmp/wheelhouse" in runs
        assert "download.pytorch.org/whl/cpu" in runs
    assert (ROOT / "deploy" / "wheelhouse" / "README.md").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/wheelhouse/torch.whl"],
                             cwd=ROOT).returncode
    kept = subprocess.run(["git", "check-ignore", "-q", "deploy/wheelhouse/README.md"],
                          cwd=ROOT).returncode
    assert (ignored, kept) == (0, 1), "wheels git-ignored, the README tracked"


def test_web_and_worker_images_share_their_layers() -> None:
    """Both runtime stages are identical down to USER, so the ~1.4 GB virtualenv layer is
    built and stored once (only labels, health check and command differ)."""
    def prefix(dockerfile: Path) -> list[tuple[str, str]]:
        out = []
        for stage in stages(dockerfile):
            for ins, args in stage:
                out.append((ins, args))
                if ins == "USER":
                    break
        return out

    web, worker = (prefix(d) for d in DOCKERFILES)
    assert web == worker
    assert any(i == "USER" and a == "urbansound" for i, a in web)


def test_e2e_scripts_parse() -> None:
    for script in ("scripts/docker_e2e.sh", "scripts/docker/base_image.sh",
                   "scripts/docker/wheelhouse.sh", "scripts/docker/service_images.sh",
                   "scripts/docker/swarm_e2e.sh", "scripts/docker/services/entrypoint.sh"):
        out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "docker" / "e2e_checks.py")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "usage" in out.stderr


def test_compose_nginx_renders_the_template(compose) -> None:
    """Every placeholder of the template has a value in the nginx service, and what the
    image's envsubst would produce has none left."""
    from src.settings import Settings
    from src.stack import PLACEHOLDER, render_template

    nginx = compose["services"]["nginx"]
    env = {k: str(v) for k, v in nginx["environment"].items()}
    needed = set(PLACEHOLDER.findall(TEMPLATE.read_text()))
    assert needed <= set(env), f"nginx service lacks {needed - set(env)}"
    rendered = render_template(TEMPLATE.read_text(), env)
    assert "${NGINX" not in rendered and "server web:8000 resolve" in rendered
    assert int(env["NGINX_MAX_BODY_MB"]) == Settings().max_body_mb
    assert int(env["NGINX_MAX_UPLOAD_MB"]) == Settings().max_upload_mb
    mounts = {v.split(":")[1] for v in nginx["volumes"]}
    assert "/etc/nginx/templates/default.conf.template" in mounts
    assert env["NGINX_STATIC_ROOT"] in mounts


# --------------------------------------------------------------------------- Dockerfiles

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


class DockerIgnore:
    """``.dockerignore`` semantics: Go filepath.Match patterns plus ``**``, relative to the
    context; the last matching pattern wins (``!`` re-includes); a match on a folder covers
    everything in it."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:].strip() if negate else line
            self.rules.append((negate, re.compile(self._regex(pattern.strip("/")))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return f"^{out}$"

    def excluded(self, rel: str) -> bool:
        parts = rel.strip("/").split("/")
        state = False
        for negate, rx in self.rules:
            if any(rx.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
                state = not negate
        return state


@pytest.fixture(scope="module")
def dockerignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


def copy_sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    if words and words[0].startswith("["):  # JSON form
        words = json.loads(args[args.index("["):])
    return words[:-1]


def tracked_files(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if ln]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_reaches_the_build(dockerfile, dockerignore) -> None:
    copies = [(ins, args) for ins, args in instructions(dockerfile) if ins in ("COPY", "ADD")]
    assert copies
    for ins, args in copies:
        if "--from=" in args:
            continue
        assert ins == "COPY", f"ADD fetches and unpacks implicitly; use COPY: {args}"
        for src in copy_sources(args):
            path = ROOT / src
            assert path.exists(), f"{dockerfile.name}: COPY {src}: not in the repository"
            assert not dockerignore.excluded(src), f"{dockerfile.name}: {src} is .dockerignored"
            if path.is_dir():
                files = [f for f in tracked_files(src) if not dockerignore.excluded(f)]
                on_disk = [p for p in path.rglob("*") if p.is_file()
                           and not dockerignore.excluded(str(p.relative_to(ROOT)))]
                assert files or on_disk, f"{dockerfile.name}: COPY {src}: nothing to copy"
    copied = {s.rstrip("/") for _, a in copies if "--from=" not in a for s in copy_sources(a)}
    assert {"src", "web", "worker", "migrations", "alembic.ini"} <= copied


def test_dockerignore_keeps_code_and_drops_state(dockerignore) -> None:
    for kept in ("src/cli/__init__.py", "web/templates/base.html", "web/static/style.css",
                 "migrations/env.py", "alembic.ini", "models/CURRENT", ".env.example"):
        assert not dockerignore.excluded(kept), kept
    for dropped in (".env", ".venv/bin/python", "var/urbansound.db", "data/train/x.wav",
                    "src/__pycache__/cli.cpython-311.pyc", ".git/HEAD", "tests/conftest.py"):
        assert dockerignore.excluded(dropped), dropped


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multistage_slim_cpu_nonroot_healthchecked(dockerfile) -> None:
    text = dockerfile.read_text()
    parts = stages(dockerfile)
    assert len(parts) >= 2, "multi-stage build"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    bases = [args.get(m.group(1), m.group(0)) for m in
             (re.match(r"\$\{(\w+)\}", stage[0][1].split()[0]) or re.match(r"(.*)", stage[0][1])
              for stage in parts)]
    assert all(b.startswith("python:3.11-slim") for b in bases), bases
    build, final = parts[0], parts[-1]
    pip_torch = [a for i, a in build if i == "RUN" and "torch==" in a]
    assert pip_torch and "download.pytorch.org/whl/cpu" in pip_torch[0]
    pin = re.search(r"torch==([\w.]+)", pip_torch[0]).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={pin}"' in pyproject, "the image's torch pin must match pyproject.toml"
    final_ins = [i for i, _ in final]
    assert "HEALTHCHECK" in final_ins and "CMD" in final_ins
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must run as a non-root user"
    assert any(i == "COPY" and "--from=build" in a for i, a in final)
    for i, a in final:
        if i == "RUN":
            assert not any(re.search(rf"(^|\s){re.escape(t)}(\s|$)", a) for t in BUILD_TOOLS), \
                f"build tools in the final image: {a}"
            assert "pip install" not in a, "dependencies belong to the build stage"


def cli_exists(words: list[str]) -> None:
    """``urbansound <words...>`` names real (sub)commands: ``--help`` on them exits 0."""
    from typer.testing import CliRunner

    from src.cli import app

    path = []
    for w in words:
        if w.startswith("-"):
            break
        path.append(w)
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"urbansound {' '.join(path)}: {result.output[-300:]}"


def commands_in(text: str) -> list[list[str]]:
    """Argument lists after each ``urbansound`` in a command string."""
    out = []
    for m in re.finditer(r"(?:^|[\s\"'\[])urbansound\s+([^\"'\]|;&]+)", text):
        out.append(shlex.split(m.group(1).replace("\\", " ")))
    return out


def test_commands_named_by_the_images_and_compose_exist(compose) -> None:
    found = []
    for dockerfile in DOCKERFILES:
        for ins, args in instructions(dockerfile):
            if ins in ("CMD", "HEALTHCHECK", "ENTRYPOINT"):
                found += commands_in(args)
    for svc in compose["services"].values():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "urbansound":
            found.append(cmd[1:])
    assert {c[0] for c in found} >= {"serve", "worker", "db"}
    for words in found:
        cli_exists(words)
    assert (ROOT / "worker" / "make_celery.py").is_file()  # celery -A worker.make_celery
    assert (ROOT / "web" / "__init__.py").read_text().count("def create_app") == 1


# --------------------------------------------------------------------------- nginx

def test_nginx_accepts_the_rendered_template(tmp_path, isolated_settings) -> None:
    from src import stack

    try:
        nginx = stack.find_nginx()
    except stack.StackError as exc:
        need(False, exc.message)
    ports = [free_port(), free_port()]
    conf = stack.write_nginx_config(tmp_path / "nginx", f"127.0.0.1:{free_port()}", ports)
    stack.nginx_test(nginx, tmp_path / "nginx", conf)  # raises with nginx's complaint
    site = (tmp_path / "nginx" / "urbansound.conf").read_text()
    # the app's limits: uploads everywhere, the larger recording limit where one is analysed
    assert f"client_max_body_size {isolated_settings.max_upload_mb}m;" in site
    for path in ("/api/v1/analyze", "/analyse"):
        block = site.split(f"location = {path} {{", 1)[1].split("}", 1)[0]
        assert f"client_max_body_size {isolated_settings.max_body_mb}m;" in block
    for p in ports:
        assert f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" in site
    assert f"alias {ROOT / 'web' / 'static'}/;" in site
    assert "add_header X-Upstream $upstream_addr always;" in site
    assert "${" not in site


def test_nginx_test_reports_a_broken_config(tmp_path, isolated_settings) -> None:
    from src import stack

    try:
        nginx = stack.find_nginx()
    except stack.StackError as exc:
        need(False, exc.message)
    bad = tmp_path / "bad.template"
    bad.write_text(TEMPLATE.read_text().replace("least_conn;", "least_conn bogus;"))
    conf = stack.write_nginx_config(tmp_path / "nginx", "127.0.0.1:1", [2], template=bad)
    with pytest.raises(stack.StackError, match="nginx rejects"):
        stack.nginx_test(nginx, tmp_path / "nginx", conf)


def test_template_placeholders_must_all_be_given() -> None:
    from src.stack import StackError, render_template

    with pytest.raises(StackError, match="NGINX_LISTEN"):
        render_template("listen ${NGINX_LISTEN}; set $x $host;", {})
    assert render_template("listen ${NGINX_LISTEN}; $host", {"NGINX_LISTEN": "80"}) == \
        "listen 80; $host"


# --------------------------------------------------------------------------- gunicorn

def test_gunicorn_accepts_the_config(tmp_path) -> None:
    env = {**os.environ, "URBANSOUND_STATE_DIR": str(tmp_path / "var"),
           "URBANSOUND_MODELS_DIR": str(tmp_path / "models"),
           "URBANSOUND_DATA_DIR": str(tmp_path / "data"),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--check-config", "--config",
                          str(GUNICORN_CONF), "web:create_app()"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def load_conf(monkeypatch, **env: str) -> dict[str, Any]:
    import runpy

    for k in ("URBANSOUND_CPU_CORES", "URBANSOUND_WEB_WORKERS", "URBANSOUND_TORCH_THREADS",
              "URBANSOUND_WEB_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runpy.run_path(str(GUNICORN_CONF))


def test_gunicorn_config_sizes_torch_threads_to_the_cores(monkeypatch) -> None:
    from types import SimpleNamespace

    conf = load_conf(monkeypatch, URBANSOUND_CPU_CORES="8", URBANSOUND_WEB_WORKERS="2")
    assert conf["workers"] == 2
    # gthread, as the subclass whose own errors (414, 431, 400) are the API's JSON envelope
    assert conf["worker_class"] == "web.gunicorn_worker.ThreadWorker"
    assert conf["preload_app"] is False
    assert conf["keepalive"] > 60, "gunicorn must outlast nginx's upstream keepalive (60 s)"
    assert conf["max_requests"] > 0 and 0 < conf["max_requests_jitter"] < conf["max_requests"]
    assert conf["graceful_timeout"] > 0 and conf["timeout"] >= 60
    assert "%(M)s" in conf["access_log_format"]
    assert {conf["torch_threads_for"](w, 8) for w in (1, 2, 4, 8, 16)} == {8, 4, 2, 1}
    server = SimpleNamespace(cfg=SimpleNamespace(workers=2))
    conf["post_fork"](server, None)
    assert os.environ["URBANSOUND_TORCH_THREADS"] == "4"
    assert os.environ["OMP_NUM_THREADS"] == "4"
    # an operator's explicit choice wins
    conf = load_conf(monkeypatch, URBANSOUND_CPU_CORES="8", URBANSOUND_TORCH_THREADS="3")
    conf["post_fork"](server, None)
    assert os.environ["URBANSOUND_TORCH_THREADS"] == "3"


def test_gunicorn_child_exit_marks_the_worker_dead(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    conf = load_conf(monkeypatch, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"")
    conf["child_exit"](None, SimpleNamespace(pid=4242))
    assert not (tmp_path / "gauge_livesum_4242.db").exists()


# --------------------------------------------------------------------------- locust, stack CLI

def test_locustfile_loads(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"),
                          "--list"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "ApiClient" in out.stdout


def test_stack_up_without_nginx_is_one_line(isolated_settings, monkeypatch) -> None:
    from typer.testing import CliRunner

    from src.cli import app

    monkeypatch.setenv("URBANSOUND_NGINX", str(isolated_settings.state_dir / "no-nginx"))
    result = CliRunner().invoke(app, ["stack", "up", "--port", str(free_port())])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: nginx not found"), result.output


def test_stack_up_on_a_busy_port_is_one_line(isolated_settings, monkeypatch) -> None:
    from typer.testing import CliRunner

    from src import stack
    from src.cli import app

    try:
        stack.find_nginx()
    except stack.StackError as exc:
        need(False, exc.message)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["stack", "up", "--port", str(port),
                                          "--base-port", str(free_port())])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"port {port} (nginx) is already in use" in lines[0], \
        result.output
    assert not (isolated_settings.state_dir / "stack" / "stack.json").exists()


def test_stack_down_and_status_when_nothing_runs(isolated_settings) -> None:
    from typer.testing import CliRunner

    from src.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["stack", "down"]).exit_code == 0
    result = runner.invoke(app, ["stack", "status"])
    assert result.exit_code == 3 and "not running" in result.output


def test_cpu_budget_per_replica() -> None:
    from src.cpu import torch_threads, workers_per_replica

    assert [workers_per_replica(n, 2) for n in (1, 2, 4)] == [2, 1, 1]
    assert [torch_threads(n, workers_per_replica(n, 2), 2) for n in (1, 2, 4)] == [1, 1, 1]
    assert workers_per_replica(2, 16) == 8 and torch_threads(2, 2, 16) == 4


def test_gunicorn_error_pages_become_the_json_envelope() -> None:
    """The worker's socket wrapper turns gunicorn's own HTML error page (``write_error``,
    byte for byte as gunicorn writes it) into the API's envelope; other bytes pass through.
    (tests/integration/test_edge_errors.py shows it on a real gunicorn and nginx.)"""
    from gunicorn import util

    from web.gunicorn_worker import _JsonErrorSocket

    class Sink:
        data = b""

        def sendall(self, data: bytes) -> None:
            self.data += data

        def gettimeout(self) -> float:
            return 0.0

    for status, reason, mesg, code in (
            (414, "URI Too Long", "Request Line is too large (100017 > 8190)", "uri_too_long"),
            (431, "Request Header Fields Too Large", "Error parsing headers: 'x'",
             "headers_too_large"),
            (400, "Bad Request", "Invalid Request Line 'a <b>'", "bad_request"),
            (500, "Internal Server Error", "", "internal_error")):
        sink = Sink()
        util.write_error(_JsonErrorSocket(sink), status, reason, mesg)
        head, _, body = sink.data.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} {reason}\r\n".encode())
        assert b"Content-Type: application/json" in head
        assert f"Content-Length: {len(body)}".encode() in head
        error = json.loads(body)["error"]
        assert error["code"] == code
        assert (mesg in error["message"]) if status != 500 else "our side" in error["message"]
    sink = Sink()
    _JsonErrorSocket(sink).sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>")
    assert sink.data.endswith(b"<p>")


def test_the_proxy_lets_through_the_largest_body_any_endpoint_takes() -> None:
    """nginx sits in front of both limits: a recording to analyse may be bigger than an
    upload, and the proxy must not refuse what the app would take."""
    from src.settings import Settings

    assert Settings(max_upload_mb=10, max_analyze_mb=300).max_body_mb == 300
    assert Settings(max_upload_mb=500, max_analyze_mb=300).max_body_mb == 500
