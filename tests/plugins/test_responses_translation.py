"""Responses requests as the chat requests they mean, their output items and events, and the
store (pure)."""

from __future__ import annotations

import json

import pytest

from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.postprocess import Usage
from dynvllm_plugins.surfaces import responses_output as ro
from dynvllm_plugins.surfaces.responses import ResponseStore, Stored
from dynvllm_plugins.surfaces.responses_schema import output_messages, parse, to_chat, to_messages


def _req(**kw):
    return parse(json.dumps({"model": "m", "input": "hi", **kw}).encode())


def _roles(chat) -> list[tuple[str, str]]:
    return [(m.role, m.text()) for m in chat.messages]


def test_a_string_input_with_instructions_and_sampling():
    chat = to_chat(_req(instructions="be brief", max_output_tokens=7, temperature=0.5, top_p=0.9, top_k=3))
    assert _roles(chat) == [("system", "be brief"), ("user", "hi")]
    assert chat.max_tokens == 7 and chat.temperature == 0.5 and chat.top_p == 0.9 and chat.top_k == 3
    assert chat.n == 1 and not chat.stream


def test_message_items_with_text_and_image_parts():
    chat = to_chat(
        _req(
            input=[
                {"role": "developer", "content": "rules"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is "},
                        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
                        {"type": "input_text", "text": "this?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "output_text", "text": "a cat"}]},
            ]
        )
    )
    assert _roles(chat) == [("developer", "rules"), ("user", "what is this?"), ("assistant", "a cat")]
    assert chat.messages[1].image_urls() == ["data:image/png;base64,AAAA"]


def test_function_calls_join_their_turn_and_outputs_become_tool_messages():
    items = [
        {"role": "user", "content": "weather in Oslo and Rome?"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "two"}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "cold"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "warm"}]},
    ]
    messages = to_messages(items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    turn = messages[1]
    assert turn["reasoning_content"] == "two"
    assert [c["id"] for c in turn["tool_calls"]] == ["c1", "c2"]
    assert json.loads(turn["tool_calls"][1]["function"]["arguments"]) == {"city": "Rome"}
    assert [(m["tool_call_id"], m["content"]) for m in messages[2:]] == [("c1", "cold"), ("c2", "warm")]
    chat = to_chat(_req(input=items))  # the chat request takes them as they are
    assert chat.messages[1].tool_calls[0]["function"]["name"] == "get"


def test_history_comes_before_the_new_input_and_instructions_do_not_carry_over():
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"}]
    chat = to_chat(_req(input="second", instructions="now"), history)
    assert _roles(chat) == [("system", "now"), ("user", "first"), ("assistant", "answer"), ("user", "second")]


def test_output_items_become_the_next_turns_messages():
    out = ro.Output()
    out.feed({"reasoning_content": "think"})
    out.feed({"content": "the answer"})
    out.feed({"tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]})
    out.finish()
    assert output_messages(out.items) == [
        {
            "role": "assistant",
            "content": "the answer",
            "reasoning_content": "think",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


def test_function_tools_tool_choice_and_json_schema_format_map_to_chat():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tool = {"type": "function", "name": "get", "description": "d", "parameters": {"type": "object"}}
    chat = to_chat(
        _req(
            tools=[tool],
            tool_choice={"type": "function", "name": "get"},
            parallel_tool_calls=False,
        )
    )
    assert chat.tools[0].function.name == "get" and chat.tools[0].function.description == "d"
    assert chat.effective_tool_choice().function.name == "get" and chat.parallel_tool_calls is False
    assert to_chat(_req(tools=[tool])).effective_tool_choice() == "auto"
    assert to_chat(_req(tools=[tool], tool_choice="required")).effective_tool_choice() == "required"
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    chat = to_chat(_req(text={"format": fmt}))
    assert chat.response_format.type == "json_schema"
    assert chat.response_format.json_schema.name == "thing"
    assert chat.response_format.json_schema.schema_ == schema
    assert chat.constraint() == {"json": schema}
    assert to_chat(_req(text={"format": {"type": "json_object"}})).constraint() == {"json_object": True}
    assert to_chat(_req(text={"format": {"type": "text"}})).constraint() is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True, "store": False}, "background"),
        ({"include": ["message.output_input.image_url"]}, "include"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search_preview"}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"reasoning": {"summary": "auto"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"text": {"verbosity": "low"}}, "text"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input"),
        ({"input": [{"type": "reasoning", "encrypted_content": "x", "summary": []}]}, "input"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"n": 2}, "n"),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(fields, param):
    with pytest.raises(RequestError) as exc:
        to_chat(_req(**fields))
    assert exc.value.status == 400 and exc.value.param == param, exc.value.message


def test_the_chats_own_refusals_apply_to_passed_fields():
    with pytest.raises(RequestError) as exc:
        to_chat(_req(cache_salt="s"))
    assert exc.value.param == "cache_salt"


def _kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def test_events_open_stream_and_close_each_item_in_order():
    out = ro.Output()
    events = (
        out.feed({"reasoning_content": "hm"}) + out.feed({"content": "he"}) + out.feed({"content": "llo"})
    )
    events += out.feed({"tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": '{"a": 1}'}}]})
    events += out.finish()
    assert _kinds(events) == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["text"] == "hello" and text_done["item_id"] == out.items[1]["id"]
    assert [i["type"] for i in out.items] == ["reasoning", "message", "function_call"]
    assert out.items[1]["content"][0]["text"] == "hello"
    assert out.items[2]["call_id"] == "call_1" and out.items[2]["arguments"] == '{"a": 1}'
    assert out.reasoning == "hm"


def test_an_empty_answer_still_has_its_message():
    out = ro.Output()
    events = out.finish()
    assert _kinds(events)[0] == "response.output_item.added"
    assert out.items[0]["type"] == "message" and out.items[0]["content"][0]["text"] == ""


def test_usage_and_status_in_the_responses_shape():
    u = ro.usage(Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=8), reasoning_tokens=2)
    assert u == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 14,
    }
    assert ro.status("length") == ("incomplete", {"reason": "max_output_tokens"})
    assert ro.status("stop") == ("completed", None)


def test_the_store_drops_the_least_recently_used_beyond_its_size():
    store = ResponseStore(2)
    for rid in ("a", "b"):
        store.put(rid, Stored({"id": rid}, []))
    assert store.get("a") is not None  # "a" is now the most recently used
    store.put("c", Stored({"id": "c"}, []))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.pop("a") is not None and store.get("a") is None and store.pop("a") is None


def test_reasoning_effort_and_an_unfinished_assistant_message_map_to_chat_fields():
    assert to_chat(_req(reasoning={"effort": "low"})).reasoning_effort == "low"
    partial = [
        {"role": "user", "content": "finish this"},
        {"type": "message", "role": "assistant", "status": "incomplete", "content": "The old"},
    ]
    chat = to_chat(_req(input=partial))
    assert chat.continue_final_message and not chat.add_generation_prompt
    done = [*partial[:1], {**partial[1], "status": "completed"}]
    chat = to_chat(_req(input=done))
    assert not chat.continue_final_message and chat.add_generation_prompt
