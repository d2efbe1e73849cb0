"""``nanochat tok train|eval``: train the BPE tokenizer and measure its compression.

Wiring only: training is :mod:`nanochat.tokenizer_train`, the compression table
:mod:`nanochat.tokenizer_eval` (see docs/tokenizer.md).
"""

from __future__ import annotations

import argparse

from nanochat.commands.config import add_preset_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tok", help="train / evaluate the BPE tokenizer")
    tsub = p.add_subparsers(dest="tok_command", metavar="ACTION", required=True)

    train = tsub.add_parser("train", help="train the tokenizer on the preset's data or --input files")
    add_preset_args(train)
    train.add_argument("--vocab-size", type=int, help="total vocab incl. 9 special tokens (default: preset)")
    train.add_argument("--max-chars", type=int, help="stop after this many characters (default: preset)")
    train.add_argument(
        "--doc-cap", type=int, help="truncate each document to this many chars (default: preset)"
    )
    train.add_argument(
        "--input", nargs="+", metavar="FILE", help="train on these .txt/.jsonl/.parquet files instead"
    )
    train.add_argument(
        "--output", metavar="DIR", help="where to save (default: $NANOCHAT_BASE_DIR/tokenizer)"
    )
    train.set_defaults(func=_train)

    ev = tsub.add_parser("eval", help="compression ratio vs tiktoken gpt2 / cl100k_base")
    add_preset_args(ev)
    ev.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer dir (default: $NANOCHAT_BASE_DIR/tokenizer)"
    )
    ev.add_argument("--offline", action="store_true", help="skip the tiktoken baselines")
    ev.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a baseline download")
    ev.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from nanochat.config import load_preset
    from nanochat.tokenizer_train import train_tokenizer

    summary = train_tokenizer(
        load_preset(args.preset, args.overrides),
        inputs=args.input,
        vocab_size=args.vocab_size,
        max_chars=args.max_chars,
        doc_cap=args.doc_cap,
        out_dir=args.output,
    )
    print(
        f"trained tokenizer: vocab {summary['vocab_size']:,} on {summary['chars']:,} chars "
        f"({summary['documents']:,} docs) in {summary['seconds']:.1f}s -> {summary['path']}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from nanochat.config import load_preset
    from nanochat.tokenizer_eval import evaluate_tokenizer

    preset = load_preset(args.preset, args.overrides)
    evaluate_tokenizer(args.tokenizer, preset, offline=args.offline, timeout=args.timeout)
    return 0
