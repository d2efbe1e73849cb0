"""A local stand-in for the Hugging Face hub: real parquet/JSONL files behind a real HTTP server."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SMOLTALK_ROWS = [
    {"messages": [{"content": "You are terse.", "role": "system"}, {"content": "Name a color.", "role": "user"},
                  {"content": "Blue.", "role": "assistant"}], "source": "smol"},
    {"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"},
                  {"content": "Bye", "role": "user"}, {"content": "Goodbye.", "role": "assistant"}], "source": "smol"},
    {"messages": [{"content": "broken", "role": "assistant"}], "source": "bad"},  # skipped: starts with assistant
]
MMLU_ROWS = [
    {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Capital of France?", "subject": "geo", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 0},
]
ARC_ROWS = [
    {"id": "q1", "question": "Which is a mammal?",
     "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "q2", "question": "Water boils at?",
     "choices": {"text": ["50 C", "100 C", "0 C", "10 C"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "He has 3+4=<<3+4=7>>7.\n#### 7"},
    {"question": "Half of 1,000?", "answer": "1000/2=<<1000/2=500>>500\n#### 500"},
]
IDENTITY_LINES = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am a test bot."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
]

SPLITS = {
    ("HuggingFaceTB/smol-smoltalk", "default", "train"): SMOLTALK_ROWS,
    ("HuggingFaceTB/smol-smoltalk", "default", "test"): SMOLTALK_ROWS[:2],
    ("cais/mmlu", "all", "auxiliary_train"): MMLU_ROWS,
    ("cais/mmlu", "all", "test"): MMLU_ROWS[::-1],
    ("allenai/ai2_arc", "ARC-Easy", "train"): ARC_ROWS,
    ("allenai/ai2_arc", "ARC-Challenge", "train"): ARC_ROWS[:1],
    ("allenai/ai2_arc", "ARC-Easy", "test"): ARC_ROWS[1:],
    ("openai/gsm8k", "main", "train"): GSM8K_ROWS,
    ("openai/gsm8k", "main", "test"): GSM8K_ROWS[1:],
}


class FakeHub:
    """Serves ``root`` over HTTP on 127.0.0.1; counts requests by path."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        hub = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub.requests.append(self.path)
                super().do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_hub_tree(root: Path, url: str) -> None:
    """Write each split as two parquet shards plus the parquet-API JSON listing that points at them."""
    for (repo, config, split), rows in SPLITS.items():
        files = []
        halves = [rows[: len(rows) // 2 or 1], rows[len(rows) // 2 or 1 :]]
        for i, part in enumerate(h for h in halves if h):
            rel = f"files/{repo}/{config}/{split}/{i:04d}.parquet"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part), path)
            files.append(f"{url}/{rel}")
        listing = root / "api" / "datasets" / repo / "parquet" / config / split
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps(files))
    (root / "identity_conversations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in IDENTITY_LINES))
