"""The fields of a form drawn from a pause's ``expects`` JSON Schema (the table
in the package docstring says which schema makes which field)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._fields import Choice, Field, Form

__all__ = ["build_form"]

_FORMATS = {
    "email": "email",
    "date": "date",
    "date-time": "datetime-local",
    "time": "time",
    "uri": "url",
    "url": "url",
}
_MAX_DEPTH = 6
_RADIO_LIMIT = 4
_LONG_TEXT = 200


class _Schema:
    """Resolves ``$ref`` into ``$defs``/``definitions`` of one root schema."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def resolve(self, schema: Any, depth: int = 0) -> dict[str, Any]:
        if not isinstance(schema, Mapping):
            return {}
        node = dict(schema)
        for _ in range(_MAX_DEPTH):
            ref = node.get("$ref")
            all_of = node.get("allOf")
            if isinstance(ref, str):
                target = self._lookup(ref)
                rest = {k: v for k, v in node.items() if k != "$ref"}
                node = {**target, **rest}
            elif isinstance(all_of, list) and len(all_of) == 1:
                rest = {k: v for k, v in node.items() if k != "allOf"}
                node = {**self.resolve(all_of[0], depth + 1), **rest}
            else:
                break
        return node

    def _lookup(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            return {}
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                return {}
            node = node[part]
        return dict(node) if isinstance(node, Mapping) else {}


def _is_null(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "null" or ("const" in schema and schema["const"] is None)


def _consts(options: Sequence[Mapping[str, Any]]) -> list[Any] | None:
    values: list[Any] = []
    for option in options:
        if "const" in option:
            values.append(option["const"])
        elif isinstance(option.get("enum"), list):
            values.extend(option["enum"])
        else:
            return None
    return values


def _humanize(name: str) -> str:
    text = re.sub(r"[_\-]+", " ", name).strip()
    return text[:1].upper() + text[1:] if text else name


def _choice_label(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else json.dumps(value)


def _number_attrs(schema: Mapping[str, Any], integer: bool) -> tuple[dict[str, str], list[str]]:
    attrs: dict[str, str] = {"step": "1" if integer else "any"}
    hints: list[str] = []

    def num(value: Any) -> str:
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)

    if isinstance(schema.get("minimum"), int | float):
        attrs["min"] = num(schema["minimum"])
    if isinstance(schema.get("maximum"), int | float):
        attrs["max"] = num(schema["maximum"])
    low, high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(low, int | float) and not isinstance(low, bool):
        if integer and float(low).is_integer():
            attrs["min"] = num(int(low) + 1)
        else:
            attrs["min"] = num(low)
            hints.append(f"more than {num(low)}")
    if isinstance(high, int | float) and not isinstance(high, bool):
        if integer and float(high).is_integer():
            attrs["max"] = num(int(high) - 1)
        else:
            attrs["max"] = num(high)
            hints.append(f"less than {num(high)}")
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        attrs["step"] = num(step)
    if "min" in attrs and "max" in attrs:
        hints.insert(0, f"from {attrs['min']} to {attrs['max']}")
    elif "min" in attrs and not hints:
        hints.append(f"at least {attrs['min']}")
    elif "max" in attrs and not hints:
        hints.append(f"at most {attrs['max']}")
    return attrs, hints


def _text_attrs(schema: Mapping[str, Any]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for key, attr in (("minLength", "minlength"), ("maxLength", "maxlength")):
        if isinstance(schema.get(key), int):
            attrs[attr] = str(schema[key])
    # No ``pattern`` attribute: JSON Schema patterns search, HTML ones must match
    # the whole value, so the browser would refuse good answers. The server checks.
    return attrs


class _Builder:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.schema = _Schema(root)

    def field(
        self,
        raw: Any,
        *,
        name: str,
        path: tuple[str, ...],
        label: str,
        required: bool,
        depth: int,
    ) -> Field:
        node = self.schema.resolve(raw)
        made = Field(name=name, path=path, label=node.get("title") or label, kind="json")
        made.required = required
        made.help = node.get("description") if isinstance(node.get("description"), str) else None
        if "default" in node:
            made.has_default, made.default = True, node["default"]
        node = self._unwrap_null(node, made)
        self._shape(node, made, depth)
        return made

    def _unwrap_null(self, node: dict[str, Any], made: Field) -> dict[str, Any]:
        """``X | None`` is the field of ``X``, an empty value meaning null."""
        options = node.get("anyOf") or node.get("oneOf")
        if isinstance(options, list):
            resolved = [self.schema.resolve(option) for option in options]
            others = [option for option in resolved if not _is_null(option)]
            if len(others) < len(resolved):
                made.nullable = True
                if len(others) == 1:
                    keep = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
                    return {**others[0], **keep}
                return {**node, "anyOf": others}
        kinds = node.get("type")
        if isinstance(kinds, list) and "null" in kinds:
            made.nullable = True
            rest = [kind for kind in kinds if kind != "null"]
            return {**node, "type": rest[0] if len(rest) == 1 else rest}
        return node

    def _shape(self, node: dict[str, Any], made: Field, depth: int) -> None:
        choices = self._choices(node)
        kind = node.get("type")
        if choices is not None:
            made.kind = "choice"
            made.choices = [Choice(json.dumps(value), _choice_label(value)) for value in choices]
            made.widget = (
                "radio" if len(choices) <= _RADIO_LIMIT and not made.nullable else "select"
            )
        elif kind == "boolean":
            if made.nullable:
                made.kind, made.widget = "choice", "select"
                made.choices = [Choice("true", "yes"), Choice("false", "no")]
            else:
                made.kind = "checkbox"
        elif kind in ("integer", "number"):
            made.kind, made.input_type = "number", "number"
            made.integer = kind == "integer"
            made.attrs, hints = _number_attrs(node, made.integer)
            if hints:
                made.help = "; ".join(filter(None, [made.help, ", ".join(hints)]))
        elif kind == "string":
            made.attrs = _text_attrs(node)
            fmt = node.get("format")
            made.input_type = _FORMATS.get(fmt, "text") if isinstance(fmt, str) else "text"
            long = int(made.attrs.get("maxlength", "0")) > _LONG_TEXT
            made.kind = "textarea" if long and made.input_type == "text" else "text"
            if fmt == "date-time":
                made.help = "; ".join(filter(None, [made.help, "a date and time"]))
        elif kind == "array":
            self._array(node, made)
        elif kind == "object" or "properties" in node:
            properties = node.get("properties")
            if isinstance(properties, Mapping) and properties and depth < _MAX_DEPTH:
                made.kind = "group"
                made.children = self.properties(node, made.name, made.path, depth + 1)
        if made.kind == "json":
            made.help = "; ".join(filter(None, [made.help, "JSON"]))

    def _choices(self, node: Mapping[str, Any]) -> list[Any] | None:
        if isinstance(node.get("enum"), list) and node["enum"]:
            return list(node["enum"])
        if "const" in node:
            return [node["const"]]
        options = node.get("anyOf") or node.get("oneOf")
        if isinstance(options, list) and options:
            return _consts([self.schema.resolve(option) for option in options])
        return None

    def _array(self, node: Mapping[str, Any], made: Field) -> None:
        items = self.schema.resolve(node.get("items"))
        if "prefixItems" in node or not items:
            return  # tuples and untyped lists: JSON
        choices = self._choices(items)
        if choices is not None:
            made.kind = "multichoice"
            made.choices = [Choice(json.dumps(value), _choice_label(value)) for value in choices]
            return
        item_kind = items.get("type")
        if item_kind in ("string", "integer", "number") and not items.get("format"):
            made.kind = "lines"
            made.integer = item_kind == "integer"
            made.input_type = "text" if item_kind == "string" else "number"
            made.help = "; ".join(filter(None, [made.help, "one per line"]))

    def properties(
        self, node: Mapping[str, Any], prefix: str, path: tuple[str, ...], depth: int
    ) -> list[Field]:
        listed = node.get("required")
        required: list[Any] = listed if isinstance(listed, list) else []
        fields = []
        for key, sub in node["properties"].items():
            fields.append(
                self.field(
                    sub,
                    name=f"{prefix}.{key}" if prefix else str(key),
                    path=(*path, str(key)),
                    label=_humanize(str(key)),
                    required=key in required,
                    depth=depth,
                )
            )
        return fields


def build_form(schema: Mapping[str, Any] | None) -> Form:
    """The form for answers to ``schema`` (None: any JSON)."""
    if not schema:
        answer = Field(name="answer", path=(), label="Answer", kind="json", required=False)
        answer.help = "JSON; empty means null"
        return _with_ids(Form([answer], "single"))
    builder = _Builder(schema)
    root = builder.schema.resolve(schema)
    properties = root.get("properties")
    if root.get("type") == "object" and isinstance(properties, Mapping) and properties:
        return _with_ids(Form(builder.properties(root, "", (), 1), "object"))
    single = builder.field(
        schema,
        name="value",
        path=(),
        label=_humanize(str(root.get("title") or "answer")),
        required=True,
        depth=1,
    )
    return _with_ids(Form([single], "single"))


def _with_ids(form: Form) -> Form:
    seen: set[str] = set()
    for made in form.walk():
        base = "f-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", made.name).strip("-") or "answer")
        candidate, n = base, 1
        while candidate in seen:
            n += 1
            candidate = f"{base}-{n}"
        seen.add(candidate)
        made.id = candidate
    return form
