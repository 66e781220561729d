"""``expects`` as text: any type pydantic's ``TypeAdapter`` takes, written down so
another process (the one that resumes, or the worker) rebuilds the same type.

A named type is its import path, ``module:QualName``. A type expression is
written with those paths as its leaves::

    shop.models:Approval
    builtins:list[builtins:int]
    builtins:dict[builtins:str, shop.models:Item]
    typing:Union[builtins:int, None]
    typing:Literal["yes", "no"]
    typing:Annotated[builtins:int, annotated_types:Gt({"gt": 0})]

:func:`spec_of` writes a type down and proves the text faithful by reading it
back (:func:`type_of`) and comparing the two (equal, or the same JSON Schema).
A type it cannot write faithfully — a class defined inside a function, an
``Annotated`` marker it cannot rebuild — is refused with
``ImproperlyConfigured`` naming the fix, when the pause is raised: never at
the first answer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import types
import typing
from typing import Any

from pydantic import TypeAdapter
from pydantic.fields import FieldInfo

from .exceptions import ImproperlyConfigured

__all__ = ["adapter_for", "schema_of", "spec_of", "type_of"]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:")


class _Unfaithful(Exception):
    """This part of the type cannot be written down and read back."""


def spec_of(expects: Any) -> str:
    """The text of ``expects``; ``ImproperlyConfigured`` if it cannot be read back faithfully."""
    try:
        return _spec_cached(expects)
    except TypeError:  # unhashable (an Annotated marker without __hash__)
        return _spec(expects)


@functools.lru_cache(maxsize=256)
def _spec_cached(expects: Any) -> str:
    return _spec(expects)


def _spec(expects: Any) -> str:
    try:
        TypeAdapter(expects)
    except Exception as exc:
        raise ImproperlyConfigured(
            f"Pause(expects={expects!r}): pydantic cannot validate against it ({exc}); "
            "give a pydantic model, a dataclass, a TypedDict or a type such as list[int]"
        ) from exc
    try:
        text = _write(expects)
        rebuilt = type_of(text)
    except (_Unfaithful, ImproperlyConfigured) as exc:
        raise ImproperlyConfigured(
            f"Pause(expects={expects!r}): {exc}. The process that resumes the run rebuilds "
            "expects from its import path: define the type (or a pydantic model wrapping it) "
            "at module level"
        ) from None
    if not _same(expects, rebuilt):
        raise ImproperlyConfigured(
            f"Pause(expects={expects!r}): written as {text!r} it reads back as {rebuilt!r}, "
            "which validates differently; define a pydantic model at module level instead"
        )
    return text


def _same(a: Any, b: Any) -> bool:
    try:
        if a == b:
            return True
    except Exception:
        pass
    try:
        return bool(TypeAdapter(a).json_schema() == TypeAdapter(b).json_schema())
    except Exception:
        return False


def _path(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname:
        raise _Unfaithful(f"{obj!r} has no import path")
    if "<locals>" in qualname:
        raise _Unfaithful(f"{qualname} is defined inside a function, so it cannot be imported")
    path = f"{module}:{qualname}"
    try:
        found = _import(path)
    except ImproperlyConfigured:
        raise _Unfaithful(f"{path} cannot be imported") from None
    if found is not obj:
        raise _Unfaithful(f"{path} imports as another object")
    return path


def _write(tp: Any) -> str:
    if tp is None or tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    generic = getattr(tp, "__pydantic_generic_metadata__", None)
    if origin is None and generic and generic.get("origin") is not None:
        origin, args = generic["origin"], tuple(generic["args"])  # a pydantic generic model
    if origin is None:
        return _path(tp)
    if origin is typing.Literal:
        return "typing:Literal[" + ", ".join(_literal(a) for a in args) + "]"
    if origin is typing.Union or origin is types.UnionType:
        return "typing:Union[" + ", ".join(_write(a) for a in args) + "]"
    if origin is typing.Annotated:
        marks = [_mark(m) for m in tp.__metadata__]
        return "typing:Annotated[" + ", ".join([_write(args[0]), *marks]) + "]"
    if not args:
        return _path(origin)
    return _path(origin) + "[" + ", ".join(_write(a) for a in args) + "]"


def _literal(value: Any) -> str:
    if isinstance(value, bool | int | str) or value is None:
        return json.dumps(value)
    raise _Unfaithful(f"the Literal value {value!r} is not a string, number, boolean or None")


def _mark(mark: Any) -> str:
    """An ``Annotated`` marker: a dataclass (annotated_types) or pydantic's ``Field``."""
    if isinstance(mark, FieldInfo):
        kwargs = dict(mark._attributes_set)
        kwargs.pop("annotation", None)
        others = []
        for inner in mark.metadata:
            if type(inner).__name__ == "_PydanticGeneralMetadata":
                kwargs.update(vars(inner))  # Field(pattern=...) and the like make these
            else:
                others.append(_mark(inner))
        return ", ".join([f"pydantic:Field({_kwargs(kwargs)})", *others])
    if dataclasses.is_dataclass(mark) and not isinstance(mark, type):
        kwargs = {f.name: getattr(mark, f.name) for f in dataclasses.fields(mark)}
        return f"{_path(type(mark))}({_kwargs(kwargs)})"
    raise _Unfaithful(f"the Annotated marker {mark!r} cannot be written down")


