"""OpenAI chat messages → nanochat prompt (nanochat.serve.messages) and request validation errors.

Fast unit tests of the acceptance table in docs/api.md: each accepted row renders to the token ids of
the nanochat conversation written out by hand; each rejected row raises with the field named. The same
rows run over real HTTP in tests/test_serve.py.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from nanochat.serve.messages import MessageError, render_prompt
from nanochat.serve.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api_error,
)

CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
U = {"role": "user", "content": "Hi"}


def _messages(messages: list[dict]):
    return ChatCompletionRequest.model_validate_json(json.dumps({"messages": messages})).messages


def _ids(tok, conversation: list[dict], open_turn: bool = False) -> list[int]:
    """The expected prompt, written with the tokenizer's own renderer."""
    if not open_turn:
        return tok.render_for_completion({"messages": conversation}, allow_empty=True)
    ids, _ = tok.render_conversation({"messages": conversation}, max_tokens=1 << 30, allow_empty=True)
    assert ids[-1] == tok.encode_special("<|assistant_end|>")
    return ids[:-1]


def _a(*parts) -> dict:
    return {"role": "assistant", "content": list(parts)}


def _text(t):
    return {"type": "text", "text": t}


ACCEPTED = [
    # (OpenAI messages, the nanochat conversation it renders as, whether the last assistant turn stays open)
    ("user string", [U], [U], False),
    ("user text parts", [{"role": "user", "content": [_text("H"), _text("i")]}], [U], False),
    ("user name", [{**U, "name": "bob"}], [U], False),
    ("user empty", [{"role": "user", "content": ""}], [{"role": "user", "content": ""}], False),
    ("system first", [{"role": "system", "content": "Be brief."}, U], [{"role": "user", "content": "Be brief.\n\nHi"}], False),
    ("developer parts", [{"role": "developer", "content": [_text("Be brief.")]}, U],
     [{"role": "user", "content": "Be brief.\n\nHi"}], False),
    ("system only", [{"role": "system", "content": "Be brief."}], [{"role": "user", "content": "Be brief."}], False),
    ("system after user", [U, {"role": "system", "content": "Be brief."}], [{"role": "user", "content": "Hi\n\nBe brief."}], False),
    ("system mid-conversation", [U, {"role": "assistant", "content": "Yo"}, {"role": "system", "content": "S"}, U],
     [U, _a(_text("Yo")), {"role": "user", "content": "S\n\nHi"}], False),
    ("two users", [U, {"role": "user", "content": "there"}], [{"role": "user", "content": "Hi\n\nthere"}], False),
    ("assistant history", [U, {"role": "assistant", "content": "Yo"}, U], [U, _a(_text("Yo")), U], False),
    ("assistant empty", [U, {"role": "assistant", "content": ""}, U], [U, _a(), U], False),
    ("assistant parts", [U, {"role": "assistant", "content": [_text("Y"), {"type": "refusal", "refusal": "o"}]}, U],
     [U, _a(_text("Yo")), U], False),
    ("assistant refusal only", [U, {"role": "assistant", "content": None, "refusal": "No."}, U], [U, _a(_text("No.")), U], False),
    ("assistant audio only", [U, {"role": "assistant", "audio": {"id": "a1"}}, U], [U, _a(), U], False),
    ("two assistants", [U, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}, U],
     [U, _a(_text("A\n\nB")), U], False),
    ("tool call and result", [U, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                              {"role": "tool", "tool_call_id": "c1", "content": "2"}, {"role": "assistant", "content": "2."}, U],
     [U, _a({"type": "python", "text": 'add({"a": 1})'}, {"type": "python_output", "text": "2"}, _text("2.")), U], False),
    ("custom tool call", [U, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "f", "input": "x"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": [_text("y")]}, U],
     [U, _a({"type": "python", "text": "f(x)"}, {"type": "python_output", "text": "y"}), U], False),
    ("function call (deprecated)", [U, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                                    {"role": "function", "name": "f", "content": "1"}, U],
     [U, _a({"type": "python", "text": "f({})"}, {"type": "python_output", "text": "1"}), U], False),
    ("tool markup in text", [U, {"role": "assistant", "content": "x <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>."}, U],
     [U, _a(_text("x "), {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, _text(".")), U], False),
    ("assistant first", [{"role": "assistant", "content": "Hello!"}, U], [{"role": "user", "content": ""}, _a(_text("Hello!")), U], False),
    ("trailing assistant continues", [U, {"role": "assistant", "content": "The answer is"}], [U, _a(_text("The answer is"))], True),
    ("trailing tool result continues", [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1", "content": "2"}],
     [U, _a({"type": "python", "text": 'add({"a": 1})'}, {"type": "python_output", "text": "2"})], True),
]


@pytest.mark.parametrize("name,messages,conversation,open_turn", ACCEPTED, ids=[row[0] for row in ACCEPTED])
def test_accepted_messages_render_as_the_nanochat_conversation(tiny_tokenizer, name, messages, conversation, open_turn):
    assert render_prompt(tiny_tokenizer, _messages(messages)) == _ids(tiny_tokenizer, conversation, open_turn)


def test_a_trailing_assistant_message_is_continued_not_dropped(tiny_tokenizer):
    asked = render_prompt(tiny_tokenizer, _messages([U, {"role": "assistant", "content": "The answer is"}]))
    plain = render_prompt(tiny_tokenizer, _messages([U]))
    assert asked[: len(plain)] == plain and asked[len(plain):] == tiny_tokenizer.encode("The answer is")


REJECTED = [
    # (messages, param, code) — what OpenAI rejects, with the field named
    ([], "messages", "invalid_value"),
    (["hello"], "messages.0", "invalid_value"),
    ([{"content": "x"}], "messages.0.role", "missing_required_parameter"),
    ([{"role": "robot", "content": "x"}], "messages.0.role", "invalid_value"),
    ([{"role": "user"}], "messages.0.content", "missing_required_parameter"),
    ([{"role": "user", "content": None}], "messages.0.content", "invalid_value"),
    ([{"role": "user", "content": 5}], "messages.0.content", "invalid_value"),
    ([{"role": "user", "content": []}], "messages.0.content", "invalid_value"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], "messages.0.content.0.type", "invalid_value"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content.0.text", "missing_required_parameter"),
    ([{"role": "user", "content": "x", "foo": 1}], "messages.0.foo", "unknown_parameter"),
    ([{"role": "system", "content": None}], "messages.0.content", "invalid_value"),
    ([U, {"role": "assistant", "content": [{"type": "image_url"}]}], "messages.1.content.0.type", "invalid_value"),
    ([U, {"role": "assistant"}], "messages.1.content", "invalid_messages"),
    ([U, {"role": "assistant", "content": [{"type": "text"}]}], "messages.1.content.0", "invalid_value"),
    ([U, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}, {"role": "tool", "tool_call_id": "c1", "content": "1"}],
     "messages.1.tool_calls.0", "invalid_value"),
    ([U, {"role": "assistant", "tool_calls": [{**CALL, "type": "web"}]}], "messages.1.tool_calls.0.type", "invalid_value"),
    ([U, {"role": "tool", "tool_call_id": "c1", "content": "2"}], "messages.1.tool_call_id", "invalid_messages"),
    ([U, {"role": "assistant", "tool_calls": [CALL]}, U], "messages.1.tool_calls", "invalid_messages"),
    ([U, {"role": "assistant", "tool_calls": [CALL]}], "messages.1.tool_calls", "invalid_messages"),
    ([U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "2"}], "messages.2.tool_call_id",
     "missing_required_parameter"),
    ([U, {"role": "function", "content": "2"}], "messages.1.name", "missing_required_parameter"),
]


