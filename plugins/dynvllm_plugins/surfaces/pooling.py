"""vLLM's pooling APIs over the shared request path, served by pooling roles (embed): `/pooling`,
`/score` (`/v1/score`), `/rerank` (`/v1/rerank`, `/v2/rerank`) and `/classify`.

An embedding model scores as vLLM scores one (a bi-encoder): queries and documents are embedded
one by one and each pair's score is the cosine of its two vectors. `/classify` answers for a
sequence-classification model (the embed role runs it with vLLM's classify task; its workers'
cards list the pooling tasks and the labels); for any other model it is refused with vLLM's
words."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.request_path import Admitted
from dynvllm.frontend.surface import Surface
from dynvllm_plugins.roles.embed import CLASSIFY, EMBED
from dynvllm_plugins.surfaces import pooling_schema as ps
from dynvllm_plugins.surfaces.embeddings import answer, encode

#: The pooling task of the embed role's engines (vLLM's `--convert embed`).
TASK = "embed"


class PoolingSurface(Surface):
    description = (
        "vLLM's pooling APIs (/pooling, /score, /rerank, /classify), served by pooling roles (embed)"
    )

    def routes(self) -> list[BaseRoute]:
        score, rerank = self.score, self.rerank
        return [
            Route("/pooling", self.pooling, methods=["POST"]),
            Route("/score", score, methods=["POST"]),
            Route("/v1/score", score, methods=["POST"]),
            Route("/rerank", rerank, methods=["POST"]),
            Route("/v1/rerank", rerank, methods=["POST"]),
            Route("/v2/rerank", rerank, methods=["POST"]),
            Route("/classify", self.classify, methods=["POST"]),
        ]

    # ---- shared ----------------------------------------------------------------------------
    def _model(self, name: str | None) -> str:
        """The request's model; vLLM's server lets a request leave it out when one model is served."""
        if name is not None:
            return name
        served = sorted(self.path.models.models)
        if len(served) != 1:
            raise RequestError(
                400, f"model is required: this service serves {served or 'no model'}", param="model"
            )
        return served[0]

    async def _tasks(self, model: str) -> list[str]:
        """The pooling tasks the model's workers serve (embed where a card does not say)."""
        entry = await self.path.entry(model)
        return list(entry.card.get("pooling_tasks") or [TASK])

    async def _embedding_model(self, model: str) -> None:
        if TASK not in await self._tasks(model):
            raise RequestError(
                400,
                f"model {model!r} is a classification model: it answers /classify; embeddings, "
                "/pooling and bi-encoder /score and /rerank need an embedding model (scoring with a "
                "cross-encoder is not served)",
                param="model",
            )

    async def _run(
        self,
        request: Request,
        model: str,
        texts: list[str | list[int]],
        add_special: bool,
        options: dict,
        task: str | None = None,
    ) -> tuple[Admitted, list[dict]] | RequestError:
        """Pool each input on the embed stage (for `task`, else the stage's own): (the admitted
        request, each input's answer)."""

        def prompts(entry: ModelEntry) -> list[list[int]]:
            tok = entry.tokenizer
            assert tok is not None
            return [
                tok.encode(t, add_special_tokens=add_special) if isinstance(t, str) else list(t)
                for t in texts
            ]

        r = await self.path.admit_call("pooling", model, prompts, EMBED, request.headers)
        answers = await self.path.complete(r, lambda: self.path.call_all(r, options, task))
        return answers if isinstance(answers, RequestError) else (r, answers)

    async def _handle(self, request: Request, model_cls: type[BaseModel], serve: Callable) -> Response:
        model = "?"
        try:
            req = bodies.parse_strict(model_cls, await bodies.read(request, self.max_body))
            model = self._model(getattr(req, "model", None))
            out = await serve(request, req, model)
        except RequestError as exc:
            self.path.refused(model, exc)
            return self.error_response(exc)
        return out if isinstance(out, Response) else self.error_response(out)

    @staticmethod
    def _options(req: ps.PoolingBase) -> dict[str, Any]:
        return {"use_activation": req.use_activation} if req.use_activation is not None else {}

    @staticmethod
    def _tokens(answers: list[dict]) -> int:
        return sum(int(a.get("prompt_tokens") or 0) for a in answers)

    # ---- /pooling --------------------------------------------------------------------------
    async def pooling(self, request: Request) -> Response:
        return await self._handle(request, ps.PoolingRequest, self._pooling)

    async def _pooling(self, request: Request, req: ps.PoolingRequest, model: str) -> Response | RequestError:
        if req.dimensions is not None:
            raise RequestError(400, "dimensions is currently not supported", param="dimensions")
        if req.task not in (None, TASK):
            raise RequestError(
                400, f"Unsupported task: {req.task!r}: this model's pooling task is {TASK!r}", param="task"
            )
        await self._embedding_model(model)
        ps.check_inputs(req.inputs())
        done = await self._run(request, model, req.inputs(), req.add_special_tokens, self._options(req))
        if isinstance(done, RequestError):
            return done
        r, answers = done
        body = {
            "id": ps.response_id("pooling", req.request_id, request.headers.get("x-request-id")),
            "object": "list",
            "created": int(time.time()),
            "model": r.model,
            "data": [
                {"index": i, "object": "pooling", "data": encode(a["data"], req.encoding_format)}
                for i, a in enumerate(answers)
            ],
            "usage": ps.usage(self._tokens(answers)),
        }
        return answer(body, r.headers())

    # ---- /score, /rerank -------------------------------------------------------------------
    async def score(self, request: Request) -> Response:
        return await self._handle(request, ps.ScoreRequest, self._score)

    async def rerank(self, request: Request) -> Response:
        return await self._handle(request, ps.RerankRequest, self._score)

    async def _score(
        self, request: Request, req: ps.ScoreRequest | ps.RerankRequest, model: str
    ) -> Response | RequestError:
        ps.check_scoring(req)
        await self._embedding_model(model)
        if isinstance(req, ps.RerankRequest):
            left, right = [req.query], ps.as_list(req.documents)
        else:
            left, right = req.sides()
        ps.check_pairs(left, right)
        # vLLM tokenizes each side with the model's special tokens (add_special_tokens=True).
        done = await self._run(request, model, [*left, *right], True, self._options(req))
        if isinstance(done, RequestError):
            return done
        r, answers = done
        scores = ps.pair_scores([a["data"] for a in answers], len(left))
        rid = ps.response_id("score", req.request_id, request.headers.get("x-request-id"))
        tokens = self._tokens(answers)
        if isinstance(req, ps.RerankRequest):
            body = ps.rerank_body(rid, r.model, right, scores, req.top_n, tokens)
        else:
            body = ps.score_body(rid, r.model, scores, tokens)
        return answer(body, r.headers())

    # ---- /classify -------------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        return await self._handle(request, ps.ClassifyRequest, self._classify)

    async def _classify(
        self, request: Request, req: ps.ClassifyRequest, model: str
    ) -> Response | RequestError:
        entry = await self.path.entry(model)
        if CLASSIFY not in await self._tasks(model):
            return RequestError(
                501,
                f"The model does not support Classification API: {entry.name!r} is served by "
                f"{', '.join(sorted(entry.roles))} workers as an embedding model; /classify needs a "
                "sequence-classification model (a *ForSequenceClassification checkpoint, which "
                "`dynvllm serve embed` runs with vLLM's classify task)",
                "not_implemented",
                param="model",
            )
        ps.check_inputs(req.inputs())
        done = await self._run(
            request, model, req.inputs(), req.add_special_tokens, self._options(req), CLASSIFY
        )
        if isinstance(done, RequestError):
            return done
        r, answers = done
        rid = ps.response_id("classify", req.request_id, request.headers.get("x-request-id"))
        labels = entry.card.get("labels") or {}
        body = ps.classify_body(rid, r.model, [a["data"] for a in answers], labels, self._tokens(answers))
        return answer(body, r.headers())