def _kwargs(kwargs: dict[str, Any]) -> str:
    try:
        return json.dumps(kwargs, sort_keys=True)
    except (TypeError, ValueError):
        raise _Unfaithful(f"the marker arguments {kwargs!r} are not JSON") from None


@functools.lru_cache(maxsize=256)
def type_of(spec: str) -> Any:
    """Rebuild the type written by :func:`spec_of` (or a plain ``module:QualName``)."""
    parser = _Parser(spec)
    tp = parser.type()
    parser.end()
    return tp


@functools.lru_cache(maxsize=256)
def adapter_for(spec: str) -> TypeAdapter[Any]:
    return TypeAdapter(type_of(spec))


@functools.lru_cache(maxsize=256)
def schema_of(spec: str) -> dict[str, Any] | None:
    """The JSON Schema of the type (validation mode), or None if pydantic has none for it."""
    try:
        return adapter_for(spec).json_schema()
    except Exception:
        return None


def _import(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"cannot import the resume input type {path!r}: {exc}. Import the module that "
            "defines it where resume() is called"
        ) from exc
    return obj


class _Parser:
    """Reads the text :func:`_write` writes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _fail(self, what: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(
            f"malformed expects {self.text!r} at character {self.pos}: {what}"
        )

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def _peek(self, token: str) -> bool:
        self._skip()
        return self.text.startswith(token, self.pos)

    def _take(self, token: str) -> None:
        if not self._peek(token):
            raise self._fail(f"expected {token!r}")
        self.pos += len(token)

    def end(self) -> None:
        self._skip()
        if self.pos != len(self.text):
            raise self._fail("unexpected text")

    def _name(self) -> str:
        self._skip()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _NAME_CHARS:
            self.pos += 1
        if start == self.pos:
            raise self._fail("expected a name")
        return self.text[start : self.pos]

    def _json(self) -> Any:
        self._skip()
        try:
            value, self.pos = json.JSONDecoder().raw_decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            raise self._fail(f"bad JSON ({exc.msg})") from None
        return value

    def _list(self, item: Any) -> list[Any]:
        self._take("[")
        items = [item()]
        while self._peek(","):
            self._take(",")
            items.append(item())
        self._take("]")
        return items

    def type(self) -> Any:
        if self._peek("None"):
            self.pos += len("None")
            return None
        if self._peek("..."):
            self.pos += 3
            return Ellipsis
        name = self._name()
        if name == "typing:Literal":
            return typing.Literal.__getitem__(tuple(self._list(self._json)))
        if name == "typing:Union":
            return typing.Union.__getitem__(tuple(self._list(self.type)))
        if name == "typing:Annotated":
            self._take("[")
            base = self.type()
            marks: list[Any] = []
            while self._peek(","):
                self._take(",")
                marks.append(self._mark())
            self._take("]")
            return typing.Annotated.__class_getitem__((base, *marks))  # type: ignore[attr-defined]
        obj = _import(name)
        if self._peek("["):
            args = self._list(self.type)
            return obj[tuple(args) if len(args) > 1 else args[0]]
        return obj

    def _mark(self) -> Any:
        name = self._name()
        self._take("(")
        kwargs = self._json()
        self._take(")")
        if not isinstance(kwargs, dict):
            raise self._fail("marker arguments must be a JSON object")
        maker = _import(name)
        return maker(**kwargs)
