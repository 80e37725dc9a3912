"""OpenAI's embeddings API (`/v1/embeddings`) over the shared request path: the `embed` stage of
a pooling role ends the chain and answers once per input."""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.surface import Surface
from dynvllm_plugins.roles.embed import EMBED

_json = msgspec.json.Encoder().encode


def answer(body: dict[str, Any], headers: dict[str, str]) -> Response:
    """A JSON body of vectors or scores: msgspec writes the same bytes as Starlette's json.dumps
    (shortest round-trip floats), about 12x faster for a 128-float vector."""
    return Response(_json(body), media_type="application/json", headers=headers)


class EmbeddingRequest(BaseModel):
    """OpenAI's fields and vLLM's `add_special_tokens`; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # the caller's end-user id: it changes nothing about the answer
    add_special_tokens: bool = True

    def inputs(self) -> list[str | list[int]]:
        return bodies.batch(self.input)


def parse(raw: bytes) -> EmbeddingRequest:
    req = bodies.parse_strict(EmbeddingRequest, raw)
    if not req.inputs() or any(isinstance(i, str | list) and len(i) == 0 for i in req.inputs()):
        raise RequestError(400, "input must not be empty", param="input")
    return req


def encode(vector: list[float], fmt: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or little-endian float32 bytes in base64."""
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class EmbeddingsSurface(Surface):
    description = "OpenAI's embeddings API (/v1/embeddings), served by pooling roles (embed)"

    def __init__(self, path: Any, settings: Any) -> None:
        super().__init__(path, settings)

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        model = "?"
        try:
            req = parse(await bodies.read(request, self.max_body))
            model = req.model

            def prompts(entry: ModelEntry) -> list[list[int]]:
                tok = entry.tokenizer
                assert tok is not None
                return [
                    tok.encode(i, add_special_tokens=req.add_special_tokens)
                    if isinstance(i, str)
                    else list(i)
                    for i in req.inputs()
                ]

            r = await self.path.admit_call("embeddings", model, prompts, EMBED, request.headers)
        except RequestError as exc:
            self.path.refused(model, exc)
            return self.error_response(exc)
        answers = await self.path.complete(r, lambda: self.path.call_all(r, {"dimensions": req.dimensions}))
        if isinstance(answers, RequestError):
            return self.error_response(answers)
        data = [
            {"object": "embedding", "index": i, "embedding": encode(a["data"], req.encoding_format)}
            for i, a in enumerate(answers)
        ]
        tokens = sum(int(a.get("prompt_tokens") or 0) for a in answers)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return answer({"object": "list", "data": data, "model": r.model, "usage": usage}, r.headers())
