"""Request models and answers of vLLM's pooling APIs (`/pooling`, `/score`, `/rerank`,
`/classify`), as vLLM 0.32's server defines them (vllm/entrypoints/pooling/*): pure logic, no I/O.

Fields vLLM defines that dynvllm does not implement are left out of the models, so a request that
sets one is refused by name (`bodies.parse_strict`)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError


class PoolingBase(BaseModel):
    """vLLM's fields common to its pooling requests (PoolingBasicRequestMixin), those served."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    user: str | None = None  # the caller's end-user id: it changes nothing about the answer
    request_id: str | None = None
    use_activation: bool | None = None


class PoolingRequest(PoolingBase):
    """`/pooling` with `input` (vLLM's PoolingCompletionRequest)."""

    input: str | list[str] | list[int] | list[list[int]]
    task: str | None = None
    add_special_tokens: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    # vLLM's pooling server refuses it ("dimensions is currently not supported"): same here.
    dimensions: int | None = None

    def inputs(self) -> list[str | list[int]]:
        return bodies.batch(self.input)


class ClassifyRequest(PoolingBase):
    """`/classify` with `input` (vLLM's ClassificationCompletionRequest)."""

    input: str | list[str] | list[int] | list[list[int]]
    add_special_tokens: bool = True

    def inputs(self) -> list[str | list[int]]:
        return bodies.batch(self.input)


class ScoringBase(PoolingBase):
    # vLLM's per-side truncation: only its default (0, none) is served; see `check_scoring`.
    max_tokens_per_query: int = 0
    max_tokens_per_doc: int = 0
    # A cross-encoder's score template arguments (`instruction` is chat_template_kwargs'
    # "instruction" unless those name one): they reach only a template (`template_kwargs`).
    instruction: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """The score template's arguments, as vLLM merges them (reserved names refused)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.instruction is not None:
            kwargs.setdefault("instruction", self.instruction)
        reserved = {"chat_template", "tools", "tokenize"} & kwargs.keys()
        if reserved:
            raise RequestError(
                400,
                "chat_template_kwargs contains reserved keys that conflict with fixed scorer "
                f"arguments: {sorted(reserved)}",
                param="chat_template_kwargs",
            )
        return kwargs

    def template_fields(self) -> list[str]:
        """The template arguments a request sets (an empty `chat_template_kwargs` sets none)."""
        return [f for f in ("instruction", "chat_template_kwargs") if getattr(self, f) not in (None, {})]


class ScoreRequest(ScoringBase):
    """`/score`: one of vLLM's four spellings of the two sides (queries/documents, queries/items,
    data_1/data_2, text_1/text_2)."""

    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None

    def sides(self) -> tuple[list[str], list[str]]:
        for a, b in (
            ("queries", "documents"),
            ("queries", "items"),
            ("data_1", "data_2"),
            ("text_1", "text_2"),
        ):
            one, two = getattr(self, a), getattr(self, b)
            if one is not None and two is not None:
                return as_list(one), as_list(two)
        raise RequestError(
            400,
            "a score request names its two sides as queries/documents, queries/items, data_1/data_2 "
            "or text_1/text_2",
            param="queries",
        )


class RerankRequest(ScoringBase):
    """`/rerank` (Jina's and Cohere's shape, as vLLM serves it)."""

    query: str
    documents: str | list[str]
    top_n: int = Field(0, ge=0)


def check_scoring(req: ScoringBase) -> None:
    for name in ("max_tokens_per_query", "max_tokens_per_doc"):
        if getattr(req, name):
            raise RequestError(400, f"{name}: only 0 (no truncation) is supported", param=name)


def as_list(x: str | list[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def check_inputs(inputs: list[str | list[int]]) -> None:
    if not inputs or any(len(i) == 0 for i in inputs):
        raise RequestError(400, "input must not be empty", param="input")


def check_pairs(left: list[str], right: list[str]) -> None:
    """vLLM's rule for the two sides of a score: 1:1, 1:N or N:N, neither empty."""
    if len(left) > 1 and len(left) != len(right):
        raise RequestError(400, "Input lengths must be either 1:1, 1:N or N:N")
    if not left:
        raise RequestError(400, "At least one text element must be given")
    if not right:
        raise RequestError(400, "At least one text_pair element must be given")


def pairs(left: list[str], right: list[str]) -> list[tuple[str, str]]:
    """The (query, document) pairs of a score: one query stands for all when there is one."""
    return list(zip(left * len(right) if len(left) == 1 else left, right, strict=True))


