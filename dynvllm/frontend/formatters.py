"""One formatter per OpenAI endpoint: how its request becomes prompt tokens and how choices,
chunks and logprobs look on the wire. The request path itself is shared (`app.FrontendApp`)."""

from __future__ import annotations

from typing import Any

from dynvllm.frontend import openai_api as oa
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.postprocess import ChoiceDelta


class Formatter:
    request_model: type[oa.CompletionRequest] | type[oa.ChatRequest]
    object_name: str
    chunk_object: str
    id_prefix: str

    def prompt_ids(self, entry: ModelEntry, req: Any) -> list[int]:
        raise NotImplementedError

    def opening(self, n: int) -> list[dict]:
        """Choices streamed before any token (chat announces the assistant's role)."""
        return []

    def chunk_choice(self, d: ChoiceDelta, logprobs: list | None) -> dict:
        raise NotImplementedError

    def choice(self, index: int, text: str, finish: str, logprobs: list | None) -> dict:
        raise NotImplementedError


class ChatFormatter(Formatter):
    request_model = oa.ChatRequest
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def prompt_ids(self, entry: ModelEntry, req: oa.ChatRequest) -> list[int]:
        tok = entry.tokenizer
        assert tok is not None
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except oa.APIError:
            raise
        except Exception as exc:
            raise oa.APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    def opening(self, n: int) -> list[dict]:
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(n)
        ]

    @staticmethod
    def _logprobs(entries: list | None) -> dict | None:
        if entries is None:
            return None
        return {
            "content": [
                {
                    "token": t,
                    "logprob": lp,
                    "bytes": list(t.encode()),
                    "top_logprobs": [
                        {"token": tt, "logprob": tlp, "bytes": list(tt.encode())} for tt, tlp in top
                    ],
                }
                for t, lp, top in entries
            ]
        }

    def chunk_choice(self, d: ChoiceDelta, logprobs: list | None) -> dict:
        return {
            "index": d.index,
            "delta": {"content": d.text},
            "logprobs": self._logprobs(logprobs),
            "finish_reason": d.finish_reason,
        }

    def choice(self, index: int, text: str, finish: str, logprobs: list | None) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": self._logprobs(logprobs),
            "finish_reason": finish,
        }


class CompletionFormatter(Formatter):
    request_model = oa.CompletionRequest
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def prompt_ids(self, entry: ModelEntry, req: oa.CompletionRequest) -> list[int]:
        prompts = req.prompts()
        if len(prompts) != 1:
            raise oa.APIError(
                400, "send one prompt per request (batched prompts are not supported)", param="prompt"
            )
        p = prompts[0]
        assert entry.tokenizer is not None
        return entry.tokenizer.encode(p) if isinstance(p, str) else list(p)

    @staticmethod
    def _logprobs(entries: list | None) -> dict | None:
        if entries is None:
            return None
        return {
            "tokens": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries],
            "text_offset": [],
        }

    def chunk_choice(self, d: ChoiceDelta, logprobs: list | None) -> dict:
        return self.choice(d.index, d.text, d.finish_reason, logprobs)  # type: ignore[arg-type]

    def choice(self, index: int, text: str, finish: str | None, logprobs: list | None) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish}


CHAT = ChatFormatter()
COMPLETION = CompletionFormatter()
