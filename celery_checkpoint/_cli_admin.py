"""``celery checkpoint serve`` and ``celery checkpoint migrate``: running the web
app alone, and moving runs between stores."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any
from urllib.parse import unquote, urlsplit

import click
from celery.utils.imports import import_from_cwd

from ._cli_base import BadInput, Failed, checkpoints_of, errors
from ._format import echo_json
from .exceptions import ImproperlyConfigured
from .migrate import migrate as run_migration
from .model import RunRecord
from .store import CheckpointStore
from .store._urls import redact
from .store.sqlite import sqlite_path

__all__ = ["migrate", "serve"]


def _import_hook(path: str) -> Any:
    module_name, _, name = path.partition(":")
    try:
        # As celery -A finds the app: the current directory first.
        hook = getattr(import_from_cwd(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise BadInput(f"--authenticate {path!r}: cannot import it ({exc})") from None
    if not callable(hook):
        raise BadInput(f"--authenticate {path!r} is not a function of the request")
    return hook


def _local_path(target: str) -> str | None:
    """The path of a file or SQLite store target; None for a server's URL."""
    scheme, sep, _ = target.partition(":")
    if not sep or len(scheme) == 1 or "/" in scheme:  # a plain path (or C:\\...)
        return target
    if scheme.lower() == "file":
        return unquote(urlsplit(target).path)
    if scheme.lower() == "sqlite":
        try:
            return str(sqlite_path(target)[0])  # as the store reads its URL
        except ImproperlyConfigured:
            return None  # opening it says what is wrong
    return None


def absent_store(target: str) -> str | None:
    """Why there is no store at ``target`` yet (a file or SQLite store's path
    that does not exist, a PostgreSQL schema that was never created); None when
    there is one, or when that cannot be told without opening it."""
    path = _local_path(target)
    if path is not None:
        return None if os.path.exists(path) else f"{path} does not exist"
    if target.partition(":")[0].lower() not in ("postgres", "postgresql"):
        return None
    try:
        import psycopg

        from .store.postgres._connection import _split_url

        url, schema = _split_url(target, None)
        with psycopg.connect(url) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
    except Exception:
        return None
    return None if found else f"schema {schema!r} does not exist"


def _same_place(source: str, target: str) -> bool:
    if source == target:
        return True
    a, b = _local_path(source), _local_path(target)
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--authenticate",
    "hook",
    metavar="MODULE:FUNCTION",
    help="authenticate(request) -> actor | None: who is asking (the host's login).",
)
@click.option("--root-path", default="", metavar="PATH", help="The path a proxy serves it under.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, hook: str | None, root_path: str) -> None:
    """Serve the inbox, the JSON API, signed links and /metrics (uvicorn)."""
    checkpoints = checkpoints_of(ctx)
    authenticate = _import_hook(hook) if hook else None
    try:
        # The web extra is optional: only this command needs it.
        import uvicorn

        from .web import create_app
    except (ImportError, ImproperlyConfigured) as exc:
        raise Failed(
            f"serve needs the web extra: pip install 'celery-checkpoint[web]' ({exc})"
        ) from None
    with errors():
        app = create_app(checkpoints, authenticate=authenticate)
    config = checkpoints.config
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}{root_path.rstrip('/')}"
    click.echo(f"inbox    {base}/")
    click.echo(f"API      {base}/api/  (document: {base}/api/openapi.json)")
    click.echo(f"metrics  {base}/metrics")
    if authenticate is None and not config.web_tokens:
        click.echo(
            "CLOSED: no authentication is configured, so everything but signed links answers "
            '401. To open it, set checkpoint_web_tokens = {"<token>": "<actor>"} in the '
            "app's config (API: Authorization: Bearer <token>), or pass --authenticate "
            "MODULE:FUNCTION (a function of the request returning who is signed in), or mount "
            "celery_checkpoint.web.create_app(checkpoints, authenticate=...) in your web app."
        )
    if not config.web_secret_keys:
        click.echo(
            "no checkpoint_web_secret_keys: signed links are off, and forms use a key of this "
            "process only (set it when several processes serve the inbox)"
        )
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level="info")


@click.command()
@click.argument("source", metavar="SOURCE")
@click.argument("target", metavar="TARGET")
@click.option("--dry-run", is_flag=True, help="Say what would be copied; write nothing.")
@click.option(
    "--no-ended", "skip_ended", is_flag=True, help="Copy paused runs only, not tombstones."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def migrate(source: str, target: str, dry_run: bool, skip_ended: bool, as_json: bool) -> None:
    """Copy paused runs and tombstones from the SOURCE store to the TARGET store.

    Stores are URLs or directories (sqlite:///app.db, file:///dir,
    redis://host:6379/0, postgresql://user@host/db). Each run is read back and
    compared; in-flight runs are refused (named, with why); a run already
    copied counts as such, so a migration stopped half-way is finished by
    running it again. Stop the workers, or point them at TARGET, first.
    """
    missing = absent_store(source)
    if missing is not None:
        raise BadInput(f"SOURCE {redact(source)}: there is no store there ({missing})")
    if _same_place(source, target):
        raise BadInput("SOURCE and TARGET are the same store: nothing to copy")
    with contextlib.ExitStack() as stack, errors():
        source_store = CheckpointStore.open(source)
        if dry_run and absent_store(target) is not None:
            # Nothing is created for a dry run: an empty store stands in for the target.
            scratch = tempfile.TemporaryDirectory(prefix="checkpoint-dry-run-")
            stack.callback(scratch.cleanup)
            target_store = CheckpointStore.open(f"sqlite:///{scratch.name}/target.db")
        else:
            target_store = CheckpointStore.open(target)
        try:
            total = source_store.count()
            shown = "would copy" if dry_run else "copying"
            with click.progressbar(
                length=total, label=f"{shown}: {total} live run(s) to look at", file=sys.stderr
            ) as bar:
                seen = [0]

                def step(run: RunRecord) -> None:
                    if run.status == "paused" and seen[0] < total:
                        seen[0] += 1
                        bar.update(1)

                report = run_migration(
                    source_store,
                    target_store,
                    dry_run=dry_run,
                    ended=not skip_ended,
                    progress=step,
                )
        finally:
            source_store.close()
            target_store.close()
    if as_json:
        echo_json(
            {
                "paused": report.paused,
                "ended": report.ended,
                "already_there": report.already_there,
                "refused": [{"run_id": r, "why": why} for r, why in report.refused],
                "dry_run": dry_run,
            }
        )
    else:
        click.echo(str(report))
        for run_id, why in report.refused:
            click.echo(f"  refused {run_id}: {why}")
    if not report.ok:
        raise click.exceptions.Exit(1)
