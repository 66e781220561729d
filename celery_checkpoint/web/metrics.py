"""``/metrics``: the live runs by task and step, in Prometheus' text format.

Read from ``store.summary()`` at each scrape (aggregate counts where the
backend keeps them, never a read of every record where it has indexes), into a
registry of the app's own, so two apps in one process never clash:

=============================================  ===========================================
``celery_checkpoint_paused_runs``              paused, waiting for an answer or a worker
``celery_checkpoint_in_flight_runs``           resumed and running under a lease
``celery_checkpoint_pending_answers``          answered, not yet picked up by a worker
``celery_checkpoint_overdue_runs``             paused past their deadline
``celery_checkpoint_oldest_pause_age_seconds``  how long the oldest paused run has waited
=============================================  ===========================================

Each carries the labels ``task`` and ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..model import utcnow
from ..store import CheckpointStore

__all__ = ["StoreCollector", "metrics", "registry_for"]

_LABELS = ["task", "step"]


class StoreCollector:
    """A Prometheus collector that asks the store at scrape time."""

    def __init__(self, get_store: Callable[[], CheckpointStore]) -> None:
        self._get_store = get_store

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        groups = self._get_store().summary(now)
        families = {
            "paused": GaugeMetricFamily(
                "celery_checkpoint_paused_runs", "Runs paused at this step", labels=_LABELS
            ),
            "in_flight": GaugeMetricFamily(
                "celery_checkpoint_in_flight_runs",
                "Resumed runs running under a lease",
                labels=_LABELS,
            ),
            "pending": GaugeMetricFamily(
                "celery_checkpoint_pending_answers",
                "Answered runs not yet picked up by a worker",
                labels=_LABELS,
            ),
            "overdue": GaugeMetricFamily(
                "celery_checkpoint_overdue_runs",
                "Paused runs past their deadline",
                labels=_LABELS,
            ),
        }
        age = GaugeMetricFamily(
            "celery_checkpoint_oldest_pause_age_seconds",
            "Seconds the oldest paused run at this step has waited",
            labels=_LABELS,
        )
        for group in groups:
            labels = [group["task"], group["step"]]
            for key, family in families.items():
                family.add_metric(labels, float(group[key]))  # type: ignore[literal-required]
            oldest = group["oldest_paused_at"]
            age.add_metric(labels, 0.0 if oldest is None else (now - oldest).total_seconds())
        yield from families.values()
        yield age


def registry_for(get_store: Callable[[], CheckpointStore]) -> CollectorRegistry:
    """A registry of its own, holding only the store's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(get_store))
    return registry


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"cache-control": "no-store"})
