"""Run untrusted, model-written Python (HumanEval programs) in a locked-down child process.

Defences, outermost first (none is trusted alone):

1. A fresh interpreter (``python -I``) in its own session, killed as a whole process group when the
   wall-clock timeout passes; stdin is ``/dev/null``; stdout/stderr are read with a size cap.
2. A scrubbed environment (no parent variables, so no secrets) and a private temporary working
   directory that is deleted afterwards.
3. Resource limits set by the child before any user code runs: address space and data segment
   (``memory_mb``), CPU seconds, file size, open files, process count, no core dumps.
4. A private, empty network namespace when the kernel allows one (no interfaces but a down ``lo``).
5. An audit hook (``sys.addaudithook``; it cannot be removed once installed) that refuses process
   creation, signals, sockets, ``ctypes``, raising resource limits, writes outside the working
   directory and reads outside the Python installation and the working directory.
6. A reliability guard that disables destructive ``os``/``shutil``/``subprocess`` functions, in the
   spirit of the HumanEval harness, so that well-meaning but careless code fails fast and clearly.

This is a guard against accidents and casual abuse by generated code, not a security boundary for
hostile users: run evaluations on machines (or containers) you can afford to lose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

DEFAULT_MAX_OUTPUT_BYTES = 1 << 20  # per stream; the rest is drained and dropped
_STARTUP_GRACE_S = 0.5  # interpreter start-up is not charged to the program's time budget


@dataclass
class ExecutionResult:
    """What happened when a program ran in the sandbox."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self) -> str:
        fields = [f"success={self.success}"]
        if self.timeout:
            fields.append("timeout=True")
        if self.memory_exceeded:
            fields.append("memory_exceeded=True")
        if self.error:
            fields.append(f"error={self.error!r}")
        if self.stdout:
            fields.append(f"stdout={self.stdout[:200]!r}")
        if self.stderr:
            fields.append(f"stderr={self.stderr[:200]!r}")
        return f"ExecutionResult({', '.join(fields)})"


