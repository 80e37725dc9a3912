"""One formatter per OpenAI endpoint: how its request becomes prompts, and how choices, chunks
and logprobs look on the wire (chat here; completions in `completion_format`). The request path
itself is shared (`request_path.RequestPath`).

A formatter makes a `Shaper` per request: the state that turns client deltas into chunk choices
(streaming) and complete choices (not streaming). A request has one or more parts (batched
completion prompts); choice indices run prompt-major, as vLLM numbers them.
"""

from __future__ import annotations

from typing import Any

from dynvllm.frontend.chat_output import ChatDelta, ChoiceOutput
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.parsers import ReasoningParser, ToolCall, ToolParser
from dynvllm.frontend.postprocess import ChoiceDelta
from dynvllm.frontend.request_path import Part
from dynvllm.frontend.templates import content_format
from dynvllm.frontend.tokenizer import TokenizerError
from dynvllm.frontend.vllm_parsers import VllmParsers


class Shaper:
    """Per-request output state; `index` is the client-visible choice index."""

    #: Each choice's finish reason, once it has one (surfaces beside OpenAI's read it too).
    finish: list[str | None]

    def opening(self) -> list[dict]:
        return []

    def top(self) -> dict:
        """Fields of the response body beside its choices (streamed: on the first chunk)."""
        return {}

    def chunk(self, index: int, part: Part, d: ChoiceDelta) -> list[dict]:
        raise NotImplementedError

    def choices(self) -> list[dict]:
        raise NotImplementedError


class Formatter:
    request_model: type[oa.CompletionRequest] | type[oa.ChatRequest]
    object_name: str
    chunk_object: str
    id_prefix: str

    def prompts(self, entry: ModelEntry, req: Any) -> list[tuple[list[int], str | None]]:
        """(token ids, text) of each prompt."""
        raise NotImplementedError

    def shaper(self, req: Any, parts: list[Part], n: int) -> Shaper:
        raise NotImplementedError


def chat_logprobs(entries: list | None) -> dict | None:
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


def prompt_logprobs_json(part: Part) -> list | None:
    """vLLM's `prompt_logprobs` shape: per prompt token None (the first) or {token_id: {logprob,
    decoded_token}} for the prompt's own token and the top ones."""
    post = part.post
    assert post is not None  # a generation's part always has its post-processor
    raw = post.prompt_logprobs
    if raw is None:
        return None
    decode = post.tok.decode
    out: list = []
    for tid, entry in zip(part.prompt_ids, raw, strict=False):
        if entry is None:
            out.append(None)
            continue
        lp, top = entry
        pos = {
            str(t): {"logprob": tlp, "decoded_token": decode([t], skip_special_tokens=False)}
            for t, tlp in top
        }
        pos[str(tid)] = {"logprob": lp, "decoded_token": decode([tid], skip_special_tokens=False)}
        out.append(pos)
    return out


def _tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


def _echo_text(req: oa.ChatRequest) -> str:
    """What `echo` puts before each choice's content, as vLLM's chat serving: the last message's
    text when its role is the response's (the assistant's under add_generation_prompt, else the
    last message's own)."""
    if not req.echo or not req.messages:
        return ""
    last = req.messages[-1]
    if req.add_generation_prompt and last.role != "assistant":
        return ""
    if isinstance(last.content, list):
        return "\n".join(str(p.get("text", "")) for p in last.content if p.get("type") == "text")
    return last.content or ""


