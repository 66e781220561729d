"""Module-level types the fidelity tests pause with (a resume must import them)."""

from __future__ import annotations

import dataclasses
from datetime import date
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

T = TypeVar("T")


class Aliased(BaseModel):
    approved_by: str = Field(alias="approvedBy")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)
    n: tuple[int, int]
    on: date


class Box(BaseModel, Generic[T]):
    item: T


@dataclasses.dataclass
class Shipment:
    carrier: str
    parcels: int = 1


class Address(TypedDict):
    street: str
    lines: list[str]


PositiveInt = Annotated[int, Field(gt=0)]
YesNo = Literal["yes", "no"]
