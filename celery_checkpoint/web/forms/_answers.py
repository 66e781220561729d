"""A form's values: what a fresh form shows, the JSON answer a submitted one
stands for, and pydantic's errors placed beside the fields they concern."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._fields import Field, Form

__all__ = ["initial_values", "place_errors", "read_answer"]


def _raw(made: Field, value: Any) -> list[str]:
    """What a field shows for ``value`` (the form's raw strings)."""
    if value is None:
        return []
    if made.kind == "checkbox":
        return ["on"] if value is True else []
    if made.kind == "choice":
        return [json.dumps(value)]
    if made.kind == "multichoice":
        return [json.dumps(item) for item in value] if isinstance(value, list) else []
    if made.kind == "lines":
        return ["\n".join(str(item) for item in value)] if isinstance(value, list) else []
    if made.kind == "json":
        return [json.dumps(value, indent=2, ensure_ascii=False)]
    if made.kind == "group":
        return []
    return [str(value)]


def initial_values(form: Form, preset: Any = None) -> dict[str, list[str]]:
    """The raw values a fresh form shows: ``preset`` where given, else the schema's defaults."""
    values: dict[str, list[str]] = {}

    def fill(fields: list[Field], source: Any, has_source: bool) -> None:
        for made in fields:
            key = made.path[-1] if made.path else None
            if has_source and isinstance(source, dict) and key in source:
                value, known = source[key], True
            elif has_source and not made.path:
                value, known = source, True
            else:
                value, known = made.default, made.has_default
            if made.kind == "group":
                fill(made.children, value, known and isinstance(value, dict))
            elif known:
                values[made.name] = _raw(made, value)

    fill(form.fields, preset, preset is not None)
    return values


_EMPTY = object()


def _number(text: str, integer: bool) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text  # pydantic says what is wrong with it
    if integer or (number.is_integer() and re.fullmatch(r"[+-]?\d+", text.strip())):
        try:
            return int(text.strip())
        except ValueError:
            return int(number) if number.is_integer() else number
    return number


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read(made: Field, data: Mapping[str, Sequence[str]], errors: dict[str, list[str]]) -> Any:
    submitted = list(data.get(made.name, ()))
    first = submitted[0] if submitted else ""
    if made.kind == "checkbox":
        return bool(submitted)
    if made.kind == "group":
        members: dict[str, Any] = {}
        for child in made.children:
            value = _read(child, data, errors)
            if value is not _EMPTY:
                members[child.path[-1]] = value
        if not members and not made.required:
            return None if made.nullable and not made.has_default else _EMPTY
        return members
    if made.kind == "multichoice":
        return [_loads(value) for value in submitted]
    if made.kind == "lines":
        lines = [line.strip() for line in first.splitlines() if line.strip()]
        if not lines and not made.required:
            return _EMPTY if made.has_default else (None if made.nullable else [])
        if made.input_type == "number":
            return [_number(line, made.integer) for line in lines]
        return lines
    if not first.strip():
        if made.has_default:
            return _EMPTY
        return None if made.nullable or (made.kind == "json" and not made.path) else _EMPTY
    if made.kind == "choice":
        return _loads(first)
    if made.kind == "number":
        return _number(first, made.integer)
    if made.kind == "json":
        try:
            return json.loads(first)
        except json.JSONDecodeError as exc:
            errors.setdefault(made.name, []).append(
                f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            )
            return _EMPTY
    return first


def read_answer(form: Form, data: Mapping[str, Sequence[str]]) -> tuple[Any, dict[str, list[str]]]:
    """The JSON answer a submitted form stands for, and the fields it could not read.

    Values are converted as the schema's types say (a number input gives a
    number, a choice its JSON value); what cannot be converted is passed on as
    typed, so pydantic's error names the problem.
    """
    errors: dict[str, list[str]] = {}
    if form.whole == "single":
        value = _read(form.fields[0], data, errors)
        return (None if value is _EMPTY else value), errors
    answer: dict[str, Any] = {}
    for made in form.fields:
        value = _read(made, data, errors)
        if value is not _EMPTY:
            answer[made.path[-1]] = value
    return answer, errors


def place_errors(
    form: Form, errors: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, list[str]], list[str]]:
    """pydantic's errors by field name (the field whose path is the longest prefix
    of the error's ``loc``), and those that name no field."""
    fields = sorted(form.walk(), key=lambda f: len(f.path), reverse=True)
    placed: dict[str, list[str]] = {}
    loose: list[str] = []
    for error in errors:
        loc = tuple(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid"))
        target = next((f for f in fields if loc[: len(f.path)] == f.path), None)
        if target is None:
            where = ".".join(loc)
            loose.append(f"{where}: {message}" if where else message)
            continue
        rest = loc[len(target.path) :]
        if target.kind == "lines" and rest and rest[0].isdigit():
            message = f"line {int(rest[0]) + 1}: {message}"
        elif rest and target.kind in ("json", "multichoice"):
            message = f"{'.'.join(rest)}: {message}"
        placed.setdefault(target.name, []).append(message)
    return placed, loose
