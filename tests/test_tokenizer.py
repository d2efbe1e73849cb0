"""Tokenizer: real BPE trained in-process; round-trips, special ids, chat rendering rules, save/load."""

from __future__ import annotations

import pickle

import pytest

from nanochat.common import NanochatError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, iter_capped, validate_conversation

REFERENCE_SPECIALS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]


def S(tok: Tokenizer, name: str) -> int:
    return tok.encode_special(f"<|{name}|>")


# ---- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox.",
        "日本語のテキストと中文文本, 한국어 텍스트",
        "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷, accents café naïve",
        "def add(a, b):\n\treturn a + b  # sum\n\nprint(add(2, 3))\n",
        "tabs\t\tand   spaces    \n\n\n   trailing   ",
        "numbers 1234567890 3.14159 -42 1e-9",
        "",
        "\x00\x01 control \u200b zero-width \ufeff bom",
    ],
)
def test_round_trip_preserves_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_learned_merges_compress_training_text(tok):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_special_tokens_are_the_last_nine_ids_in_reference_order(tok):
    assert SPECIAL_TOKENS == REFERENCE_SPECIALS
    v = tok.vocab_size
    assert [tok.encode_special(t) for t in REFERENCE_SPECIALS] == list(range(v - 9, v))
    assert tok.get_bos_token_id() == v - 9
    for i, name in enumerate(REFERENCE_SPECIALS):
        assert tok.decode([v - 9 + i]) == name


def test_special_token_strings_in_text_are_ordinary_text(tok):
    ids = tok.encode("<|bos|>")
    assert len(ids) > 1
    assert tok.get_bos_token_id() not in ids
    assert tok.decode(ids) == "<|bos|>"


def test_unknown_special_token_raises(tok):
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_encode_prepend_append_by_name_or_id(tok):
    bos, end = tok.get_bos_token_id(), S(tok, "assistant_end")
    body = tok.encode("hello there")
    assert tok.encode("hello there", prepend="<|bos|>") == [bos, *body]
    assert tok.encode("hello there", prepend=bos, append=end) == [bos, *body, end]
    assert tok.encode("hello there", append="<|assistant_end|>") == [*body, end]


def test_batch_encode_matches_single_and_applies_prepend_append(tok):
    texts = ["first text", "日本語", "", "def f(): pass"]
    batch = tok.encode(texts, prepend="<|bos|>", append="<|user_end|>")
    bos, ue = tok.get_bos_token_id(), S(tok, "user_end")
    assert batch == [[bos, *tok.encode(t), ue] for t in texts]
    assert tok.encode(texts) == [tok.encode(t) for t in texts]


def test_batch_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError):
        tok.encode(["ok", 3])


def test_token_bytes_is_byte_length_with_zero_for_specials(tok):
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,)
    assert tb[-9:].tolist() == [0] * 9
    assert all(tb[i] == 1 for i in range(256))
    for i in range(256, tok.vocab_size - 9):
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i))
    text = "The quick brown fox jumps over the lazy dog. 日本語"
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_training_on_too_little_text_names_the_fix():
    with pytest.raises(NanochatError, match="vocab_size"):
        Tokenizer.train_from_iterator(["ab ab ab"], vocab_size=256 + 9 + 500)


def test_vocab_size_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=100)


def test_iter_capped_truncates_documents_and_stops_at_max_chars():
    docs = list(iter_capped(["a" * 10, "b" * 10, "c" * 10, "d" * 10], max_chars=15, doc_cap=8))
    assert docs == ["a" * 8, "b" * 8]


# ---- conversation rendering --------------------------------------------------------------------


def test_render_simple_conversation_ids_and_mask(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids, mask = tok.render_conversation(conv)
    u, a = tok.encode("hi"), tok.encode("hello")
    expected_ids = [
        tok.get_bos_token_id(),
        S(tok, "user_start"),
        *u,
        S(tok, "user_end"),
        S(tok, "assistant_start"),
        *a,
        S(tok, "assistant_end"),
    ]
    expected_mask = [0, 0, *[0] * len(u), 0, 0, *[1] * len(a), 1]
    assert ids == expected_ids
    assert mask == expected_mask


def test_supervised_tokens_are_assistant_content_plus_assistant_end(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four"},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    supervised = [i for i, m in zip(ids, mask) if m]
    end = S(tok, "assistant_end")
    assert supervised == [*tok.encode("two"), end, *tok.encode("four"), end]
    assert S(tok, "assistant_start") not in supervised


def test_system_message_is_merged_into_first_user_message(tok):
    with_system = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    merged = {
        "messages": [{"role": "user", "content": "be brief\n\nhi"}, {"role": "assistant", "content": "ok"}]
    }
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)


def test_assistant_parts_python_supervised_output_not(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "let me compute "},
                    {"type": "python", "text": "2+3"},
                    {"type": "python_output", "text": "5"},
                    {"type": "text", "text": " so 5"},
                ],
            },
        ]
    }
    ids, mask = tok.render_conversation(conv)
    ps, pe, os_, oe = (S(tok, n) for n in ("python_start", "python_end", "output_start", "output_end"))
    i_ps, i_pe, i_os, i_oe = ids.index(ps), ids.index(pe), ids.index(os_), ids.index(oe)
    assert i_ps < i_pe < i_os < i_oe
    assert all(mask[i] == 1 for i in range(i_ps, i_pe + 1))  # the tool call is learned
    assert all(mask[i] == 0 for i in range(i_os, i_oe + 1))  # the tool output is not
    assert ids[i_os + 1 : i_oe] == tok.encode("5")
    assert ids[i_ps + 1 : i_pe] == tok.encode("2+3")
    assert ids[-1] == S(tok, "assistant_end") and mask[-1] == 1
    assert [i for i, m in zip(ids, mask) if m][: len(tok.encode("let me compute "))] == tok.encode(
        "let me compute "
    )


