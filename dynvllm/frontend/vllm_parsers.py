"""vLLM's own tool-call and reasoning parsers behind dynvllm's chat output.

Every name vLLM registers (`--tool-call-parser`, `--reasoning-parser`, and those a
`--tool-parser-plugin` file registers) is served by vLLM's composed `Parser`, exactly as its
server drives it: `parse_delta` on each streamed delta (text and token ids), `parse` on a whole
output. vLLM is imported only when such a parser is configured (it costs the frontend seconds
and ~0.5 GB); the names are read from vLLM's sources without importing it.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from dynvllm.frontend.chat_output import ChatDelta
from dynvllm.frontend.parsers import ToolCall

#: A parser name with this prefix is vLLM's even where dynvllm has its own of that name.
PREFIX = "vllm:"

_TABLES = {
    "tool": ("tool_parsers", "_TOOL_PARSERS_TO_REGISTER"),
    "reasoning": ("reasoning", "_REASONING_PARSERS_TO_REGISTER"),
}


@lru_cache(maxsize=2)
def registered(kind: str) -> tuple[str, ...]:
    """The names vLLM registers for `kind` ("tool" or "reasoning") whose module it ships."""
    spec = find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return ()
    package, table = _TABLES[kind]
    root = Path(next(iter(spec.submodule_search_locations))) / package
    tree = ast.parse((root / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == table for t in node.targets
        ):
            entries = ast.literal_eval(node.value)
            return tuple(sorted(n for n, (module, _) in entries.items() if (root / f"{module}.py").exists()))
    return ()


class VllmParsers:
    """vLLM's parser class composed from a tool and/or a reasoning parser name, as its server
    composes it, and per-model tokenizers as vLLM loads them."""

    def __init__(self, tool: str | None, reasoning: str | None, plugin: str | None = None) -> None:
        from vllm.parser import ParserManager
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        if plugin:
            # vLLM logs a plugin that fails to import; its names are then missing below.
            ToolParserManager.import_tool_parser(plugin)
        for kind, name, known in (
            ("--tool-call-parser", tool, ToolParserManager.list_registered()),
            ("--reasoning-parser", reasoning, ReasoningParserManager.list_registered()),
        ):
            if name is not None and name not in known:
                raise ValueError(
                    f"{kind} {name!r} is not registered in vLLM (nor by --tool-parser-plugin, if given: "
                    f"see the log for its import error); it has: {', '.join(known)}"
                )
        self.tool, self.reasoning = tool, reasoning
        self.cls: Any = ParserManager.get_parser(
            tool_parser_name=tool, reasoning_parser_name=reasoning, enable_auto_tools=tool is not None
        )
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, folder: str | Path) -> Any:
        key = str(folder)
        if key not in self._tokenizers:
            from vllm.tokenizers import get_tokenizer

            self._tokenizers[key] = get_tokenizer(key)
        return self._tokenizers[key]

    def request(self, body: dict[str, Any]) -> Any:
        """vLLM's request model for a chat body (its parsers read tools and tool_choice there)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest.model_validate(body)

    def adjust(self, folder: str | Path, request: Any) -> Any:
        """The request as the parsers adjust it, when vLLM's server lets them (a reasoning parser,
        or a tool_choice other than "none")."""
        if self.cls is None or (self.reasoning is None and request.tool_choice == "none"):
            return request
        parser = self.cls(
            self.tokenizer(folder), request.tools, chat_template_kwargs=request.chat_template_kwargs
        )
        return parser.adjust_request(request=request)

    def output(
        self, folder: str | Path, request: Any, prompt_ids: list[int], stream: bool
    ) -> VllmChoiceOutput:
        parser = self.cls(
            self.tokenizer(folder), request.tools, chat_template_kwargs=request.chat_template_kwargs
        )
        return VllmChoiceOutput(parser, request, prompt_ids, stream)


def _calls(raw: Sequence[Any] | None) -> list[ToolCall]:
    out = []
    for c in raw or ():
        call = ToolCall(c.name, c.arguments)
        if getattr(c, "id", None):
            call.id = c.id
        out.append(call)
    return out


class VllmChoiceOutput:
    """One choice's output through a vLLM parser. Streamed, each delta goes to `parse_delta` (its
    content and reasoning pass on as they come; tool-call fragments are joined and sent as whole
    calls when the output ends); not streamed, the whole output goes to `parse`."""

    def __init__(self, parser: Any, request: Any, prompt_ids: list[int], stream: bool) -> None:
        self.parser, self.request, self.prompt_ids, self.stream = parser, request, prompt_ids, stream
        self.text = ""
        self.ids: list[int] = []
        self.fragments: dict[int, dict[str, str]] = {}
        self.called = False

    def step(self, text: str, ids: list[int], finished: bool) -> ChatDelta:
        self.text += text
        self.ids += ids
        if not self.stream:
            if not finished:
                return ChatDelta()
            self.parser.set_prompt_token_ids(self.prompt_ids)
            reasoning, content, calls = self.parser.parse(
                self.text, self.request, enable_auto_tools=True, model_output_token_ids=self.ids
            )
            out = ChatDelta(content or "", reasoning or "", _calls(calls))
            self.called = bool(out.tool_calls)
            return out
        msg = self.parser.parse_delta(text, list(ids), self.request, self.prompt_ids, finished=finished)
        out = ChatDelta()
        if msg is not None:
            out.content, out.reasoning = msg.content or "", msg.reasoning or ""
            for tc in msg.tool_calls or ():
                frag = self.fragments.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                frag["id"] = frag["id"] or (tc.id or "")
                if tc.function is not None:
                    frag["name"] += tc.function.name or ""
                    frag["arguments"] += tc.function.arguments or ""
        if finished and self.fragments:
            out.tool_calls = []
            for _, frag in sorted(self.fragments.items()):
                call = ToolCall(frag["name"], frag["arguments"])
                if frag["id"]:
                    call.id = frag["id"]
                out.tool_calls.append(call)
            self.called = True
        return out


def uses_vllm(name: str | None, own: list[str]) -> bool:
    """Whether a configured parser name is served by vLLM's implementation: prefixed with
    `vllm:`, or one dynvllm has no parser of its own for."""
    return name is not None and (name.startswith(PREFIX) or name not in own)


def check_name(kind: str, name: str | None, own: list[str], plugin: str | None) -> None:
    """Refuse a parser name neither dynvllm nor vLLM knows, listing both (names a plugin file
    registers are checked when it is imported)."""
    # dynvllm's own names need no look at vLLM's sources (every process builds its settings).
    if name is None or plugin or name in own:
        return
    theirs = registered(kind)
    if name.removeprefix(PREFIX) in theirs:
        return
    flag = "--tool-call-parser" if kind == "tool" else "--reasoning-parser"
    raise ValueError(
        f"{flag} {name!r} is unknown. dynvllm's own: {', '.join(own) or 'none'}; vLLM's (also as "
        f"{PREFIX}NAME): {', '.join(theirs) or 'none (vLLM is not installed)'}"
    )
