"""Run karpathy/nanochat's own ``Engine.generate`` (batch 1, greedy) on given weights; one JSON line out.

Not part of the product and never imported by it: ``bench_decode.py`` runs this file with the
Python of a nanochat checkout's venv (``--nanochat-python``), passing a JSON spec: the checkout
dir, a ``torch.save``'d state dict under nanochat's names, the model config, the tokenizer
(pattern, ranks, special ids; nanochat's engine needs special ids and, for its calculator,
encode/decode), the prompt and the timing settings. Tokens/s count the decode steps after the
first yielded token (which comes from the prefill), exactly as bench_decode counts ours.

    python nanochat_engine_run.py SPEC.json
"""

from __future__ import annotations

import json
import sys
import time


class TiktokenTokenizer:
    """The few tokenizer methods nanochat's Engine calls, over a tiktoken encoding."""

    def __init__(self, spec: dict):
        import tiktoken

        ranks = {bytes.fromhex(h): r for h, r in spec["ranks"]}
        self.enc = tiktoken.Encoding(name="bench", pat_str=spec["pattern"], mergeable_ranks=ranks,
                                     special_tokens=spec["specials"])
        self.specials = spec["specials"]

    def encode_special(self, text: str) -> int:
        return self.specials[text]

    def get_bos_token_id(self) -> int:
        return self.specials["<|bos|>"]

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    sys.path.insert(0, spec["nanochat_dir"])
    import torch
    from nanochat.gpt import GPT, GPTConfig

    from nanochat.engine import Engine

    torch.set_num_threads(spec["threads"])
    model = GPT(GPTConfig(**spec["config"]))
    model.load_state_dict(torch.load(spec["weights"]), strict=True)
    model.eval()
    engine = Engine(model, TiktokenTokenizer(spec["tokenizer"]))
    clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    best, ids = 0.0, None
    for _ in range(spec["repeat"] + 1):  # the first run warms up
        out, start = [], 0.0
        for column, _masks in engine.generate(spec["prompt"], num_samples=1, max_tokens=spec["new_tokens"],
                                              temperature=0.0):
            out.append(column[0])
            if len(out) == 1:
                start = clock()
            if len(out) == spec["new_tokens"]:
                break
        seconds = clock() - start
        if ids is not None:
            best = max(best, (len(out) - 1) / seconds)
        ids = out
    print(json.dumps({"tok_s": round(best, 1), "ids": ids}))


if __name__ == "__main__":
    main()
