"""The Redis store's transitions of more than one round trip, killed at each one.

A pause naming a business key binds the key in the key's group, writes the
record in the run's group and settles the binding; an answer to a key, the
release of a key by a run that ended and a restore take several steps too (see
"Business keys" in the Redis store's docstring). For each such transition
(``killpoints.REDIS_SCENARIOS``), a child process runs it under
``strace -e inject=sendto:signal=SIGKILL:when=K`` (and the same on
``recvfrom``): it dies before its K-th request leaves, or before it reads the
K-th reply -- between any two steps, or after the last one was applied. A fresh
process then checks the run through the public API: as before or as after the
transition, the key held by exactly the run that should hold it, an early
answer taken exactly once. Against one Redis server and a Redis Cluster.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from tests.conftest import require, require_server, require_tool
from tests.contract.helpers import REDIS_URL, StoreFactory
from tests.contract.killpoints import REDIS_SCENARIOS, Server, kill_at

#: A request sent, a reply read: where a client dies between the steps.
SYSCALLS = {"sendto": "sendto,?send,?write", "recvfrom": "recvfrom,?recv,?read"}
#: No transition here makes more round trips than this.
MAX_CALLS = 30


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis-cluster":
        url: str = request.getfixturevalue("redis_cluster").url
    else:
        require_server("Redis", "127.0.0.1", 6379)
        url = REDIS_URL
    prefix = f"cc-kill-{uuid4().hex[:12]}"
    yield f"{url}#{prefix}"
    StoreFactory("redis", url).delete_matching(prefix + "*")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with open(tmp_path / "server.log", "w+") as log:
        server = Server(log)
        try:
            yield server
        finally:
            server.close()


@pytest.mark.slow
@pytest.mark.redis
def test_every_keyed_transition_killed_between_its_round_trips_leaves_the_run_before_or_after(
    redis_url: str, server: Server
) -> None:
    strace = require_tool("strace", "kills transitions at each round trip")
    started = time.monotonic()
    points: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    n = 0
    for scenario in REDIS_SCENARIOS:
        for syscall, names in SYSCALLS.items():
            for k in range(1, MAX_CALLS + 2):
                assert k <= MAX_CALLS, f"{scenario} never completes under {syscall} kills"
                n += 1
                result = kill_at(strace, server, scenario, names, k, f"{redis_url}-{n}")
                require(not result.startswith("unattached"), f"strace cannot attach: {result}")
                if result == "done":
                    break
                points[scenario] += 1
                outcomes[result] += 1
    width = max(len(name) for name in REDIS_SCENARIOS)
    print("\nkill points (SIGKILL on a request or a reply):")
    for scenario in REDIS_SCENARIOS:
        print(f"{scenario:<{width}}  {points[scenario]:>3}")
    print(
        f"{sum(points.values())} kill points in {time.monotonic() - started:.0f} s; the run was "
        f"found as before the transition {outcomes['killed, before']} times, as after it "
        f"{outcomes['killed, after']} times"
    )
    for scenario in REDIS_SCENARIOS:
        assert points[scenario] > 0, f"{scenario} was never killed"
    assert outcomes["killed, after"] > 0
    assert outcomes["killed, before"] > 0
