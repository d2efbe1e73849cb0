"""The JSONL conversation format: strict validation with line numbers, bare-array identity lines."""

from __future__ import annotations

import json

import pytest

from nanochat.sources.conversations import (
    ConversationFormatError,
    check_conversation,
    read_conversations,
    write_conversations,
)

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_objects_and_bare_array_identity_lines(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        json.dumps({**GOOD, "source": "x"}),
        "",
        json.dumps([{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "a bot"}]),
    ])
    convs = read_conversations(path)
    assert len(convs) == 2
    assert convs[0]["source"] == "x"  # extra keys are kept
    assert convs[1] == {"messages": [{"role": "user", "content": "who are you?"},
                                     {"role": "assistant", "content": "a bot"}]}


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"messages": [', "invalid JSON"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "expected role 'user'"),
        (json.dumps({"messages": [{"role": "user", "content": ""}]}), "must not be empty"),
        (json.dumps({"messages": [{"role": "user", "content": "   "}]}), "whitespace"),
        (json.dumps({"messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}),
         "unknown part type"),
        (json.dumps({"messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": [{"type": "text", "text": 3}]}]}),
         "'text' must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": ["not", "a", "string"]}]}), "must be a string"),
        (json.dumps({"conversation": []}), "expected an object with 'messages'"),
    ],
)
def test_bad_line_reports_file_line_and_rule(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), "", bad_line])
    with pytest.raises(ConversationFormatError) as info:
        read_conversations(path)
    message = str(info.value)
    assert f"{path}:3:" in message  # blank lines still count
    assert expected in message


def test_tool_call_parts_are_valid_assistant_content():
    conv = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute "},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "#### 4"},
        ]},
    ]}
    assert check_conversation(conv) is conv


def test_write_then_read_round_trips_and_validates(tmp_path):
    path = tmp_path / "out" / "c.jsonl"
    assert write_conversations(path, [GOOD, GOOD["messages"]]) == 2
    assert read_conversations(path) == [GOOD, GOOD]
    with pytest.raises(ConversationFormatError, match="conversation 1"):
        write_conversations(path, [GOOD, {"messages": []}])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConversationFormatError, match="no such conversation file"):
        read_conversations(tmp_path / "nope.jsonl")


def test_one_pydantic_model_holds_the_rules_for_rendering_and_for_files():
    from nanochat.conversation import AssistantMessage, Conversation, ConversationError, Part

    conv = Conversation.parse({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]},
    ], "source": "x"})
    assert isinstance(conv.messages[2], AssistantMessage)
    assert conv.messages[2].content[0] == Part(type="python", text="2+2")
    assert conv.model_extra == {"source": "x"}
    assert conv.turns()[0] == {"role": "user", "content": "Be brief.\n\n2+2?"}
    blank = [{"role": "user", "content": " "}]
    assert Conversation.parse(blank).turns() == blank  # rendering admits blank text ...
    with pytest.raises(ConversationError, match="message 0: content must not be empty or whitespace only"):
        Conversation.parse(blank, allow_blank=False)  # ... files of training data do not
    assert Conversation.parse([{"role": "user", "content": ""}], allow_empty=True).turns()[0]["content"] == ""
    with pytest.raises(ValueError, match="message 0: content must not be empty"):  # ConversationError is a ValueError
        Conversation.parse([{"role": "user", "content": ""}])
