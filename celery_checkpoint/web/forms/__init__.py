"""A form drawn from a pause's ``expects`` JSON Schema, and the answer read back from it.

:func:`build_form` turns the schema into :class:`Field` s, the way Prefect draws
its resume form from the input model:

==============================================  ==========================================
schema                                          field
==============================================  ==========================================
``boolean``                                     a checkbox (a yes/no/empty select if nullable)
``enum``, ``const``, ``anyOf`` of consts        radio buttons (up to 4 choices) or a select
``integer``, ``number``                         a number input with min/max/step from the bounds
``string`` (``email``, ``date``, ``date-time``,  a text input of that type, with length limits
``uri``, ``time`` formats)                      and pattern
``object`` with ``properties``                  a fieldset of the properties (``$ref`` resolved)
``array`` of choices                            a group of checkboxes
``array`` of strings or numbers                 a textarea, one item per line
``X | None``                                    the field of X, empty meaning null
anything else, or no ``expects`` at all         a JSON textarea, checked on the server
==============================================  ==========================================

:func:`read_answer` turns the submitted form back into the JSON answer, and
:func:`place_errors` puts pydantic's errors beside the fields their ``loc``
names. The server validates the answer against ``expects`` as every resume
does; the browser's own checks (``required``, ``min``...) only save a round trip.

:mod:`._fields` holds the shapes, :mod:`._build` draws them from a schema,
:mod:`._answers` reads a submitted form back and places the errors.
"""

from __future__ import annotations

from ._answers import initial_values, place_errors, read_answer
from ._build import build_form
from ._fields import Choice, Field, Form

__all__ = ["Choice", "Field", "Form", "build_form", "initial_values", "place_errors", "read_answer"]
