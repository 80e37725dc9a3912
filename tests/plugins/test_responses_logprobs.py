"""`include: ["message.output_text.logprobs"]` (pure): the chat request asks for logprobs, and the
output_text part, its deltas and its done event carry every token's entry in order."""

from __future__ import annotations

import pytest

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError
from dynvllm_plugins.surfaces import responses_output as ro
from dynvllm_plugins.surfaces.responses_schema import ResponsesRequest, parse, to_chat


def _lp(token: str) -> dict:
    return {"token": token, "logprob": -1.0, "bytes": list(token.encode()), "top_logprobs": []}


def test_include_logprobs_asks_chat_for_them_and_top_logprobs_needs_it():
    req = parse(
        b'{"model": "m", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 3}'
    )
    chat = to_chat(req)
    assert chat.logprobs is True and chat.top_logprobs == 3
    assert to_chat(parse(b'{"model": "m", "input": "hi"}')).logprobs in (None, False)
    with pytest.raises(RequestError, match="top_logprobs"):
        parse(b'{"model": "m", "input": "hi", "top_logprobs": 2}')
    with pytest.raises(RequestError, match="include"):
        parse(b'{"model": "m", "input": "hi", "include": ["reasoning.encrypted_content"]}')
    with pytest.raises(RequestError):
        bodies.parse_strict(ResponsesRequest, b'{"model": "m", "input": "hi", "top_logprobs": 21}')


def test_every_tokens_entry_reaches_the_output_text_in_order():
    out = ro.Output()
    events = out.feed({}, [_lp("a")])  # a token whose text is held back
    events += out.feed({"content": "ab"}, [_lp("b")])
    events += out.feed({"content": "c"}, [_lp("c")])
    events += out.feed({}, [_lp("<|im_end|>")])
    events += out.finish()
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [[x["token"] for x in e["logprobs"]] for e in deltas] == [["a", "b"], ["c"], ["<|im_end|>"]]
    assert [e["delta"] for e in deltas] == ["ab", "c", ""]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    want = ["a", "b", "c", "<|im_end|>"]
    assert [x["token"] for x in done["logprobs"]] == want
    assert [x["token"] for x in out.items[0]["content"][0]["logprobs"]] == want
