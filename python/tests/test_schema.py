"""Args schemas derived from type hints, and what `@task` declares."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

import pytest

from offload import worker
from offload._schema import args_schema, type_schema


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch):
    monkeypatch.setattr(worker, "_registry", {})


@pytest.mark.parametrize(("hint", "schema"), [
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (str, {"type": "string"}),
    (bool, {"type": "boolean"}),
    (list, {"type": "array"}),
    (dict, {"type": "object"}),
    (Any, {}),
    (list[int], {"type": "array", "items": {"type": "integer"}}),
    (List[str], {"type": "array", "items": {"type": "string"}}),
    (tuple[float, ...], {"type": "array", "items": {"type": "number"}}),
    (list[list[bool]], {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}}),
    (dict[str, float], {"type": "object", "additionalProperties": {"type": "number"}}),
    (Dict[str, Any], {"type": "object"}),
    (Optional[int], {"type": ["integer", "null"]}),
    (Optional[list[int]], {"type": ["array", "null"], "items": {"type": "integer"}}),
    (Union[int, str], {"type": ["integer", "string"]}),
    (Union[list[int], dict, None],
     {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "object"},
                {"type": "null"}]}),
    (Literal["f64", "f32"], {"enum": ["f64", "f32"]}),
])
def test_type_schema(hint, schema):
    assert type_schema(hint) == schema


def test_pep_604_unions_where_python_has_them():
    if not hasattr(__import__("types"), "UnionType"):
        pytest.skip("int | None is Python 3.10 and later")
    assert type_schema(eval("int | None")) == {"type": ["integer", "null"]}


@pytest.mark.parametrize("hint", [set, tuple[int, str], dict[int, str], complex, bytes])
def test_types_without_a_json_form_are_refused(hint):
    with pytest.raises(TypeError):
        type_schema(hint)


def test_defaults_are_optional_and_shown():
    def f(n: int, label: str = "x", limit: Optional[int] = None, flags: list = [],  # noqa: B006
          anything=None):
        pass

    assert args_schema(f) == {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "label": {"type": "string", "default": "x"},
            "limit": {"type": ["integer", "null"], "default": None},
            "flags": {"type": "array", "default": []},
            "anything": {"default": None},
        },
        "required": ["n"],
        "additionalProperties": False,
    }


def test_kwargs_allow_other_properties():
    def f(n: int, **rest: Any):
        pass

    assert args_schema(f)["additionalProperties"] is True


def test_blob_args_are_strings_whatever_their_hint():
    def f(data: memoryview, dtype: str = "f64"):
        pass

    schema = args_schema(f, ["data"])
    assert schema["properties"]["data"] == {"type": "string"}
    assert schema["required"] == ["data"]
    with pytest.raises(TypeError, match="not parameters"):
        args_schema(f, ["missing"])


def test_a_parameter_that_cannot_be_named_is_refused():
    def f(n: int, /):
        pass

    with pytest.raises(TypeError, match="by name"):
        args_schema(f)


def test_task_declares_name_kind_description_and_schema():
    @worker.task
    def count_words(text: str, lower: bool = True) -> dict:
        """Count the words in text.

        Details that stay out of the description.
        """
        return {}

    @worker.task(name="fetch", version="2", description="Fetch a URL")
    async def fetch_url(url: str) -> dict:
        return {}

    tasks = worker.registered()
    assert tasks["count_words"].declaration() == {
        "name": "count_words", "kind": "cpu", "version": "1",
        "description": "Count the words in text.",
        "args_schema": {"type": "object",
                        "properties": {"text": {"type": "string"},
                                       "lower": {"type": "boolean", "default": True}},
                        "required": ["text"], "additionalProperties": False},
        "blob_args": [],
    }
    fetch = tasks["fetch"].declaration()
    assert (fetch["kind"], fetch["version"], fetch["description"]) == ("io", "2", "Fetch a URL")
    assert count_words("a b") == {}  # the function itself is unchanged


def test_schema_override_is_declared_as_given():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10}}}

    @worker.task(schema=schema)
    def bounded(n):
        return n

    assert worker.registered()["bounded"].args_schema == schema


def test_task_refuses_bad_names_kinds_and_duplicates():
    with pytest.raises(ValueError, match="name"):
        worker.task(name="Bad-Name")(lambda: None)
    with pytest.raises(TypeError, match="async def"):
        @worker.task(kind="io")
        def not_async():
            pass
    with pytest.raises(TypeError, match="plain def"):
        @worker.task(kind="cpu")
        async def not_plain():
            pass

    @worker.task
    def twice():
        pass

    with pytest.raises(ValueError, match="already registered"):
        worker.task(twice)


def test_progress_outside_a_task_is_an_error():
    with pytest.raises(RuntimeError, match="inside a task"):
        worker.progress(0.5)
