"""Values as kombu's JSON serializer carries them, stored and read back with their types.

Task arguments and the captured signature are stored in this form, so a
resumed body (and a result backend told of the run) receives what the first
execution received.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.utils import json as kombu_json

__all__ = ["decode", "encode"]


def encode(value: Any) -> Any:
    """``value`` as kombu's JSON serializer carries it: plain JSON, with datetime,
    Decimal, UUID and bytes kept as ``{"__type__": ..., "__value__": ...}``.

    Task arguments are stored in this form, so a resumed body receives what the
    first execution received. ``TypeError`` for what that serializer cannot carry.
    """
    codec: Any = kombu_json
    return json.loads(codec.dumps(value))


def decode(value: Any) -> Any:
    """The values :func:`encode` stored, with their types back."""
    codec: Any = kombu_json
    return codec.loads(json.dumps(value))