# The child's entry point. It runs with argv = [result_fd, workdir, timeout, memory_mb], reads the
# program from workdir, locks itself down, runs the program and reports one JSON line on result_fd.
_BOOTSTRAP = r'''
import builtins, json, math, os, sys
result_fd, workdir, timeout, memory_mb = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
report = os.fdopen(result_fd, "w")
program_path = os.path.join(workdir, ".program.py")
with open(program_path, encoding="utf-8") as f:
    program = f.read()
os.remove(program_path)

import resource
def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
limit(resource.RLIMIT_AS, memory_mb << 20)
limit(resource.RLIMIT_DATA, memory_mb << 20)
limit(resource.RLIMIT_CPU, int(math.ceil(timeout)) + 1)
limit(resource.RLIMIT_FSIZE, 16 << 20)
limit(resource.RLIMIT_NOFILE, 128)
limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_NPROC, 64)

def private_network():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    if os.geteuid() == 0 and libc.unshare(CLONE_NEWNET) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()

    def enter():  # unprivileged: a user namespace that maps our own ids, owning a new netns
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            return False
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        with open(os.path.join(workdir, ".probe"), "w") as f:  # files must still be creatable
            f.write("ok")
        os.remove(os.path.join(workdir, ".probe"))
        return True

    # Entering cannot be undone, so probe in a throwaway child first (some kernels and AppArmor
    # profiles allow the unshare but not the id maps, which would break file creation).
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if enter() else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return status == 0 and enter()
try:
    private_network()
except Exception:
    pass
# ctypes stays imported (numpy needs its types) but every ctypes.* audit event (dlopen, foreign
# calls, raw memory access) is refused below, so it cannot reach libc.
sys.modules.pop("resource", None)

workdir = os.path.realpath(workdir)
read_roots = {workdir, "/usr/lib", "/usr/share/zoneinfo", "/etc/localtime", "/dev/null", "/dev/urandom",
              f"/proc/{os.getpid()}"}
for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]:
    if p and os.path.isabs(p) and os.path.realpath(p) != "/":
        read_roots.add(os.path.realpath(p))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
DENIED = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "os.symlink", "os.link", "os.chroot", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
    "resource.prlimit", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "webbrowser.open", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "sys.remote_exec"})
PATH_EVENTS = frozenset({
    "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.mkdir", "os.chmod", "os.chown", "os.utime",
    "os.chflags", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.move", "shutil.copyfile",
    "shutil.copytree", "os.chdir"})
BLOCKED_MODULES = frozenset({"_posixsubprocess", "resource", "psutil",
                             "_xxsubinterpreters", "ipdb", "joblib", "tkinter"})

import stat
def audit(event, args, _denied=DENIED, _paths=PATH_EVENTS, _blocked=BLOCKED_MODULES,
          _read=tuple(r.rstrip("/") for r in read_roots), _write=(workdir, "/dev/null"), _home=(workdir,),
          _wflags=WRITE_FLAGS, _lstat=os.lstat, _readlink=os.readlink, _getcwd=os.getcwd, _islnk=stat.S_ISLNK,
          _fsdecode=os.fsdecode, _fspath=os.fspath, _str=str, _bytes=bytes, _int=int, _bool=bool,
          _isinstance=isinstance, _hasattr=hasattr, _err=PermissionError, _oserr=OSError):
    # Everything this hook uses is bound at definition time: user code cannot patch it.
    def deny(what):
        raise _err(f"sandbox: {what} is not allowed")

    def resolve(path):  # realpath from captured primitives (posixpath could be monkeypatched)
        if _isinstance(path, _int):
            return None
        path = "" + _fsdecode(_fspath(path))  # "" + forces a plain str (no overridden methods)
        if not path.startswith("/"):
            path = _getcwd() + "/" + path
        parts, todo, hops = [], path.split("/")[::-1], 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [part])
            try:
                mode = _lstat(candidate).st_mode
            except _oserr:
                parts.append(part)
                continue
            if _islnk(mode):
                hops += 1
                if hops > 40:
                    deny("a symlink loop")
                target = _readlink(candidate)
                if target.startswith("/"):
                    parts = []
                todo.extend(target.split("/")[::-1])
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def under(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    if event in _denied or event.startswith("ctypes."):
        deny(event)
    if event == "import":
        if args[0].split(".")[0] in _blocked:
            deny(f"import {args[0]}")
    elif event == "open":
        path, mode, flags = args
        target = resolve(path)
        if target is None:
            return
        writing = _bool((flags or 0) & _wflags)
        for c in "wax+":
            if mode is not None and c in "" + mode:
                writing = True
        if writing and not under(target, _write):
            deny(f"writing {target}")
        if not writing and not under(target, _read):
            deny(f"reading {target}")
    elif event in _paths:
        for arg in args[:2]:
            if _isinstance(arg, (_str, _bytes)) or _hasattr(arg, "__fspath__"):
                target = resolve(arg)
                if target is not None and not under(target, _home):
                    deny(f"{event} on {target}")

def disable(module, *names):
    for name in names:
        if hasattr(module, name):
            setattr(module, name, None)

import shutil, subprocess
subprocess._fork_exec = None  # the raw fork+exec primitive behind Popen
disable(os, "kill", "killpg", "system", "remove", "removedirs", "rmdir", "unlink",
        "rename", "renames", "replace", "truncate", "ftruncate", "fork", "forkpty", "fchdir", "chdir",
        "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "setuid", "setgid",
        "lchflags", "chflags", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp",
        "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "plock")
disable(shutil, "rmtree", "move", "chown")
disable(subprocess, "Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")
for name in BLOCKED_MODULES:
    sys.modules[name] = None
for name in ("exit", "quit", "help"):
    if hasattr(builtins, name):
        delattr(builtins, name)

sys.addaudithook(audit)
del audit, stat, p, read_roots
_dumps, _write, _flush = json.dumps, report.write, report.flush
def finish(**fields):
    _write(_dumps(fields) + "\n")
    _flush()
main = type(sys)("__main__")  # fresh globals; the bootstrap's own names stay out of reach
main.__builtins__ = builtins
sys.modules["__main__"] = main
try:
    exec(compile(program, "<program>", "exec"), main.__dict__)
except MemoryError:
    finish(status="memory", error="MemoryError: the program exceeded its memory limit")
    raise
except SystemExit as exc:
    finish(status="error", error=f"SystemExit({exc.code!r}): the program exited before finishing")
except BaseException as exc:
    finish(status="error", error=f"{type(exc).__name__}: {exc}")
    raise
else:
    finish(status="ok")
'''


