"""JSON Schemas for a task's arguments, derived from its function's signature and type hints.

The server validates every submit against the schema a task program declares (its validator
supports `type`, `enum`, `properties`, `required`, `additionalProperties`, `items` and `anyOf`,
among others), so the schema is the first line of defence for a task's arguments.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import types
import typing
from typing import Any, Callable

_SCALARS: dict[Any, dict[str, Any]] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    type(None): {"type": "null"},
}

_UnionType = getattr(types, "UnionType", None)  # `int | None`, Python 3.10 and later


def args_schema(fn: Callable[..., Any], blob_args: typing.Iterable[str] = ()) -> dict[str, Any]:
    """The JSON Schema of the object of keyword arguments `fn` accepts.

    Parameters without a default are required; `**kwargs` allows other properties, which are
    refused otherwise. A blob argument is a string (the blob's id), whatever its annotation.
    Raises TypeError for a parameter that cannot be passed by name, or a hint with no JSON
    form (pass `schema=` to `task` then).
    """
    blob_args = set(blob_args)
    signature = inspect.signature(fn)
    missing = blob_args - signature.parameters.keys()
    if missing:
        raise TypeError(f"{fn.__qualname__}: blob args {sorted(missing)} are not parameters")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # a forward reference that does not resolve
        raise TypeError(f"{fn.__qualname__}: cannot read its type hints ({e})") from e
    properties: dict[str, Any] = {}
    required: list[str] = []
    open_ended = False
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            open_ended = True
            continue
        if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
            raise TypeError(
                f"{fn.__qualname__}: parameter {name!r} cannot be passed by name; "
                "a task takes its args as keywords"
            )
        if name in blob_args:
            schema: dict[str, Any] = {"type": "string"}
        elif name in hints:
            try:
                schema = type_schema(hints[name])
            except TypeError as e:
                raise TypeError(
                    f"{fn.__qualname__}: parameter {name!r}: {e}; pass schema= to task()"
                ) from None
        else:
            schema = {}
        if param.default is param.empty:
            required.append(name)
        elif _is_json(param.default):
            schema = {**schema, "default": param.default}
        properties[name] = schema
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        result["required"] = required
    result["additionalProperties"] = open_ended
    return result


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of one type hint: scalars, lists, dicts, Optional, Union and Literal."""
    if hint is Any or hint is object or hint is inspect.Parameter.empty:
        return {}
    if hint is None:
        return {"type": "null"}
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    origin = typing.get_origin(hint)
    params = typing.get_args(hint)
    if origin is typing.Union or (_UnionType is not None and origin is _UnionType):
        return _union([type_schema(p) for p in params])
    if origin is typing.Literal:
        return {"enum": list(params)}
    if hint in (list, tuple, collections.abc.Sequence) or origin in (
        list,
        collections.abc.Sequence,
    ):
        return _array(params[0] if params else Any)
    if origin is tuple:
        if len(params) == 2 and params[1] is Ellipsis:
            return _array(params[0])
        raise TypeError(f"no JSON Schema for the fixed-length tuple {hint!r}")
    if hint is dict or origin in (dict, collections.abc.Mapping) or hint is collections.abc.Mapping:
        schema: dict[str, Any] = {"type": "object"}
        if params:
            if params[0] is not str:
                raise TypeError(f"JSON object keys are strings, not {params[0]!r}")
            value = type_schema(params[1])
            if value:
                schema["additionalProperties"] = value
        return schema
    raise TypeError(f"no JSON Schema for the type {hint!r}")


def _array(item: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array"}
    items = type_schema(item)
    if items:
        schema["items"] = items
    return schema


def _union(options: list[dict[str, Any]]) -> dict[str, Any]:
    if any(not o for o in options):
        return {}  # Union[..., Any] accepts anything
    # Optional[int] reads better as {"type": ["integer", "null"]}: the server's 422 then says
    # "must be an integer or null" rather than "matches none of the options".
    if all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
        return {"type": [o["type"] for o in options]}
    nullable = {"type": "null"} in options
    rest = [o for o in options if o != {"type": "null"}]
    if nullable and len(rest) == 1 and isinstance(rest[0].get("type"), str):
        return {**rest[0], "type": [rest[0]["type"], "null"]}
    return {"anyOf": options}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
