"""The shapes of a form: its fields, their kinds and choices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Choice", "Field", "Form", "Kind"]

Kind = Literal[
    "checkbox", "choice", "multichoice", "number", "text", "textarea", "lines", "json", "group"
]


@dataclass(frozen=True)
class Choice:
    value: str  #: the JSON text of the value: types survive the round trip
    label: str


@dataclass
class Field:
    """One input (or a fieldset of them) of the form."""

    name: str  #: the HTML name: the property path joined by "."
    path: tuple[str, ...]  #: where the value goes in the answer
    label: str
    kind: Kind
    id: str = ""
    required: bool = False
    nullable: bool = False
    has_default: bool = False
    default: Any = None
    help: str | None = None
    input_type: str = "text"
    integer: bool = False  #: a number (or list item) that must be whole
    attrs: dict[str, str] = field(default_factory=dict)
    choices: list[Choice] = field(default_factory=list)
    widget: Literal["radio", "select"] = "select"
    children: list[Field] = field(default_factory=list)

    def walk(self) -> Iterator[Field]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Form:
    """The fields of one pause's answer; ``whole`` tells how they make the answer."""

    fields: list[Field]
    #: "object": each field is a property; "single": the one field is the answer
    whole: Literal["object", "single"]

    def walk(self) -> Iterator[Field]:
        for top in self.fields:
            yield from top.walk()

    def by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.walk()}
