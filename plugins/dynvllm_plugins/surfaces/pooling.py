"""vLLM's pooling APIs over the shared request path, served by pooling roles (embed): `/pooling`,
`/score` (`/v1/score`), `/rerank` (`/v1/rerank`, `/v2/rerank`) and `/classify`.

An embedding model scores as vLLM scores one (a bi-encoder): queries and documents are embedded
one by one and each pair's score is the cosine of its two vectors. A sequence-classification model
with one label is a cross-encoder, as in vLLM: each (query, document) pair is one prompt (the
tokenizer's pair encoding, or the service's --chat-template rendered as a score template) run
with the classify task, whose one output (a sigmoid probability) is the pair's score.
`/classify` answers for a sequence-classification model (the embed role runs it with vLLM's
classify task; its workers' cards list the pooling tasks, the labels and, for one label, how
pairs are prompted); for any other model it is refused with vLLM's words."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.request_path import Admitted, RequestPath
from dynvllm.frontend.surface import Surface
from dynvllm.frontend.tokenizer import Tokenizer, read_chat_template
from dynvllm_plugins.roles.embed import CLASSIFY, EMBED
from dynvllm_plugins.surfaces import pooling_schema as ps
from dynvllm_plugins.surfaces.embeddings import answer, encode

if TYPE_CHECKING:
    from dynvllm.settings import Settings

#: The pooling task of the embed role's engines (vLLM's `--convert embed`).
TASK = "embed"


class PoolingSurface(Surface):
    description = (
        "vLLM's pooling APIs (/pooling, /score, /rerank, /classify), served by pooling roles (embed)"
    )

    def __init__(self, path: RequestPath, settings: Settings) -> None:
        super().__init__(path, settings)
        # vLLM's server prompts a cross-encoder's pairs with its --chat-template when it has one.
        given = self.frontend.chat_template
        self.score_template = read_chat_template(given) if given else None

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
        return _tasks_of(await self.path.entry(model))

    async def _embedding_model(self, model: str) -> None:
        if TASK not in await self._tasks(model):
            raise RequestError(
                400,
                f"model {model!r} is a classification model: it answers /classify (and /score and "
                "/rerank when it has one label); embeddings and /pooling need an embedding model",
                param="model",
            )

    async def _scorer(self, model: str) -> dict[str, Any] | None:
        """How the model scores: None for an embedding model (a bi-encoder), else its workers'
        cross-encoder card (a one-label classifier, as vLLM enables scoring for classifiers)."""
        entry = await self.path.entry(model)
        tasks = _tasks_of(entry)
        if TASK in tasks:
            return None
        if CLASSIFY not in tasks:
            raise RequestError(
                400,
                f"model {model!r} serves the pooling tasks {sorted(tasks)}: /score and /rerank need "
                "an embedding model or a cross-encoder (a classifier with one label); late "
                "interaction (token_embed) is not served",
                param="model",
            )
        cross = entry.card.get("cross_encoder")
        if not isinstance(cross, dict):
            labels = len(entry.card.get("labels") or {})
            raise RequestError(
                400,
                f"model {model!r} is a classification model with {labels} labels: it answers "
                "/classify; /score and /rerank need an embedding model or a cross-encoder (a "
                "classifier with one label, as vLLM's server scores with)",
                param="model",
            )
        if cross.get("unserved"):
            raise RequestError(
                400,
                f"model {model!r} is a cross-encoder whose pair prompts need {cross['unserved']}: "
                "scoring with it is not served",
                param="model",
            )
        return cross

    async def _run(
        self,
        request: Request,
        model: str,
        encode: Callable[[Tokenizer], list[list[int]]],
        options: dict,
        task: str | None = None,
    ) -> tuple[Admitted, list[dict]] | RequestError:
        """Pool each prompt `encode` makes with the model's tokenizer on the embed stage (for
        `task`, else the stage's own): (the admitted request, each prompt's answer)."""

        def prompts(entry: ModelEntry) -> list[list[int]]:
            assert entry.tokenizer is not None
            return encode(entry.tokenizer)

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
    def _texts(texts: list[str | list[int]], add_special: bool) -> Callable[[Tokenizer], list[list[int]]]:
        """Each input's ids: a text tokenized (with the special tokens or not), ids as given."""
        return lambda tok: [
            tok.encode(t, add_special_tokens=add_special) if isinstance(t, str) else list(t) for t in texts
        ]

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
        done = await self._run(
            request, model, self._texts(req.inputs(), req.add_special_tokens), self._options(req)
        )
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
        cross = await self._scorer(model)
        if isinstance(req, ps.RerankRequest):
            left, right = [req.query], ps.as_list(req.documents)
        else:
            left, right = req.sides()
        ps.check_pairs(left, right)
        template = self.score_template if cross is not None else None
        if template is None and (asked := req.template_fields()):
            name = asked[0]
            raise RequestError(
                400,
                f"{name}: reaches only a cross-encoder's score template (the service's "
                "--chat-template); this request has none",
                param=name,
            )
        kwargs = req.template_kwargs() if template is not None else {}
        if cross is None:
            # vLLM tokenizes each side with the model's special tokens (add_special_tokens=True).
            done = await self._run(request, model, self._texts([*left, *right], True), self._options(req))
        else:
            pairs, sep = ps.pairs(left, right), bool(cross.get("sep", True))
            done = await self._run(
                request,
                model,
                lambda tok: [ps.cross_encoder_prompt(tok, q, d, sep, template, kwargs) for q, d in pairs],
                self._options(req),
                CLASSIFY,
            )
        if isinstance(done, RequestError):
            return done
        r, answers = done
        outputs = [a["data"] for a in answers]
        scores = ps.pair_scores(outputs, len(left)) if cross is None else ps.cross_scores(outputs)
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
            request, model, self._texts(req.inputs(), req.add_special_tokens), self._options(req), CLASSIFY
        )
        if isinstance(done, RequestError):
            return done
        r, answers = done
        rid = ps.response_id("classify", req.request_id, request.headers.get("x-request-id"))
        labels = entry.card.get("labels") or {}
        body = ps.classify_body(rid, r.model, [a["data"] for a in answers], labels, self._tokens(answers))
        return answer(body, r.headers())


def _tasks_of(entry: ModelEntry) -> list[str]:
    """The pooling tasks the model's workers serve (embed where a card does not say)."""
    return list(entry.card.get("pooling_tasks") or [TASK])
