"""Real ``celery worker`` subprocesses and the waits the integration tests need.

A :class:`Worker` is a ``celery -A tests.integration.proj worker`` process in
its own process group (so a ``SIGKILL`` reaches the pool children too), with
its output in a log file the tests read. Waits poll with a generous deadline
that only turns a hang into a failure with the worker's log attached; no test
asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from celery.result import AsyncResult

from tests.integration.proj import Settings

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class Worker:
    """One ``celery worker`` subprocess; stop it with :meth:`stop` or :meth:`kill`."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        log_dir: Path,
        *,
        name: str = "w",
        concurrency: int = 2,
        pool: str = "prefork",
        options: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.settings = settings
        self.node = f"{name}-{uuid.uuid4().hex[:8]}@cc-it"
        self.log = log_dir / f"{self.node}.log"
        env = dict(os.environ)
        env.update(settings.to_env())
        env["CC_IT_STORE_FROM_OPTION"] = "true"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [
            *(sys.executable, "-m", "celery", "-A", "tests.integration.proj", "worker"),
            *(f"--pool={pool}", "-c", str(concurrency), "-n", self.node, "-Q", settings.queue),
            *("--without-mingle", "--without-gossip", "--without-heartbeat"),
            *("--loglevel=INFO", "--checkpoint-store", settings.store),
            *options,
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches the pool
            )

    def __repr__(self) -> str:
        return f"<Worker {self.node} pid {self.proc.pid}>"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        tail = "\n".join(self.log_text().splitlines()[-60:])
        return f"{self!r} (exit status {self.proc.poll()}), log tail:\n{tail}"

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        """Block until the worker answers a ping: its consumer is up, recovery has run."""

        def answered() -> bool:
            if not self.alive:
                raise AssertionError(f"worker exited while starting: {self.describe()}")
            try:
                replies = self.app.control.ping(destination=[self.node], timeout=0.5)
            except OSError:  # the broker dropped this connection: ping again
                return False
            return any(self.node in reply for reply in replies)

        wait_until(answered, f"{self.node} to answer a ping", timeout, self)
        return self

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        wait_until(lambda: text in self.log_text(), f"{text!r} in the log", timeout, self)

    def owns(self, pid: int) -> bool:
        """True if ``pid`` is this worker or one of its pool processes."""
        try:
            return os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and every pool child."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 20.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the group if it is not gone within ``grace``."""
        if self.alive:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 60.0, *workers: Worker) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with the workers' logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n\n".join(worker.describe() for worker in workers)
            raise AssertionError(f"gave up waiting for {what}\n{logs}")
        time.sleep(0.02)


def wait_for_state(
    result: AsyncResult, state: str, *workers: Worker, timeout: float = 60.0, **meta: Any
) -> AsyncResult:
    """Wait until ``result`` is in ``state`` (and its meta holds ``meta``), freshly read."""

    def reached() -> bool:
        fresh = AsyncResult(result.id, app=result.app)
        if fresh.state != state:
            return False
        info = fresh.info if isinstance(fresh.info, dict) else {}
        return all(info.get(key) == value for key, value in meta.items())

    wait_until(reached, f"task {result.id} to be {state} {meta or ''}", timeout, *workers)
    return AsyncResult(result.id, app=result.app)


def get(result: AsyncResult, *workers: Worker, timeout: float = 60.0) -> Any:
    """``result.get()`` that reports the workers' logs when it times out."""
    try:
        return result.get(timeout=timeout)
    except TimeoutError as exc:
        logs = "\n\n".join(worker.describe() for worker in workers)
        raise AssertionError(f"no result for {result.id}: {exc}\n{logs}") from exc


def remove_queue(app: Celery, queue: str) -> None:
    """Purge and delete a test queue and its exchange; a missing one is fine."""
    with app.connection_for_write() as conn:
        for action in ("queue_purge", "queue_delete", "exchange_delete"):
            try:
                channel = conn.channel()
                try:
                    getattr(channel, action)(queue)
                finally:
                    channel.close()
            except Exception:  # not there: nothing to clean
                continue


def delete_redis_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
