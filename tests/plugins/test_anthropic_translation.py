"""Anthropic Messages requests as the chat requests they mean, and stop reasons (pure)."""

from __future__ import annotations

import json

import pytest

from dynvllm.frontend.errors import RequestError
from dynvllm_plugins.surfaces.anthropic import MessagesRequest, _parse, stop_reason, to_chat


def _req(**kw) -> MessagesRequest:
    base = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    return MessagesRequest.model_validate({**base, **kw})


def test_system_text_and_sampling_carry_over():
    chat = to_chat(
        _req(
            system=[{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
            temperature=0.5,
            top_k=4,
            stop_sequences=["END"],
        )
    )
    assert [(m.role, m.text()) for m in chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert chat.max_tokens == 8 and chat.temperature == 0.5 and chat.top_k == 4
    assert chat.stops() == ["END"]


def test_tool_use_and_results_become_tool_calls_and_tool_messages():
    chat = to_chat(
        _req(
            tools=[{"name": "get", "description": "d", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "get"},
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "t1", "name": "get", "input": {"city": "Oslo"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "cold"}],
                },
            ],
        )
    )
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool"]
    call = chat.messages[1].tool_calls[0]
    assert call["function"]["name"] == "get" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert chat.messages[2].tool_call_id == "t1" and chat.messages[2].text() == "cold"
    assert chat.tools[0].function.name == "get"
    assert chat.effective_tool_choice().function.name == "get"


def test_images_become_data_urls():
    chat = to_chat(
        _req(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAA"},
                        },
                        {"type": "text", "text": "what is it?"},
                    ],
                }
            ]
        )
    )
    assert chat.messages[0].image_urls() == ["data:image/png;base64,AAA"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "thinking"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(body, named):
    raw = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(RequestError) as e:
        to_chat(_parse(json.dumps(raw).encode()))
    assert e.value.status == 400 and named in e.value.message


def test_stop_reasons():
    assert stop_reason("length", None, False) == ("max_tokens", None)
    assert stop_reason("stop", "END", False) == ("stop_sequence", "END")
    assert stop_reason("stop", None, False) == ("end_turn", None)
    assert stop_reason("stop", 2, False) == ("end_turn", None)  # a stop token, not a sequence
    assert stop_reason("stop", None, True) == ("tool_use", None)