class _ChatShaper(Shaper):
    def __init__(
        self, fmt: ChatFormatter, req: oa.ChatRequest, n: int, want_logprobs: bool, parts: list[Part]
    ) -> None:
        choice = req.effective_tool_choice()
        forced = None
        forced_name = None
        if isinstance(choice, oa.structured.NamedToolChoice):
            forced, forced_name = "named", choice.function.name
        elif choice == "required":
            forced = "required"
        tools = fmt.tool_parser if choice == "auto" and req.tools else None
        self.plain = fmt.reasoning_parser is None and tools is None and forced is None
        self.with_reasoning = fmt.reasoning_parser is not None
        self.streaming = bool(req.stream)
        self.drop_stop_text = False
        self.auto_tools = choice == "auto" and bool(req.tools)
        vp = fmt.vllm_parsers
        self.outputs: list[Any]
        if vp is not None and req._parser_request is not None and parts and parts[0].post is not None:
            # vLLM's own parsers: every tool_choice goes through them, as in its server.
            folder, prompt = parts[0].post.tok.folder, parts[0].prompt_ids
            self.outputs = [vp.output(folder, req._parser_request, prompt, self.streaming) for _ in range(n)]
            self.plain = False
            self.with_reasoning = vp.reasoning is not None
            self.drop_stop_text = not req.include_stop_str_in_output
        else:
            self.outputs = [ChoiceOutput(fmt.reasoning_parser, tools, forced, forced_name) for _ in range(n)]
        self.n, self.want_logprobs = n, want_logprobs
        self.acc = [ChatDelta() for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.stop_reason: list[str | int | None] = [None] * n
        self.lps: list[list] = [[] for _ in range(n)]
        self.calls_sent = [0] * n
        self.echo = _echo_text(req)
        self.prompt_logprobs = req.prompt_logprobs is not None
        self.part: Part | None = None
        self.forced = forced
        self.return_ids = bool(req.return_token_ids)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.prompt_ids = parts[0].prompt_ids if parts else []

    def opening(self) -> list[dict]:
        roles = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.n)
        ]
        echoed = [
            {"index": i, "delta": {"content": self.echo}, "logprobs": None, "finish_reason": None}
            for i in range(self.n)
            if self.echo
        ]
        return roles + echoed

    def top(self) -> dict:
        out: dict[str, Any] = {"prompt_token_ids": self.prompt_ids} if self.return_ids else {}
        if self.prompt_logprobs and not self.streaming and self.part is not None:
            out["prompt_logprobs"] = prompt_logprobs_json(self.part)  # vLLM's chat: beside the choices
        return out

    def _finish_reason(self, i: int, finish: str) -> str:
        # As vLLM's server answers (OpenAI's rule): "tool_calls" for calls made under "auto" or
        # "required", "stop" for a named function's call. Streamed, calls that were sent turn a
        # "stop" into "tool_calls"; whole, calls parsed under "auto" do (whatever ended the
        # output), and "required" turns every "stop" into "tool_calls".
        called = self.outputs[i].called
        if self.streaming:
            return "tool_calls" if called and self.forced != "named" and finish == "stop" else finish
        if (called and self.auto_tools) or (self.forced == "required" and finish == "stop"):
            return "tool_calls"
        return finish

    def _delta(self, i: int, out: ChatDelta) -> dict:
        delta: dict[str, Any] = {}
        if out.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = out.reasoning
        if out.content or (self.plain and not out.tool_calls):
            delta["content"] = out.content
        if out.tool_calls:
            first = self.calls_sent[i]
            delta["tool_calls"] = [_tool_call_json(c, first + k) for k, c in enumerate(out.tool_calls)]
            self.calls_sent[i] += len(out.tool_calls)
        return delta

    def _accumulate(self, i: int, out: ChatDelta, d: ChoiceDelta) -> None:
        acc = self.acc[i]
        acc.content += out.content
        acc.reasoning += out.reasoning
        acc.tool_calls += out.tool_calls
        if d.logprobs:
            self.lps[i] += d.logprobs
        if d.finish_reason:
            self.finish[i] = d.finish_reason
            self.stop_reason[i] = d.stop_reason

    def advance(self, index: int, part: Part, d: ChoiceDelta) -> ChatDelta:
        """Take one delta into the choice's state: its content, reasoning and tool calls (for
        surfaces that shape their own output instead of chat's chunks)."""
        self.part = part
        text = d.text
        if (
            self.drop_stop_text
            and d.finish_reason == "stop"
            and not isinstance(d.stop_reason, str)
            and d.token_ids
        ):
            # As vLLM's detokenizer: the token that stopped the output is not part of its text
            # (it shows once special tokens are kept, as vLLM's parsers ask).
            assert part.post is not None
            tail = part.post.tok.decode(d.token_ids[-1:], skip_special_tokens=False)
            text = text[: -len(tail)] if tail and text.endswith(tail) else text
        out = self.outputs[index].step(text, d.token_ids, d.finish_reason is not None)
        self._accumulate(index, out, d)
        if self.return_ids:
            self.ids[index] += d.token_ids
        return out

    def chunk(self, index: int, part: Part, d: ChoiceDelta) -> list[dict]:
        i = index
        out = self.advance(i, part, d)
        lps = d.logprobs if self.want_logprobs else None
        ids = d.token_ids if self.return_ids else None
        if not out and d.finish_reason is None and not lps and not ids:
            return []
        finish = self._finish_reason(i, d.finish_reason) if d.finish_reason else None
        if self.plain:
            choice = {
                "index": i,
                "delta": {"content": out.content},
                "logprobs": chat_logprobs(lps),
                "finish_reason": finish,
            }
            if finish is not None:
                choice["stop_reason"] = d.stop_reason
            return [{**choice, "token_ids": ids} if ids is not None else choice]
        choices = []
        if out or lps or (ids and finish is None):
            choices.append(
                {
                    "index": i,
                    "delta": self._delta(i, out),
                    "logprobs": chat_logprobs(lps),
                    "finish_reason": None,
                }
            )
        if finish is not None:
            choices.append(
                {
                    "index": i,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": d.stop_reason,
                }
            )
        if ids is not None:  # the delta's token ids, on its first chunk
            choices[0]["token_ids"] = ids
        return choices

    def choices(self) -> list[dict]:
        out = []
        for i in range(self.n):
            acc = self.acc[i]
            message: dict[str, Any] = {"role": "assistant", "content": acc.content}
            if self.with_reasoning:
                message["reasoning_content"] = message["reasoning"] = acc.reasoning or None
            if acc.tool_calls:
                message["tool_calls"] = [_tool_call_json(c) for c in acc.tool_calls]
                message["content"] = acc.content or None
            if self.echo:
                message["content"] = self.echo + (message["content"] or "")
            choice = {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(self.lps[i] if self.want_logprobs else None),
                "finish_reason": self._finish_reason(i, self.finish[i] or "stop"),
                "stop_reason": self.stop_reason[i],
            }
            if self.return_ids:
                choice["token_ids"] = self.ids[i]
            out.append(choice)
        return out


