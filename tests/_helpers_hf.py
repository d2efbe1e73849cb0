"""Test data and a fake Hugging Face hub for tests/test_hf_interop.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import torch

from nanochat.model import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer

# ~50 strings: prose, code, numbers, whitespace runs, unicode of several scripts, emoji (incl. ZWJ
# sequences), broken-looking bytes, and special-token strings appearing inside ordinary text.
VARIED = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t\t",
    " \n \n",
    "a",
    "A",
    "hello",
    " hello",
    "hello ",
    "Hello, World!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm here; you're there; they'll go; we've been; it's.",
    "DON'T SHOUT, I'LL HEAR YOU'RE",
    "12",
    "123",
    "1234567890",
    "3.14159 2.71828 -42 +7 1e-10 0x1F",
    "2024-11-28T13:45:00Z",
    "$1,000,000.00 (approx.)",
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n\tprint(i)",
    "if (a && b) { return c ?? d; } // comment",
    "SELECT * FROM t WHERE id = 3;",
    '<div class="x">hi</div>',
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "path/to/file.py:12:4: E501 line too long",
    "日本語のテキスト",
    "中文文本，标点符号。",
    "한국어 텍스트입니다",
    "Ωμέγα αλφάβητο",
    "Привет, мир!",
    "مرحبا بالعالم",
    "café naïve résumé coöperate",
    "emoji 🎉🚀 and flags 🇫🇷",
    "family 👩‍👩‍👧‍👦 zwj",
    "math ∑∫√∞ ≠ ≤ ≥",
    "tab\tseparated\tvalues\n1\t2\t3",
    "trailing spaces   \n  leading",
    "mixed\r\nline\rendings\n",
    "<|bos|>",
    "text <|user_start|> inside <|user_end|> text",
    "<|assistant_start|>answer<|assistant_end|>",
    "a<|python_start|>print(1)<|python_end|><|output_start|>1<|output_end|>b",
    "<|bos|><|bos|> twice",
    "almost special <|bos| and <bos|> and <|unknown|>",
    "😀" * 5 + "x" * 20,
    "ends with a newline\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
    [
        {"role": "user", "content": "Compute 12*7"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "12*7"},
                {"type": "python_output", "text": "84"},
                {"type": "text", "text": " It is 84."},
            ],
        },
        {"role": "user", "content": "Thanks. 日本語で？ 🎉"},
    ],
    [{"role": "user", "content": "code:\n```py\nx = 1\n```"}, {"role": "assistant", "content": "ok"}],
]


def tiny_gpt(tokenizer: Tokenizer, rotary_bf16: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = GPTConfig(
        sequence_len=128,
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        rotary_bf16=rotary_bf16,
    )
    model = build_model(config)
    with torch.no_grad():  # the reference init zeroes the head and residual projections: give them signal
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextlib.contextmanager
def fake_hub(repo: str, folder: Path) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server answering the hub API calls huggingface_hub makes for ``repo`` holding ``folder``'s
    files; yields its endpoint and the requests seen (``"GET /path"``)."""
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    seen: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            path = urlparse(self.path).path
            seen.append(f"{self.command} {path}")
            as_json = {"Content-Type": "application/json"}
            if path.startswith(f"/api/models/{repo}/revision/"):
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                return self._reply(200, json.dumps(info).encode(), as_json, head)
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self._reply(200, json.dumps(tree).encode(), as_json, head)
            name = path.removeprefix(f"/{repo}/resolve/{COMMIT}/")
            if name in files:
                etag = f'"{hashlib.sha256(files[name]).hexdigest()}"'
                return self._reply(200, files[name], {"X-Repo-Commit": COMMIT, "ETag": etag}, head)
            return self._reply(
                404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound", **as_json}, head
            )

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
