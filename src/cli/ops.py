"""Operations commands: ``urbansound db ...``, ``urbansound models ...``, ``data upload``.

Thin: argument parsing and printing only; the work is in ``db``, ``registry`` and ``ingest``
so the web app and the worker do exactly what these commands do.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import UserError, friendly_errors, print_json

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
models_app = typer.Typer(help="Model versions: list, activate, roll back.", no_args_is_help=True)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Database URL; default: URBANSOUND_DATABASE_URL or SQLite."),
]


def _quiet_alembic() -> None:
    """Alembic logs each step at INFO; one line per migration is what a person wants."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("alembic.runtime.migration").setLevel(logging.INFO)


@db_app.command("upgrade")
@friendly_errors
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    url: UrlOption = None,
) -> None:
    """Create or update the tables (safe to repeat: does nothing when up to date)."""
    from .. import db

    _quiet_alembic()
    db.upgrade(url, revision)
    typer.echo(f"database at revision {db.current_revision(url) or 'base'}")


@db_app.command("downgrade")
@friendly_errors
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision ('base' drops everything).")],
    url: UrlOption = None,
) -> None:
    """Undo migrations down to REVISION."""
    from .. import db

    _quiet_alembic()
    db.downgrade(url, revision)
    typer.echo(f"database at revision {db.current_revision(url) or 'base'}")


@db_app.command("current")
@friendly_errors
def db_current(url: UrlOption = None) -> None:
    """Print the schema revision of the database."""
    from .. import db

    typer.echo(db.current_revision(url) or "base (no tables)")


def _session_or_none(url: str | None = None) -> AbstractContextManager[Session] | None:
    """The registry works without a database; its mirror is best effort from the CLI."""
    from .. import db

    try:
        db.check_connection(url)
    except db.DatabaseUnavailable as exc:
        typer.echo(f"warning: {exc.message} (database records not updated)", err=True)
        return None
    return db.session_scope(url)


@models_app.command("list")
@friendly_errors
def models_list(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Model versions, newest first; the served one is marked with '*'."""
    from .. import registry

    versions = registry.list_versions()
    if json_output:
        for info in versions:
            print_json(info.to_dict())
        return
    if not versions:
        typer.echo("no model versions yet: train one with `urbansound train`")
        return
    for info in versions:
        f1 = info.metrics.get("macro_f1") if info.metrics else None
        acc = info.metrics.get("accuracy") if info.metrics else None
        score = " ".join(
            f"{name} {value:.3f}" for name, value in (("macro_f1", f1), ("accuracy", acc))
            if isinstance(value, int | float)
        )
        extra = info.error or info.reason or ""
        typer.echo(
            f"{'*' if info.active else ' '} {info.version:<28} {info.status:<9} "
            f"{score:<32} parent={info.parent or '-'}" + (f"  ({extra})" if extra else "")
        )


@models_app.command("activate")
@friendly_errors
def models_activate(
    version: Annotated[str, typer.Argument(help="The version to serve.")],
    force: Annotated[bool, typer.Option("--force", help="Serve it even if the quality gate "
                                        "rejected it.")] = False,
) -> None:
    """Serve VERSION (atomic pointer swap; web processes pick it up within a second)."""
    from .. import registry
    from ..settings import get_settings

    settings = get_settings()
    result = registry.serve(version, force=force, models_dir=settings.models_dir,
                            db_url=settings.db_url)
    typer.echo(f"serving {version} (was {result['previous'] or 'nothing'})")


@models_app.command("rollback")
@friendly_errors
def models_rollback() -> None:
    """Serve the version the current one replaced (its parent)."""
    from .. import registry

    scope = _session_or_none()
    if scope is None:
        version = registry.rollback()
    else:
        with scope as session:
            version = registry.rollback(session=session)
    typer.echo(f"serving {version}")


def _expand(paths: list[Path]) -> list[Path]:
    """Folders are walked (hidden entries skipped); files are taken as they are."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in
                                           p.relative_to(path).parts)
            )
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"{path}: no such file or folder.")
    return out


@friendly_errors
def upload(
    paths: Annotated[list[Path], typer.Argument(
        help="Audio files, zip archives or folders; a file's label is its folder's name.")],
    label: Annotated[str | None, typer.Option(
        "--label", help="Label every file with this class, whatever its folder.")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Check, store and record audio files for the next retrain.

    Exit status: 0 when every file was accepted, 2 when some were rejected, 1 when none was
    accepted (or on an error)."""
    from ..ingest import ingest

    files = _expand(paths)
    if not files:
        raise UserError("no files found in " + ", ".join(str(p) for p in paths))
    report = ingest(files, label=label, source="cli", client="cli")
    if json_output:
        print_json(report.to_dict())
    else:
        for r in report.results:
            if r.accepted:
                typer.echo(f"accepted  {r.label:<17} {r.name}")
            else:
                typer.echo(f"rejected  {r.code:<17} {r.name}: {r.message}")
        typer.echo(
            f"upload {report.upload_id}: {report.n_accepted} accepted, {report.n_rejected} "
            f"rejected" + (f", {len(report.skipped)} hidden files skipped" if report.skipped
                           else ""),
            err=True,
        )
    if report.n_accepted == 0:
        raise typer.Exit(1)
    if report.n_rejected:
        raise typer.Exit(2)
