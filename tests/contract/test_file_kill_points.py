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

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_tool
from tests.contract.killpoints import SCENARIOS, Server, kill_at

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
#: No transition makes more calls than this of one kind: a loop that does is a bug.
MAX_CALLS = 60


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with open(tmp_path / "server.log", "w+") as log:
        server = Server(log)
        try:
            yield server
        finally:
            server.close()


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
                where = str(tmp_path / f"s{n}")
                result = kill_at(strace, server, scenario, SYSCALLS[syscall], k, where)
                require(not result.startswith("unattached"), f"strace cannot attach: {result}")
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
