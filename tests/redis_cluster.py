"""A private Redis Cluster of three primaries on free loopback ports, for the tests.

``redis-server`` and ``redis-cli`` come from the same package as the shared
server; the cluster lives in a temporary directory and is killed afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import IN_CI

START_TIMEOUT = 60.0


def _free_port() -> int:
    # Cluster nodes also listen on port + 10000 (the bus): keep both free.
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class RedisCluster:
    directory: Path
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL naming one node; the store discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    persistence: list[str] = field(default_factory=lambda: ["--appendonly", "no"])

    def start(self, primaries: int = 3) -> None:
        for _ in range(primaries):
            port = _free_port()
            (self.directory / str(port)).mkdir(parents=True)
            self.ports.append(port)
            self.processes.append(self._spawn(port))
        deadline = time.monotonic() + START_TIMEOUT
        for port in self.ports:
            self._wait_ping(port, deadline)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if created.returncode != 0:
            self.stop()
            pytest.fail(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
        self.wait_ok(deadline)

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.directory / str(port)
        log = open(node_dir / "server.log", "ab")  # noqa: SIM115 - the server owns it
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port)]
        args += ["--dir", str(node_dir), "--save", "", *self.persistence]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", "5000"]
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return process

    def _wait_ping(self, port: int, deadline: float) -> None:
        while self._cli(port, "ping").stdout.strip() != "PONG":
            self._check(deadline, f"node {port} did not start")
            time.sleep(0.05)

    def kill(self, port: int) -> None:
        """SIGKILL one primary: no shutdown, no final fsync -- a crash."""
        process = self.processes[self.ports.index(port)]
        process.kill()
        process.wait()

    def restart(self, port: int) -> None:
        """Start a killed primary again on its port and directory; wait for the cluster."""
        index = self.ports.index(port)
        self.processes[index] = self._spawn(port)
        deadline = time.monotonic() + START_TIMEOUT
        self._wait_ping(port, deadline)
        self.wait_ok(deadline)

    def wait_ok(self, deadline: float) -> None:
        for port in self.ports:
            while "cluster_state:ok" not in self._cli(port, "cluster", "info").stdout:
                self._check(deadline, f"node {port} never saw the cluster as ok")
                time.sleep(0.1)

    def _cli(self, port: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )

    def _check(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
            logs = "\n".join(
                (self.directory / str(port) / "server.log").read_text(errors="replace")[-2000:]
                for port in self.ports
            )
            self.stop()
            pytest.fail(f"private Redis Cluster: {what}\n{logs}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def start_cluster(directory: Path, *persistence: str) -> RedisCluster:
    """A running three-primary cluster; skips (locally) or fails (CI) without the binaries.

    ``persistence``: redis-server options replacing the default ``--appendonly no``.
    """
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        message = f"{' and '.join(missing)} not on PATH: cannot start a Redis Cluster"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    cluster = RedisCluster(directory)
    if persistence:
        cluster.persistence = list(persistence)
    cluster.start()
    return cluster
