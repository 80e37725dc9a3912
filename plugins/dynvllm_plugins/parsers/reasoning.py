"""Reasoning parsers for `<think>...</think>` models."""

from __future__ import annotations

from dynvllm.frontend.parsers import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the chat template opens `<think>`, so the output starts inside reasoning
    (a leading `<think>` is dropped); everything before `</think>` is reasoning."""

    opens_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: reasoning only when the output opens with `<think>` (thinking enabled); an output
    without it is all content."""

    opens_in_reasoning = False