def sandbox_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited from the parent."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def execute_code(
    code: str,
    timeout: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> ExecutionResult:
    """Run ``code`` as ``__main__`` in a sandboxed child and report what happened.

    ``success`` is true only if the program ran to its end without an exception, within
    ``timeout`` seconds (wall clock, after interpreter start-up) and ``memory_mb`` of address space.
    """
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    read_fd, write_fd = os.pipe()
    try:
        with open(os.path.join(workdir, ".program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        argv = [sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP, str(write_fd), workdir, str(timeout),
                str(memory_mb)]
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=sandbox_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        os.close(write_fd)
        write_fd = -1
        out, err, res = _CappedReader(proc.stdout, max_output_bytes), _CappedReader(
            proc.stderr, max_output_bytes
        ), _CappedReader(os.fdopen(read_fd, "rb"), 64 << 10)
        read_fd = -1
        timed_out = False
        try:
            proc.wait(timeout=timeout + _STARTUP_GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)
        proc.wait()
        stdout, stderr, report = out.result(), err.result(), res.result()
        return _interpret(proc.returncode, stdout, stderr, report, timed_out, timeout)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    """SIGKILL everything left in the child's session (it is the group leader)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _interpret(
    returncode: int, stdout: str, stderr: str, report: str, timed_out: bool, timeout: float
) -> ExecutionResult:
    last = report.strip().splitlines()[-1] if report.strip() else ""
    try:
        outcome = json.loads(last) if last else {}
    except json.JSONDecodeError:
        outcome = {}
    status = outcome.get("status")
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL) and status is None:
        return ExecutionResult(False, stdout, stderr, f"timed out after {timeout:g} s", timeout=True)
    memory_hint = any(s in stderr for s in ("MemoryError", "Cannot allocate memory", "std::bad_alloc"))
    if status == "memory" or (status is None and memory_hint):
        return ExecutionResult(False, stdout, stderr, "memory limit exceeded", memory_exceeded=True)
    if status == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    if status == "error":
        return ExecutionResult(False, stdout, stderr, outcome.get("error") or "the program failed")
    return ExecutionResult(
        False, stdout, stderr, f"the program ended without finishing (exit status {returncode})"
    )


class _CappedReader:
    """Drain a pipe on a thread, keeping at most ``cap`` bytes (so a flood cannot fill our memory)."""

    def __init__(self, stream, cap: int) -> None:
        self._stream, self._cap = stream, cap
        self._chunks: list[bytes] = []
        self._kept = 0
        self._truncated = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := self._stream.read1(65536) if hasattr(self._stream, "read1") else self._stream.read(65536):
                room = self._cap - self._kept
                if room > 0:
                    self._chunks.append(chunk[:room])
                    self._kept += min(room, len(chunk))
                if len(chunk) > room:
                    self._truncated = True
        except (OSError, ValueError):
            pass
        finally:
            try:
                self._stream.close()
            except OSError:
                pass

    def result(self) -> str:
        self._thread.join(timeout=5.0)
        text = b"".join(self._chunks).decode("utf-8", errors="replace")
        return text + "\n[output truncated]\n" if self._truncated else text
