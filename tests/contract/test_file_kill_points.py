"""Every transition of the file store, killed at every system call it makes.

For each transition (see ``killpoints.SCENARIOS``), each system call that can
change the store or its locks, and each K from 1 until the transition completes
unharmed, a child process runs the transition under
``strace -f -e inject=SYSCALL:signal=SIGKILL:when=K``: the kernel kills it on
entering its K-th such call, before the call runs. A fresh process then checks
the run through the public API: as before or as after the transition (after at
most one recovery pass or read repaired it), nothing lost, nothing stuck.
Nothing in the store is mocked or patched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import require, require_tool
from tests.contract.killpoints import SCENARIOS

#: The system calls a transition changes the store with, and the names they may
#: have on other architectures (``?``: strace ignores a name it does not know).
SYSCALLS = {
    "openat": "openat,?open,?creat",
    "write": "write,?pwrite64",
    "fsync": "fsync",
    "fdatasync": "fdatasync",
    "rename": "rename,?renameat,?renameat2",
    "unlink": "unlink,?unlinkat",
    "utimensat": "utimensat,?utimes,?futimesat",
    "flock": "flock",
}
ROOT = Path(__file__).resolve().parents[2]
#: No transition makes more calls than this of one kind: a loop that does is a bug.
MAX_CALLS = 60


class Server:
    """The ``python -c`` process that forks the transitions and the checks."""

    def __init__(self, log: IO[str]) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), *sys.path])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.contract.killpoints import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the kill-point server died"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with open(tmp_path / "server.log", "w+") as log:
        server = Server(log)
        try:
            yield server
        finally:
            server.close()


def kill_at(strace: str, server: Server, scenario: str, syscall: str, k: int, where: Path) -> str:
    """Run ``scenario``'s transition with a SIGKILL on its ``k``-th ``syscall``;
    check what it left. Returns "done" or "killed, <before|after>"."""
    started = server.ask(op="start", scenario=scenario, dir=str(where))
    assert "error" not in started, started["error"]
    names = SYSCALLS[syscall]
    inject = f"inject={names}:signal=SIGKILL:when={k}"
    pid = str(started["pid"])
    tracer = subprocess.Popen(
        [strace, "-f", "-o", "/dev/null", "-e", f"trace={names}", "-e", inject, "-p", pid],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tracer.stderr is not None
    attached = tracer.stderr.readline()
    if "attached" not in attached:
        server.ask(op="go")
        tracer.wait(30)
        require(False, f"strace cannot attach to a process here: {attached.strip()}")
    ran = server.ask(op="go")["status"]
    tracer.wait(30)
    tracer.stderr.close()
    assert ran in ("killed", "done"), f"{scenario}: the transition failed ({ran}), see the log"
    checked = server.ask(op="check", scenario=scenario, dir=str(where), ctx=started["ctx"])
    assert "error" not in checked, (
        f"{scenario}, killed at {syscall} #{k}:\n{checked['error']}"
        if ran == "killed"
        else f"{scenario}, not killed:\n{checked['error']}"
    )
    if ran == "done":
        assert checked["outcome"] == "after", f"{scenario} completed but left {checked}"
        return "done"
    return f"killed, {checked['outcome']}"


@pytest.mark.slow
def test_every_transition_killed_at_every_system_call_leaves_the_run_before_or_after_it(
    tmp_path: Path, server: Server
) -> None:
    strace = require_tool("strace", "kills transitions at each system call")
    started = time.monotonic()
    points: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[str] = Counter()
    n = 0
    for scenario in SCENARIOS:
        for syscall in SYSCALLS:
            for k in range(1, MAX_CALLS + 2):
                assert k <= MAX_CALLS, f"{scenario} never completes under {syscall} kills"
                n += 1
                result = kill_at(strace, server, scenario, syscall, k, tmp_path / f"s{n}")
                if result == "done":
                    break
                points[scenario, syscall] += 1
                outcomes[result] += 1
    total = sum(points.values())
    width = max(len(name) for name in SCENARIOS)
    lines = [f"{'transition':<{width}}  " + " ".join(f"{s:>9}" for s in SYSCALLS) + "    all"]
    for scenario in SCENARIOS:
        row = [points[scenario, syscall] for syscall in SYSCALLS]
        lines.append(
            f"{scenario:<{width}}  " + " ".join(f"{c:>9}" for c in row) + f"  {sum(row):>5}"
        )
    print("\nkill points (SIGKILL on entering the K-th call):\n" + "\n".join(lines))
    print(
        f"{total} kill points in {time.monotonic() - started:.0f} s; the run was found as "
        f"before the transition {outcomes['killed, before']} times, as after it "
        f"{outcomes['killed, after']} times"
    )
    for scenario in SCENARIOS:
        assert sum(points[scenario, s] for s in SYSCALLS) > 0, f"{scenario} was never killed"
    assert outcomes["killed, after"] > 0
    assert outcomes["killed, before"] > 0