class ChatFormatter(Formatter):
    request_model = oa.ChatRequest
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(
        self,
        tool_parser: ToolParser | None = None,
        reasoning_parser: ReasoningParser | None = None,
        mm_prompt_template: str | None = None,
        chat_template: str | None = None,
        trust_request_chat_template: bool = False,
        vllm_parsers: VllmParsers | None = None,
    ):
        self.tool_parser = tool_parser
        #: vLLM's own parsers, in place of `tool_parser` and `reasoning_parser`.
        self.vllm_parsers = vllm_parsers
        self.reasoning_parser = reasoning_parser
        self.mm_prompt_template = mm_prompt_template
        #: The server's --chat-template, used instead of each model's own.
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template

    def template(self, entry: ModelEntry, req: oa.ChatRequest) -> str | None:
        """The chat template a request names: its own (when the server trusts them, as vLLM asks),
        else the server's; None leaves the choice to the model's tokenizer."""
        if req.chat_template is not None:
            if not self.trust_request_chat_template:
                raise oa.APIError(
                    400,
                    "a chat_template was sent with the request, but the server does not trust request "
                    "templates: start it with --trust-request-chat-template, or leave chat_template out",
                    param="chat_template",
                )
            return req.chat_template
        return self.chat_template

    def check(self, req: oa.ChatRequest) -> None:
        vp = self.vllm_parsers
        if vp is not None:
            try:
                req._parser_request = vp.request(req.model_dump(exclude_unset=True))
            except Exception as exc:
                raise oa.APIError(400, f"vLLM's request model refuses the request: {exc}") from None
        has_tool_parser = self.tool_parser is not None or (vp is not None and vp.tool is not None)
        if vp is not None and vp.tool is None and req.effective_tool_choice() not in ("auto", "none"):
            # vLLM's parsers read forced calls only through a tool parser; vLLM refuses these too.
            raise oa.APIError(
                400,
                "tool_choice required or a named function needs --tool-call-parser when vLLM's "
                "reasoning parser is in use",
                param="tool_choice",
            )
        if req.tools and req.effective_tool_choice() == "auto" and not has_tool_parser:
            raise oa.APIError(
                400,
                'tool_choice "auto" needs a tool-call parser: start the server with --tool-call-parser NAME '
                "(hermes, llama3_json, mistral, pythonic or any of vLLM's), or send tool_choice required, "
                "none or a function",
                param="tool_choice",
            )

    def prompts(self, entry: ModelEntry, req: oa.ChatRequest) -> list[tuple[list[int], str | None]]:
        self.check(req)
        tok = entry.tokenizer
        assert tok is not None
        template = self.template(entry, req)
        with_images = any(m.image_urls() for m in req.messages)
        if with_images:
            try:
                chosen: str | None = tok.template_for(template, tools=req.tools is not None)
            except TokenizerError:
                chosen = None
            own = chosen is not None and content_format(chosen) == "openai"
            if not own and self.mm_prompt_template:
                # A plain-prompt model (BLIP-2 style): the user's text goes into the template;
                # the engine's processor adds the image tokens itself.
                user = "\n".join(m.text() for m in req.messages if m.role == "user")
                text = self.mm_prompt_template.replace("<prompt>", user)
                add = True if req.add_special_tokens is None else bool(req.add_special_tokens)
                return [(tok.encode(text, add_special_tokens=add), None)]
            if not own:
                raise oa.APIError(
                    400,
                    f"model {entry.name!r} has no chat template that places images: start the server "
                    "with --mm-prompt-template (e.g. 'Question: <prompt> Answer:')",
                    param="messages",
                )
        messages = [m.model_dump(exclude_unset=True) for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, template, **req.template_arguments())
        except oa.APIError:
            raise
        except Exception as exc:
            raise oa.APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        if self.vllm_parsers is not None and req._parser_request is not None:
            # vLLM lets its parsers adjust the request (most keep special tokens in the text they
            # read); what dynvllm takes from that is the detokenization.
            adjusted = self.vllm_parsers.adjust(tok.folder, req._parser_request)
            req.skip_special_tokens = bool(adjusted.skip_special_tokens)
        add_special = bool(req.add_special_tokens)
        return [(tok.encode(text, add_special_tokens=add_special), None)]

    def shaper(self, req: oa.ChatRequest, parts: list[Part], n: int) -> _ChatShaper:
        return _ChatShaper(self, req, n, req.logprobs, parts)