def test_render_truncates_to_max_tokens(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "ok " * 200},
        ]
    }
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=100_000)
    ids, mask = tok.render_conversation(conv, max_tokens=50)
    assert len(ids) == len(mask) == 50
    assert ids == full_ids[:50] and mask == full_mask[:50]


def test_render_for_completion_drops_last_answer_and_ends_with_assistant_start(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "SECRET ANSWER"},
        ]
    }
    prompt = tok.render_for_completion(conv)
    ids, _ = tok.render_conversation({"messages": conv["messages"][:3]})
    assert prompt == [*ids, S(tok, "assistant_start")]
    assert "SECRET" not in tok.decode(prompt)
    # a conversation that already ends with the user renders the same prompt
    assert tok.render_for_completion({"messages": conv["messages"][:3]}) == prompt


@pytest.mark.parametrize(
    "messages, pattern",
    [
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            r"message 1: expected role 'assistant'",
        ),
        ([{"role": "assistant", "content": "a"}], r"message 0: expected role 'user'"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "system", "content": "s"},
            ],
            r"message 2: expected role 'user'.*system only first",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
            r"message 0: .*followed by a user",
        ),
        ([{"role": "robot", "content": "a"}], r"message 0: unknown role 'robot'"),
        ([{"role": "user", "content": ""}], r"message 0: content must not be empty"),
        ([{"role": "user", "content": 42}], r"message 0: user content must be a string, got int"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
            ],
            r"message 1, part 0: unknown part type 'image'",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "text", "text": 5}]},
            ],
            r"message 1, part 0: 'text' must be a string",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}],
            r"message 1: assistant content",
        ),
        ([{"role": "user"}], r"message 0: expected an object with 'role' and 'content'"),
        ([], r"at least one message"),
    ],
)
def test_invalid_conversations_name_the_message_and_rule(tok, messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        tok.render_conversation({"messages": messages})
    with pytest.raises(ValueError, match=pattern):
        validate_conversation({"messages": messages})


def test_render_for_completion_validates_the_conversation(tok):
    with pytest.raises(ValueError, match="message 0: expected role 'user'"):
        tok.render_for_completion({"messages": [{"role": "assistant", "content": "b"}]})


# ---- save / load -------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_ids_and_fingerprint(tok, tmp_path):
    tok.save(tmp_path / "t")
    loaded = Tokenizer.load(tmp_path / "t")
    text = "日本語 and code: def f(x): return x**2 🎉"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.fingerprint == tok.fingerprint
    assert [loaded.encode_special(t) for t in SPECIAL_TOKENS] == [
        tok.encode_special(t) for t in SPECIAL_TOKENS
    ]


def test_load_needs_no_pickle(tok, tmp_path, monkeypatch):
    d = tok.save(tmp_path / "t")
    (d / "tokenizer.pkl").unlink()
    (d / "token_bytes.pt").unlink()

    def refuse(*_a, **_k):
        raise AssertionError("Tokenizer.load must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert Tokenizer.load(d).encode("hello world") == tok.encode("hello world")


def test_pickle_interop_file_is_a_tiktoken_encoding_like_nanochats(tok, tmp_path):
    import tiktoken
    import torch

    d = tok.save(tmp_path / "t")
    with open(d / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.encode_ordinary("hello 日本") == tok.encode("hello 日本")
    assert enc.encode_single_token("<|output_end|>") == tok.vocab_size - 1
    token_bytes = torch.load(d / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32
    assert torch.equal(token_bytes, tok.token_bytes())


def test_load_missing_dir_names_the_command(tmp_path):
    with pytest.raises(NanochatError, match="nanochat tok train"):
        Tokenizer.load(tmp_path / "nothing")


def test_load_corrupt_ranks_names_the_file(tok, tmp_path):
    d = tok.save(tmp_path / "t")
    (d / "mergeable_ranks.tiktoken").write_text("not base64 at all x y\n")
    with pytest.raises(NanochatError, match="mergeable_ranks.tiktoken"):
        Tokenizer.load(d)
