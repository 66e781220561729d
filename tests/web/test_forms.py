"""Forms drawn from JSON Schemas: each kind of field, and answers that validate back."""

from __future__ import annotations

from datetime import date
from enum import Enum
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from celery_checkpoint.web.forms import (
    Form,
    build_form,
    initial_values,
    place_errors,
    read_answer,
)


class Colour(str, Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    city: str
    country: Literal["PT", "ES", "FR", "DE", "IT"] = "PT"


class Everything(BaseModel):
    approved: bool
    maybe: bool | None = None
    colour: Colour
    size: Literal[1, 2, 3]
    count: int = Field(ge=1, le=10)
    ratio: float = Field(gt=0, lt=1)
    email: str = Field(json_schema_extra={"format": "email"})
    when: date
    tags: list[str] = []
    scores: list[int] = []
    picks: list[Literal["a", "b", "c"]] = []
    address: Address
    extra: dict[str, int] = {}
    note: str | None = None


def form_for(model: Any) -> Form:
    return build_form(TypeAdapter(model).json_schema())


def fields(form: Form) -> dict[str, Any]:
    return form.by_name()


def test_each_kind_of_schema_becomes_its_own_kind_of_field() -> None:
    by_name = fields(form_for(Everything))
    assert by_name["approved"].kind == "checkbox"
    assert by_name["maybe"].kind == "choice" and by_name["maybe"].nullable
    assert by_name["colour"].kind == "choice"
    assert [c.label for c in by_name["colour"].choices] == ["red", "green"]
    assert by_name["size"].kind == "choice" and by_name["size"].widget == "radio"
    assert [c.value for c in by_name["size"].choices] == ["1", "2", "3"]
    assert by_name["count"].kind == "number"
    assert by_name["count"].attrs == {"step": "1", "min": "1", "max": "10"}
    assert by_name["ratio"].attrs["step"] == "any"
    assert "more than 0" in (by_name["ratio"].help or "")
    assert by_name["email"].input_type == "email"
    assert by_name["when"].input_type == "date"
    assert by_name["tags"].kind == "lines"
    assert by_name["scores"].kind == "lines" and by_name["scores"].integer
    assert by_name["picks"].kind == "multichoice"
    assert by_name["address"].kind == "group"
    assert [c.name for c in by_name["address"].children] == [
        "address.street",
        "address.city",
        "address.country",
    ]
    assert by_name["address.country"].widget == "select"  # five choices
    assert by_name["extra"].kind == "json"
    assert by_name["note"].kind == "text" and by_name["note"].nullable
    assert by_name["approved"].required and not by_name["note"].required
    ids = [f.id for f in form_for(Everything).walk()]
    assert len(ids) == len(set(ids))


def test_a_filled_form_reads_back_as_an_answer_the_model_accepts() -> None:
    form = form_for(Everything)
    submitted = {
        "approved": ["on"],
        "maybe": [""],
        "colour": ['"green"'],
        "size": ["2"],
        "count": ["7"],
        "ratio": ["0.25"],
        "email": ["ana@shop.example"],
        "when": ["2030-01-02"],
        "tags": ["fragile\n\n  gift  \n"],
        "scores": ["3\n4"],
        "picks": ['"a"', '"c"'],
        "address.street": ["Rua A 1"],
        "address.city": ["Porto"],
        "address.country": ['"ES"'],
        "extra": ['{"x": 1}'],
        "note": [""],
    }
    value, unreadable = read_answer(form, submitted)
    assert unreadable == {}
    parsed = Everything.model_validate(value)
    assert parsed.approved is True and parsed.maybe is None
    assert parsed.colour is Colour.GREEN and parsed.size == 2
    assert parsed.count == 7 and parsed.ratio == 0.25
    assert parsed.when == date(2030, 1, 2)
    assert parsed.tags == ["fragile", "gift"] and parsed.scores == [3, 4]
    assert parsed.picks == ["a", "c"]
    assert parsed.address == Address(street="Rua A 1", city="Porto", country="ES")
    assert parsed.extra == {"x": 1} and parsed.note is None


def test_an_unchecked_box_is_false_and_empty_optional_fields_take_their_defaults() -> None:
    class Small(BaseModel):
        approved: bool
        priority: Literal["low", "high"] = "low"
        note: str = "none"

    value, _ = read_answer(form_for(Small), {"priority": [""], "note": [""]})
    assert value == {"approved": False}
    assert Small.model_validate(value) == Small(approved=False)


def test_pydantic_errors_land_beside_the_fields_their_loc_names() -> None:
    form = form_for(Everything)
    value, _ = read_answer(
        form,
        {"count": ["11"], "scores": ["1\nx"], "address.street": ["s"], "email": ["e"]},
    )
    with pytest.raises(ValidationError) as caught:
        Everything.model_validate(value)
    placed, loose = place_errors(form, caught.value.errors())
    assert "less than or equal to 10" in placed["count"][0]
    assert placed["scores"][0].startswith("line 2: ")
    assert placed["address.city"] == ["Field required"]
    assert "colour" in placed and "when" in placed
    assert loose == []


def test_an_error_that_names_no_field_is_kept_for_the_top_of_the_form() -> None:
    class Strict(BaseModel, extra="forbid"):
        ok: bool

    placed, loose = place_errors(
        form_for(Strict), [{"loc": ("surprise",), "msg": "Extra inputs are not permitted"}]
    )
    assert placed == {} and loose == ["surprise: Extra inputs are not permitted"]


def test_a_plain_type_is_one_field_and_no_schema_is_a_json_field() -> None:
    number = form_for(int)
    assert number.whole == "single" and number.fields[0].kind == "number"
    assert read_answer(number, {"value": ["42"]})[0] == 42
    anything = build_form(None)
    assert anything.fields[0].kind == "json"
    assert read_answer(anything, {"answer": ['{"a": [1, 2]}']})[0] == {"a": [1, 2]}
    assert read_answer(anything, {"answer": [""]})[0] is None
    _, unreadable = read_answer(anything, {"answer": ["{oops"]})
    assert "not valid JSON" in unreadable["answer"][0]


def test_a_number_that_does_not_parse_is_passed_on_for_pydantic_to_name() -> None:
    form = form_for(int)
    value, _ = read_answer(form, {"value": ["twelve"]})
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(int).validate_python(value)
    placed, _ = place_errors(form, caught.value.errors())
    assert "valid integer" in placed["value"][0]


def test_refs_are_resolved_and_a_recursive_model_ends_in_a_json_field() -> None:
    class Node(BaseModel):
        name: str
        child: Node | None = None

    form = form_for(Node)
    by_name = fields(form)
    assert by_name["child"].kind == "group"
    nested = [f for f in form.walk() if f.path[-1] == "child"]
    assert len(nested) < 10
    assert nested[-1].kind == "json"
    assert all(f.kind == "group" for f in nested[:-1])


def test_a_fresh_form_shows_the_schemas_defaults() -> None:
    form = form_for(Everything)
    values = initial_values(form)
    assert values["address.country"] == ['"PT"']
    assert values["tags"] == [""]
    assert "approved" not in values
