"""Request bodies: JSON objects checked before any API surface reads them, and pydantic's errors
as 400s that name the field."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from dynvllm.frontend.errors import RequestError

M = TypeVar("M", bound=BaseModel)

if TYPE_CHECKING:
    from typing_extensions import TypeIs


def from_validation(err: ValidationError) -> RequestError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5]]
    return RequestError(400, "; ".join(parts), param=param)


def token_ids(value: list[Any]) -> TypeIs[list[int]]:
    """Whether a prompt given as a list is one prompt's token ids, not a batch (of texts or of
    token lists)."""
    return all(isinstance(t, int) for t in value)


def batch(x: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One input or a batch of them, as a list of inputs: texts or token-id lists."""
    if isinstance(x, str):
        return [x]
    if not x:
        return []
    if token_ids(x):
        return [x]
    return list(x)


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or the 400 that says why it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object")
    if b"\\ud" in raw or b"\\uD" in raw:  # only escapes can smuggle in a lone surrogate
        _no_lone_surrogates(data)
    return data


def _no_lone_surrogates(value: Any) -> None:
    """JSON allows escaped lone surrogates (\\ud800) that are not text: refuse them up front."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    400, "request body has a string with an unpaired surrogate escape"
                ) from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


async def read(request: Any, limit: int) -> bytes:
    """A request's body, refused with a 413 past `limit` bytes (`--max-request-bytes`)."""
    body = await request.body()
    if len(body) > limit:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {limit}")
    return body


def parse_strict(model: type[M], raw: bytes) -> M:
    """A request model (one with `extra="forbid"`) from a body: a field the API defines but this
    server does not implement is refused by name, other mistakes as pydantic reports them.

    A body pydantic reads straight from its bytes (one pass instead of `json.loads` and then the
    dict) is taken so; any failure, and any body with escapes that may be lone surrogates, goes
    the long way, so errors read as `json_object` and `validate_strict` word them."""
    if b"\\ud" not in raw and b"\\uD" not in raw:
        try:
            return model.model_validate_json(raw)
        except ValidationError:
            pass
    return validate_strict(model, json_object(raw))


def validate_strict(model: type[M], data: dict) -> M:
    """`parse_strict` for a body already read as a JSON object."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            field = ".".join(str(p) for p in first["loc"])
            raise RequestError(400, f"{field}: this field is not supported", param=field) from None
        raise from_validation(err) from None
