"""Structured outputs: what a request constrains its output to, as the wire's `structured_outputs`
map (json, regex, choice, grammar, json_object) that workers hand to vLLM's structured-output
sampling. Pure logic: `response_format`, vLLM's `structured_outputs` and legacy `guided_*`
fields, and forced tool calls (tool_choice `required` or a named function), which constrain
decoding to a valid call so they work with any model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ConstraintError(ValueError):
    """The request's constraint is contradictory or invalid; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Whitespace options are engine-wide in vLLM (--structured-outputs-config); per request they
    # would be ignored, so they are not accepted here (extra="forbid" names them in the 400).


class Function(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


def check_schema(schema: Any, param: str) -> None:
    """A JSON schema that jsonschema cannot read is the client's error, named before decoding."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ConstraintError(f"{param} must be a JSON schema object", param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConstraintError(f"{param} is not a valid JSON schema: {exc.message}", param) from None


def _params(fn: Function) -> dict[str, Any]:
    return fn.parameters or {"type": "object", "properties": {}}


def tool_schema(tools: list[Tool], choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    """JSON schema of a forced call: the named function's arguments, or for `required` an array
    of {name, parameters} objects (one item when parallel_tool_calls is false)."""
    if choice in (None, "none", "auto"):
        return None
    if not tools:
        raise ConstraintError("tool_choice needs tools", "tool_choice")
    for t in tools:
        if t.function.parameters is not None:
            check_schema(t.function.parameters, f"tools.{t.function.name}.parameters")
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise ConstraintError(
                f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice"
            )
        return _params(named[0].function)
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _params(t.function),
                    },
                    "required": ["name", "parameters"],
                }
                for t in tools
            ],
        },
    }
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def from_request(req: Any) -> dict[str, Any] | None:
    """The wire constraint for a request, or None. At most one source may constrain it."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf: ResponseFormat | None = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ConstraintError("response_format json_schema needs json_schema.schema", "response_format")
        check_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
        found.append(("response_format", {"json": rf.json_schema.schema_}))
    so: StructuredOutputs | None = req.structured_outputs
    if so is not None:
        kinds = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": so.json_object,
        }
        given = {k: v for k, v in kinds.items() if v is not None}
        if len(given) != 1:
            raise ConstraintError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                "structured_outputs",
            )
        if isinstance(given.get("json"), dict):
            check_schema(given["json"], "structured_outputs.json")
        found.append(("structured_outputs", given))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name, None)
        if value is not None:
            if key == "json" and isinstance(value, dict):
                check_schema(value, name)
            found.append((name, {key: value}))
    tools = getattr(req, "tools", None)
    choice = req.effective_tool_choice() if hasattr(req, "effective_tool_choice") else None
    forced = tool_schema(tools or [], choice, getattr(req, "parallel_tool_calls", None))
    if forced is not None:
        found.append(("tool_choice", {"json": forced}))
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise ConstraintError(f"the request constrains its output twice ({names}); keep one", found[1][0])
    return found[0][1] if found else None
