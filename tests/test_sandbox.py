"""The code sandbox: normal programs run, and an attack list neither escapes nor hangs."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from nanochat.eval.sandbox import ExecutionResult, execute_code


def run(code: str, **kwargs) -> ExecutionResult:
    kwargs.setdefault("timeout", 3.0)
    return execute_code(code, **kwargs)


# --- normal programs --------------------------------------------------------------------------


def test_program_output_is_captured():
    result = run("print('hello'); import sys; print('warn', file=sys.stderr)")
    assert result.success and result.error is None
    assert result.stdout == "hello\n"
    assert "warn" in result.stderr


def test_humaneval_style_program_passes_and_failing_assert_fails():
    program = "def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n"
    assert run(program).success
    wrong = run(program.replace("a + b", "a - b"))
    assert not wrong.success and wrong.error.startswith("AssertionError")


def test_exception_becomes_error_with_type_and_message():
    result = run("raise ValueError('boom')")
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert result.error == "ValueError: boom"
    assert "Traceback" in result.stderr


def test_tricky_quoting_and_unicode_survive():
    code = 'print("it\'s \\"quoted\\"", \'\'\'triple\'\'\', "naïve 日本 🎉")'
    result = run(code)
    assert result.success, result
    assert result.stdout == "it's \"quoted\" triple naïve 日本 🎉\n"


def test_program_sees_fresh_globals():
    result = run("print(sorted(k for k in globals() if not k.startswith('__')))")
    assert result.stdout.strip() == "[]"


def test_stdlib_and_numpy_work_inside():
    assert run("import json, re, math, collections, itertools, heapq, fractions; print(json.dumps([1]))").success
    result = run("import numpy as np; print(int(np.arange(5).sum()))")
    assert result.success and result.stdout == "10\n", result


def test_files_written_stay_in_the_temp_dir_which_is_deleted():
    result = run("import os; open('out.txt', 'w').write('x'); print(os.getcwd())")
    assert result.success, result
    workdir = Path(result.stdout.strip())
    assert workdir.name.startswith("nanochat-sandbox-")
    assert not workdir.exists()


def test_sys_exit_before_the_end_is_not_success():
    result = run("import sys; sys.exit(0)\nassert False")
    assert not result.success and "SystemExit" in result.error


def test_input_fails_because_stdin_is_closed():
    result = run("input()")
    assert not result.success and "EOFError" in result.error


def test_output_is_capped():
    result = run("print('x' * 5_000_000)", max_output_bytes=10_000)
    assert result.success
    assert len(result.stdout) < 11_000 and result.stdout.endswith("[output truncated]\n")


# --- limits -------------------------------------------------------------------------------------


def test_infinite_loop_times_out():
    result = run("while True: pass", timeout=1.0)
    assert result.timeout and not result.success
    assert "timed out" in result.error


def test_sleeping_program_is_killed_at_wall_timeout():
    result = run("import time; time.sleep(60)", timeout=1.0)
    assert result.timeout and not result.success


def test_huge_allocation_reports_memory_exceeded():
    result = run("x = bytearray(1 << 31)", memory_mb=256)
    assert result.memory_exceeded and not result.success and not result.timeout


def test_growing_list_reports_memory_exceeded():
    result = run("x = []\nwhile True: x.append(' ' * 10_000_000)", memory_mb=128, timeout=10.0)
    assert result.memory_exceeded and not result.success


# --- attacks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()",
        "import os\nos.system('echo pwned')",
        "import subprocess\nsubprocess.run(['echo', 'pwned'])",
        "import subprocess\nsubprocess.Popen(['echo', 'pwned'])",
        "import _posixsubprocess",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import pty\npty.spawn('/bin/sh')",
        "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
        "import os\nos.posix_spawn('/bin/echo', ['echo', 'pwned'], {})",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import ctypes\nctypes.pythonapi.fork()",
    ],
    ids=["fork-bomb", "os.system", "subprocess.run", "Popen", "posixsubprocess", "multiprocessing", "pty",
         "execv", "posix_spawn", "ctypes-libc", "ctypes-pythonapi"],
)
def test_process_creation_is_refused(code):
    result = run(code)
    assert not result.success and not result.timeout, result
    assert "pwned" not in result.stdout


def test_kill_of_parent_is_refused():
    result = run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert not result.success


@pytest.fixture
def canary_dir(tmp_path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    return d


@pytest.mark.parametrize(
    "template",
    [
        "import shutil\nshutil.rmtree({d!r})",
        "import os\nos.remove({f!r})",
        "import os\nos.unlink({f!r})",
        "import os\nos.rename({f!r}, {f!r} + '.moved')",
        "import os\nos.system('rm -rf ' + {d!r})",
        "import os\nfor root, dirs, files in os.walk({d!r}):\n    [os.remove(os.path.join(root, x)) for x in files]",
        "import pathlib\npathlib.Path({f!r}).unlink()",
        "import pathlib\npathlib.Path({f!r}).write_text('overwritten')",
        "open({f!r}, 'w').write('overwritten')",
        "open({f!r}, 'a').write('appended')",
        "import os\nfd = os.open({f!r}, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'x')",
        "import os\nos.chdir('..')\nos.symlink({f!r}, 'link')",
        "import os\nos.symlink({f!r}, 'link')\nopen('link', 'w').write('overwritten')",
    ],
    ids=["rmtree", "remove", "unlink", "rename", "rm-rf", "walk-remove", "pathlib-unlink", "pathlib-write",
         "open-w", "open-a", "os.open", "chdir-up", "symlink"],
)
def test_files_outside_the_temp_dir_survive(canary_dir, template):
    keep = canary_dir / "keep.txt"
    result = run(template.format(d=str(canary_dir), f=str(keep)))
    assert not result.success, result
    assert keep.read_text() == "precious"
    assert sorted(p.name for p in canary_dir.iterdir()) == ["keep.txt"]


def test_writing_a_new_file_outside_the_temp_dir_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')")
    assert not result.success and "not allowed" in result.error
    assert not target.exists()


def test_reading_files_outside_python_and_the_temp_dir_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    result = run(f"print(open({str(secret)!r}).read())")
    assert not result.success and "s3cret" not in result.stdout


def test_environment_secrets_do_not_leak(monkeypatch):
    monkeypatch.setenv("NANOCHAT_CANARY_SECRET", "hunter2-canary")
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for path in ['/proc/self/environ', '/proc/%d/environ' % os.getppid(), '/proc/1/environ']:\n"
        "    try:\n"
        "        print(open(path, 'rb').read())\n"
        "    except Exception as e:\n"
        "        print('refused', path, type(e).__name__)\n"
    )
    result = run(code)
    assert "hunter2-canary" not in result.stdout + result.stderr
    assert "NANOCHAT_CANARY_SECRET" not in result.stdout


def test_network_connection_to_a_local_server_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5.0)
    port = server.getsockname()[1]
    accepted: list[bool] = []

    def accept() -> None:
        try:
            conn, _ = server.accept()
            accepted.append(True)
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        code = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'leak')\n"
            "print('connected')\n"
        )
        result = run(code)
        assert not result.success and not result.timeout
        assert "connected" not in result.stdout
    finally:
        server.close()
        thread.join(timeout=6)
    assert not accepted


def test_raising_resource_limits_is_refused():
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"
    assert not run(code).success


def test_program_cannot_fake_success_through_the_bootstrap():
    code = "import sys\nm = sys.modules['__main__']\nprint(hasattr(m, 'finish') or hasattr(m, 'report'))"
    result = run(code)
    assert result.stdout.strip() == "False"