def cross_encoder_prompt(
    tok: Any,
    query: str,
    document: str,
    sep: bool,
    template: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """A pair's prompt for a cross-encoder as vLLM's server builds it (`get_score_prompt`): with a
    score template (the server's --chat-template), the template's text for the messages
    query and document; else the tokenizer's pair encoding, or, for a language model converted to
    a reranker (`use_sep_token` false), the two texts as one; tokenized with the special tokens."""
    if template is not None:
        text = score_template_text(template, tok.special_tokens, query, document, kwargs or {})
        return list(tok.encode(text, add_special_tokens=True))
    if sep:
        return list(tok.encode_pair(query, document, add_special_tokens=True))
    return list(tok.encode(query + document, add_special_tokens=True))


_RENDER_PARAMS = ("add_generation_prompt", "continue_final_message", "documents")


def score_template_text(
    template: str, special_tokens: dict[str, str], query: str, document: str, kwargs: dict[str, Any]
) -> str:
    """A score template rendered as vLLM renders it (transformers' renderer; the two messages
    as they are, roles query and document, no generation prompt; the arguments the template
    reads)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from dynvllm.frontend import templates

    try:
        chosen = templates.select_kwargs(template, kwargs)
        # transformers' own parameters that shape the rendering; its others never reach a template
        named = {k: chosen.pop(k) for k in _RENDER_PARAMS if k in chosen}
        readable = templates.template_variables(template)
        rendered, _ = render_jinja_template(
            conversations=[[{"role": "query", "content": query}, {"role": "document", "content": document}]],
            chat_template=template,
            **named,
            **{**special_tokens, **{k: v for k, v in chosen.items() if k in readable}},
        )
    except Exception as exc:  # the template's own refusal (raise_exception ...) is the caller's
        raise RequestError(400, f"the score template failed: {exc}") from None
    return str(rendered[0])


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity as torch computes it (each norm clamped by eps 1e-8)."""
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    na = max(math.sqrt(math.fsum(x * x for x in a)), 1e-8)
    nb = max(math.sqrt(math.fsum(y * y for y in b)), 1e-8)
    return dot / (na * nb)


def cross_scores(outputs: list[list[float]]) -> list[float]:
    """A cross-encoder's scores: each pair's one output (vLLM's ScoringOutput of a one-label
    classifier: its probability under the classify task's sigmoid, or its logit without it)."""
    if any(len(o) != 1 for o in outputs):
        raise ValueError("a cross-encoder gives one value a pair")
    return [float(o[0]) for o in outputs]


def pair_scores(vectors: list[list[float]], n_left: int) -> list[float]:
    """Bi-encoder scores (vLLM scores embedding models so): the cosine of each left vector with
    its right one, one left vector standing for all when there is one."""
    left, right = vectors[:n_left], vectors[n_left:]
    if len(left) == 1:
        left = left * len(right)
    return [cosine(a, b) for a, b in zip(left, right, strict=True)]


def usage(prompt_tokens: int) -> dict[str, Any]:
    """vLLM's UsageInfo as its pooling server dumps it."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def response_id(prefix: str, request_id: str | None, header: str | None) -> str:
    """`<prefix>-<id>`: the X-Request-Id header's, else the body's request_id, else a random one."""
    return f"{prefix}-{header or request_id or uuid.uuid4().hex}"


def score_body(rid: str, model: str, scores: list[float], prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": usage(prompt_tokens),
    }


def classify_body(
    rid: str, model: str, probs: list[list[float]], labels: dict[str, str], prompt_tokens: int
) -> dict[str, Any]:
    """vLLM's ClassificationResponse: each input's class probabilities, the label of the most
    likely class (the first of equal ones, as numpy's argmax; null without a name) and their count."""
    data = []
    for i, p in enumerate(probs):
        best = max(range(len(p)), key=p.__getitem__) if p else 0
        data.append({"index": i, "label": labels.get(str(best)), "probs": p, "num_classes": len(p)})
    return {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage(prompt_tokens),
    }


def rerank_body(
    rid: str, model: str, documents: list[str], scores: list[float], top_n: int, prompt_tokens: int
) -> dict[str, Any]:
    """Documents by relevance, highest first (a stable sort, as vLLM's), the first `top_n` when set."""
    order = sorted(range(len(documents)), key=lambda i: scores[i], reverse=True)
    if 0 < top_n < len(documents):
        order = order[:top_n]
    results = [
        {"index": i, "document": {"text": documents[i], "multi_modal": None}, "relevance_score": scores[i]}
        for i in order
    ]
    return {
        "id": rid,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "results": results,
    }
