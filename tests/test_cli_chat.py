"""CLI end to end on real artifacts: `nanochat chat` on a tiny checkpoint, `nanochat tok train|eval`."""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers_engine import scripted_model

from nanochat.cli import main as cli_main

CLI = [sys.executable, "-m", "nanochat.cli"]


def _corpus_text() -> str:
    """Real, varied text available on every machine: the source of a few stdlib modules."""
    import argparse as a
    import textwrap as t

    return inspect.getsource(a) + inspect.getsource(t)


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A $NANOCHAT_BASE_DIR with a trained tokenizer and a tiny random base checkpoint."""
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.model import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("chat_base")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        tok = Tokenizer.train_from_iterator([_corpus_text()], vocab_size=512)
        tok.save()
        torch.manual_seed(0)
        config = GPTConfig(
            sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64
        )
        model = build_model(config)
        with torch.no_grad():  # the reference init zeroes the head: give it signal
            model.lm_head.weight.normal_(0, 0.05)
        save_checkpoint(checkpoint_dir("base", "d2", 1), model, config, tok, stage="base", step=1)
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return base


@pytest.fixture
def use_chat_base(chat_base, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(chat_base))
    return chat_base


def _run(args: list[str], base: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run(CLI + args, env=env, input=stdin, capture_output=True, text=True, timeout=300)


def _expected_greedy(prompt: str, max_tokens: int) -> str:
    """What the engine produces for a one-turn chat, computed in-process from the same checkpoint."""
    from nanochat.checkpoint import load_checkpoint, resolve_checkpoint
    from nanochat.engine import Engine, SamplingParams

    ckpt = load_checkpoint(resolve_checkpoint(None))
    ids = ckpt.tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt}]})
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Engine(ckpt.model, ckpt.tokenizer).generate_batch(ids, params)[0].text


# ---- nanochat chat -----------------------------------------------------------------------------


def test_chat_one_shot_subprocess_streams_the_engines_greedy_answer(use_chat_base):
    proc = _run(["chat", "-p", "hello", "--max-tokens", "8", "--temperature", "0"], use_chat_base)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _expected_greedy("hello", 8) + "\n"
    assert proc.stdout.strip()
    assert "loaded base checkpoint d2 step 1" in proc.stderr


def test_chat_repl_subprocess_handles_commands(use_chat_base):
    script = "hello\n/help\n/clear\nhi again\n/bogus\n/quit\nnever read\n"
    proc = _run(["chat", "--max-tokens", "4", "--temperature", "0"], use_chat_base, stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "/clear" in proc.stdout and "/quit" in proc.stdout  # the help text
    assert "(conversation cleared)" in proc.stdout
    assert "unknown command /bogus" in proc.stdout


def test_chat_without_checkpoint_exits_2_naming_the_command(tmp_path):
    proc = _run(["chat", "-p", "hello"], tmp_path / "empty_base")
    assert proc.returncode == 2
    assert "nanochat run --preset tiny" in proc.stderr
    assert "nanochat train pretrain" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chat_same_seed_same_answer_in_process(use_chat_base, capsys):
    args = [
        "chat",
        "-p",
        "tell me",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "--top-k",
        "0",
    ]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert cli_main(args) == 0
    assert capsys.readouterr().out == first


def test_chat_checkpoint_flag_accepts_stage_and_path(use_chat_base, capsys):
    path = use_chat_base / "checkpoints" / "base" / "d2" / "step_000001"
    for spec in ("base", str(path), str(path.parent)):
        assert (
            cli_main(["chat", "-p", "x", "--max-tokens", "2", "--temperature", "0", "--checkpoint", spec])
            == 0
        )
    assert cli_main(["chat", "-p", "x", "--checkpoint", "sft"]) == 2
    assert "nanochat train sft" in capsys.readouterr().err


def test_chat_rejects_bad_sampling_flags(use_chat_base, capsys):
    assert cli_main(["chat", "-p", "x", "--top-p", "2"]) == 2
    assert "invalid sampling options: --top-p" in capsys.readouterr().err
    assert cli_main(["chat", "-p", "x", "--max-tokens", "0"]) == 2
    assert "--max-tokens" in capsys.readouterr().err


def _session(system: str | None = None):
    from nanochat.commands.chat import _sampling_params, load_session

    args = argparse.Namespace(
        checkpoint=None,
        device="cpu",
        system=system,
        max_tokens=6,
        temperature=0.0,
        top_k=None,
        top_p=None,
        seed=None,
    )
    assert _sampling_params(args).temperature == 0
    return load_session(args)


def test_chat_session_keeps_multi_turn_state_and_clears(use_chat_base):
    session = _session()
    tok = session.tokenizer
    out = io.StringIO()
    first = session.reply("hello", out)
    after_first = list(session.tokens)
    second = session.reply("and again", out)
    assert out.getvalue() == first + second
    S = tok.encode_special
    assert session.tokens[: len(after_first)] == after_first  # history is kept verbatim
    assert session.tokens.count(S("<|user_start|>")) == 2
    assert session.tokens.count(S("<|assistant_end|>")) == 2
    assert session.tokens[-1] == S("<|assistant_end|>")
    assert session.tokens[0] == tok.get_bos_token_id()
    session.clear()
    assert session.tokens == [tok.get_bos_token_id()]
    assert session.reply("hello", io.StringIO()) == first  # greedy: same state, same answer


def test_chat_session_merges_system_prompt_into_first_user_turn(use_chat_base):
    session = _session(system="be brief")
    tok = session.tokenizer
    session.reply("hello", io.StringIO())
    expected = tok.render_for_completion({"messages": [{"role": "user", "content": "be brief\n\nhello"}]})
    assert session.tokens[: len(expected)] == expected
    session.reply("more", io.StringIO())
    second_turn = session.tokens[session.tokens.index(tok.encode_special("<|assistant_end|>")) + 1 :]
    assert tok.decode(second_turn).startswith("<|user_start|>more<|user_end|>")


def test_spinner_is_silent_without_a_tty_and_spins_on_one():
    from nanochat.commands.chat import spinner

    plain = io.StringIO()
    with spinner("loading", plain):
        pass
    assert plain.getvalue() == ""

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = FakeTTY()
    import time

    with spinner("loading", tty):
        time.sleep(0.35)
    assert "loading" in tty.getvalue()
    assert tty.getvalue().endswith("\r")  # the line is wiped afterwards


# ---- nanochat tok ------------------------------------------------------------------------------


def test_tok_train_input_then_eval_subprocess(tmp_path):
    base = tmp_path / "base"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_corpus_text())
    proc = _run(["tok", "train", "--input", str(corpus), "--vocab-size", "600", "--doc-cap", "2000"], base)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((base / "tokenizer" / "tok_train.json").read_text())
    assert summary["vocab_size"] == 600
    assert summary["chars"] == len(corpus.read_text())
    assert summary["documents"] > 1 and summary["source"] == str(corpus)
    assert {"seconds", "fingerprint", "doc_cap", "max_chars"} <= set(summary)

    proc = _run(["tok", "eval", "--timeout", "3"], base)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((base / "tokenizer" / "tok_eval.json").read_text())
    kinds = [row["text"] for row in result["rows"]]
    assert {"news", "code", "math", "multilingual"} <= set(kinds)
    assert all(row["ours"]["ratio"] > 1.0 for row in result["rows"])
    for name in ("gpt2", "cl100k_base"):
        if result["baselines"][name]:
            assert all(row[name]["ratio"] > 1.0 for row in result["rows"])
        else:
            assert f"{name}: not available offline" in proc.stdout


def test_tok_eval_offline_flag_skips_baselines_and_includes_shards(base_dir, capsys):
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer_eval import SAMPLE_TEXTS

    Tokenizer.train_from_iterator([_corpus_text()], vocab_size=400).save()
    _write_shards(base_dir / "data" / "builtin", ["alpha beta gamma " * 20, "delta epsilon " * 20])
    assert cli_main(["tok", "eval", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "gpt2: not available offline" in out and "cl100k_base: not available offline" in out
    rows = json.loads((base_dir / "tokenizer" / "tok_eval.json").read_text())["rows"]
    assert [r["text"] for r in rows] == [*SAMPLE_TEXTS, "train-shard", "val-shard"]
    assert all(r["gpt2"] is None for r in rows)


def _write_shards(directory: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        pq.write_table(pa.table({"text": [doc, doc.upper()]}), directory / f"shard_{i:05d}.parquet")


def test_tok_train_without_shards_names_the_prepare_command(base_dir, capsys):
    assert cli_main(["tok", "train", "--set", "data.source=fineweb-edu"]) == 2
    err = capsys.readouterr().err
    assert "nanochat data prepare" in err and "--input" in err


def test_tok_train_reads_jsonl_and_parquet_inputs(base_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat.tokenizer import Tokenizer

    lines = _corpus_text().splitlines()
    half = len(lines) // 2
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in lines[:half] if line) + "\n")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": lines[half:]}), parquet)
    out = tmp_path / "tok_out"
    assert (
        cli_main(
            ["tok", "train", "--input", str(jsonl), str(parquet), "--vocab-size", "400", "--output", str(out)]
        )
        == 0
    )
    assert Tokenizer.load(out).vocab_size == 400
    summary = json.loads((out / "tok_train.json").read_text())
    assert summary["documents"] == len([x for x in lines[:half] if x]) + len(lines[half:])


def test_tok_train_bad_inputs_are_clear_errors(base_dir, tmp_path, capsys):
    assert cli_main(["tok", "train", "--input", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    assert cli_main(["tok", "train", "--input", str(bad)]) == 2
    assert "bad.jsonl line 2" in capsys.readouterr().err


def test_tok_train_caps_documents_and_total_chars(base_dir, tmp_path):
    from nanochat.tokenizer_train import chunk_lines, iter_input_files

    text = "line one\nline two is longer\n" * 50
    chunks = list(chunk_lines(text, 30))
    assert "".join(chunks) == text and all(len(c) <= 30 for c in chunks)
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert "".join(iter_input_files([f], doc_cap=100)) == text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_corpus_text())
    assert (
        cli_main(["tok", "train", "--input", str(corpus), "--vocab-size", "300", "--max-chars", "20000"]) == 0
    )
    summary = json.loads((base_dir / "tokenizer" / "tok_train.json").read_text())
    assert 20000 <= summary["chars"] < 20000 + 10_000


def test_ctrl_c_stops_the_answer_but_keeps_the_repl_and_a_closed_turn(use_chat_base):
    from nanochat.commands.chat import repl

    session = _session()

    class InterruptFirstToken(io.StringIO):
        fired = False

        def write(self, s: str) -> int:
            if s.strip() and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
            return super().write(s)

    out = InterruptFirstToken()
    assert repl(session, io.StringIO("hello\nhello\n"), out) == 0
    assert out.fired and " (interrupted)" in out.getvalue()
    end = session.tokenizer.encode_special("<|assistant_end|>")
    assert session.turns == 2 and session.tokens.count(end) == 2 and session.tokens[-1] == end
    assert not session.engine.has_work()  # the interrupted request's slot was freed


def test_tok_train_on_the_presets_builtin_shards(base_dir, capsys):
    assert cli_main(["tok", "train", "--preset", "tiny", "--max-chars", "100000", "--vocab-size", "512"]) == 0
    summary = json.loads((base_dir / "tokenizer" / "tok_train.json").read_text())
    assert summary["source"] == "data/builtin" and summary["vocab_size"] == 512
    assert summary["chars"] >= 100_000
    assert sorted((base_dir / "data" / "builtin").glob("shard_*.parquet"))


def test_answer_once_streams_the_greedy_answer(use_chat_base):
    from nanochat.commands.chat import answer_once

    out = io.StringIO()
    text = answer_once(None, "hello", temperature=0.0, max_tokens=8, out=out)
    assert text == _expected_greedy("hello", 8)
    assert out.getvalue() == text + "\n"


def test_library_train_and_evaluate_tokenizer(base_dir, tmp_path):
    from nanochat.tokenizer_eval import evaluate_tokenizer
    from nanochat.tokenizer_train import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text(_corpus_text())
    summary = train_tokenizer(inputs=[corpus], vocab_size=320)
    assert summary["vocab_size"] == 320 and summary["path"] == str(base_dir / "tokenizer")
    result = evaluate_tokenizer(offline=True, echo=False)
    assert result == json.loads((base_dir / "tokenizer" / "tok_eval.json").read_text())
    assert result["baselines"] == {"gpt2": False, "cl100k_base": False}


# ---- context budget and tool display (issue 10 items 11, 15) -------------------------------------


def test_chat_default_max_tokens_answers_from_the_whole_question(use_chat_base, capsys):
    # --max-tokens defaults to 256 > the 128-token context: it used to evict all but 1 prompt token
    question = "What is two plus two?"
    assert cli_main(["chat", "-p", question, "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    from nanochat.checkpoint import load_checkpoint, resolve_checkpoint

    tok = load_checkpoint(resolve_checkpoint(None)).tokenizer
    ids = tok.render_for_completion({"messages": [{"role": "user", "content": question}]})
    assert out == _expected_greedy(question, 128 - len(ids)) + "\n"
    assert "does not fit" not in err and "keeping" not in err and "dropped" not in err


def test_long_conversation_drops_earliest_exchanges_keeping_the_first(use_chat_base):
    from nanochat.engine import answer_room

    session = _session(system="be brief")  # max_tokens 6
    questions = [f"question {i}: " + "tell me about the quick brown fox " * 2 for i in range(6)]
    err = io.StringIO()
    for q in questions:
        session.reply(q, io.StringIO(), err)
        assert len(session.tokens) <= 128  # what the model saw fit, with room for the answer
    kept = [t.user for t in session.history]
    assert kept[0] == questions[0] and kept[-1] == questions[-1]  # first (system) and newest exchange kept
    assert kept == [questions[0], *questions[len(questions) - len(kept) + 1 :]]  # the earliest others dropped
    assert len(kept) < len(questions) and "(context full: dropped the" in err.getvalue()
    tok = session.tokenizer
    first = tok.render_for_completion({"messages": [{"role": "user", "content": f"be brief\n\n{questions[0]}"}]})
    assert session.tokens[: len(first)] == first
    assert len(session.tokens) - len(session.history[-1].answer) + answer_room(6, 128) <= 128


def test_a_message_too_long_for_the_context_is_refused_and_the_repl_goes_on(use_chat_base, capsys):
    from nanochat.commands.chat import repl

    session = _session()
    out = io.StringIO()
    assert repl(session, io.StringIO("tell me " * 200 + "\nhello\n"), out) == 0
    assert "shorten the message" in capsys.readouterr().err
    assert [t.user for t in session.history] == ["hello"]


def test_calculator_calls_are_shown_readably_and_kept_exactly_in_the_history(tiny_tokenizer, tiny_model_factory):
    from nanochat.commands.chat import ChatSession
    from nanochat.engine import Engine, SamplingParams

    tok = tiny_tokenizer
    S = tok.encode_special
    byte = lambda ch: tok.enc.encode_single_token(ch.encode())  # noqa: E731
    script = [(S("<|assistant_start|>"), S("<|python_start|>")), (S("<|python_start|>"), byte("3")),
              (byte("3"), byte("+")), (byte("+"), byte("4")), (byte("4"), S("<|python_end|>")),
              (S("<|output_end|>"), byte("k")), (byte("k"), S("<|assistant_end|>"))]
    model = scripted_model(tiny_model_factory, script)
    session = ChatSession(Engine(model, tok, max_batch_size=1), tok, SamplingParams(max_tokens=20, temperature=0))
    out = io.StringIO()
    shown = session.reply("what is 3+4?", out)
    assert out.getvalue() == shown == "[calculator] 3+4 = 7\nk"
    assert session.history[0].answer == [S("<|python_start|>"), byte("3"), byte("+"), byte("4"), S("<|python_end|>"),
                                         S("<|output_start|>"), *tok.encode("7"), S("<|output_end|>"), byte("k"),
                                         S("<|assistant_end|>")]


def test_tool_view_shows_refused_and_interrupted_calls_and_dims_on_a_terminal(tiny_tokenizer):
    from nanochat.commands.chat import ToolView

    tok = tiny_tokenizer
    S = tok.encode_special
    view = ToolView(tok)
    out = io.StringIO()
    shown = view.start(out)
    for token, text in [(1, "so "), (S("<|python_start|>"), ""), (2, "x*y"), (S("<|python_end|>"), ""), (3, "ok")]:
        view.push(token, text)
    view.push(S("<|python_start|>"), "")
    view.push(4, "1+")
    view.finish()  # interrupted inside a call
    assert "".join(shown) == out.getvalue() == "so \n[calculator] x*y (no result)\nok\n[calculator] 1+ (no result)\n"

    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = TTY()
    shown = view.start(tty)
    for token, text in [(S("<|python_start|>"), ""), (2, "2+2"), (S("<|python_end|>"), ""),
                        (S("<|output_start|>"), ""), (5, "4"), (S("<|output_end|>"), "")]:
        view.push(token, text)
    assert tty.getvalue() == "\033[2m[calculator] 2+2 = 4\033[0m\n" and "".join(shown) == "[calculator] 2+2 = 4\n"