@pytest.mark.parametrize("messages,param,code", REJECTED, ids=[str(i) for i in range(len(REJECTED))])
def test_rejected_messages_name_the_field(tiny_tokenizer, messages, param, code):
    try:
        render_prompt(tiny_tokenizer, _messages(messages))
    except ValidationError as err:
        e = validation_error_to_api_error(err.errors(include_url=False))
        assert (e.status, e.param, e.code) == (400, param, code), e.message
    except MessageError as err:
        assert (err.param, "invalid_messages") == (param, code), str(err)
    else:
        pytest.fail("accepted a conversation OpenAI rejects")


@pytest.mark.parametrize("raw,param,code", [
    (b"", None, "invalid_json"),
    (b"{nope", None, "invalid_json"),
    (b"[]", None, "invalid_json"),
    (b'{"prompt": "\\ud800"}', None, "invalid_json"),  # a lone surrogate is not Unicode text
    (b'{"prompt": "\xff"}', None, "invalid_json"),  # nor is invalid UTF-8
    (b'{"prompt": ' + b"[" * 300 + b"]" * 300 + b"}", None, "invalid_json"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature", "invalid_value"),
    (b'{"prompt": "x", "stop": 5}', "stop", "invalid_value"),
    (b'{"prompt": "x", "a-b[0]": 1}', "a-b[0]", "unknown_parameter"),
    (b'{"prompt": "x", "logit_bias": {"1": "big"}}', "logit_bias.1", "invalid_value"),
])
def test_bad_bodies_map_to_one_openai_400(raw, param, code):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(raw)
    e = validation_error_to_api_error(info.value.errors(include_url=False))
    assert (e.status, e.param, e.code) == (400, param, code), e.message
    assert "None" not in e.message and e.message.encode("utf-8")
