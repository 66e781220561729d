"""Signals sent on every transition of a checkpointed run, the Celery way.

Connect a receiver to wire metrics or alerts; it is called with ``sender`` and
keyword arguments, and must accept ``**kwargs`` (more may be added)::

    from celery_checkpoint.signals import checkpoint_expired, checkpoint_paused

    @checkpoint_paused.connect
    def count_pause(sender=None, run=None, step=None, **kwargs):
        statsd.increment("checkpoint.paused", tags=[f"task:{sender.name}", f"step:{step}"])

    @checkpoint_expired.connect
    def page_someone(sender=None, run=None, step=None, **kwargs):
        alert(f"{run.task_name} run {run.run_id} expired waiting at {step}")

``run`` is always the :class:`~celery_checkpoint.RunRecord` record of the
transition (with its ``lease`` set while the run is in flight); ``step`` is
the pause point's name, the same as ``run.step``.

==========================  ========  ============================  =============================
signal                      sender    extra arguments               sent by, when
==========================  ========  ============================  =============================
``checkpoint_paused``       the task  ``reason``, ``expires_at``    the worker, after the save
``checkpoint_resumed``      the task  ``timed_out``,                the worker that won the claim,
                                      ``request_id``                before the body runs again
``checkpoint_completed``    the task  ``result``                    the worker, after the body
                                                                    returned and the run is done
``checkpoint_expired``      the task                                the worker, when a pause with
                                                                    ``on_timeout="expire"`` ended
``checkpoint_cancelled``    the app   ``reason``, ``in_flight``     whoever called ``cancel()``
``checkpoint_recovered``    the app                                 the recovery pass that
                                                                    re-armed an orphaned run
==========================  ========  ============================  =============================

A receiver that raises is logged and does not stop the transition (Celery's
``Signal.send`` catches it). Each transition also writes one ``key=value`` line
to the ``celery_checkpoint.runs`` task logger, e.g.
``checkpoint.paused run_id=... task=shop.ship step=await_approval pause_seq=1``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "checkpoint_cancelled",
    "checkpoint_completed",
    "checkpoint_expired",
    "checkpoint_paused",
    "checkpoint_recovered",
    "checkpoint_resumed",
]

checkpoint_paused = Signal(
    name="checkpoint_paused", providing_args={"run", "step", "reason", "expires_at"}
)
checkpoint_resumed = Signal(
    name="checkpoint_resumed", providing_args={"run", "step", "timed_out", "request_id"}
)
checkpoint_completed = Signal(name="checkpoint_completed", providing_args={"run", "step", "result"})
checkpoint_expired = Signal(name="checkpoint_expired", providing_args={"run", "step"})
checkpoint_cancelled = Signal(
    name="checkpoint_cancelled", providing_args={"run", "step", "reason", "in_flight"}
)
checkpoint_recovered = Signal(name="checkpoint_recovered", providing_args={"run", "step"})
