"""Errors a client caused or must see, in no API's shape: each API surface renders them its way.

`body()` is the shape of routes no surface owns (probes, admin calls, unknown paths): OpenAI's, as
vLLM's own server answers there.
"""

from __future__ import annotations

from dynvllm.runtime.errors import BadRequest, InstanceLost, RemoteError


class RequestError(Exception):
    """An error with its HTTP status, a kind (OpenAI's error `type` names), a parameter and a code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        #: Response headers the error needs (Retry-After on a 429 or 503); every surface sends them.
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_remote(exc: RemoteError) -> RequestError:
    """What a worker's failure means to the client."""
    if isinstance(exc, BadRequest):
        return RequestError(400, exc.message)
    if isinstance(exc, InstanceLost):
        return RequestError(503, f"no worker could serve the request: {exc.message}", "service_unavailable")
    return RequestError(500, f"worker error ({exc.kind}): {exc.message}", "internal_error")
