"""``nanochat checkpoint list|show|import-nanochat``: inspect and convert checkpoints.

Wiring over :mod:`nanochat.checkpoint`: ``list`` prints every complete checkpoint under
``$NANOCHAT_BASE_DIR/checkpoints``, ``show`` prints one checkpoint's ``meta.json``, and
``import-nanochat`` converts a karpathy/nanochat checkpoint directory into our format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanochat.stages import CHECKPOINT_STAGES as STAGES  # torch-free: `nanochat --help` stays fast


def _list(args: argparse.Namespace) -> int:
    from nanochat.checkpoint import checkpoint_tag, list_checkpoints, read_meta

    stages = [args.stage] if args.stage else list(STAGES)
    rows = []
    for stage in stages:
        for path in list_checkpoints(stage):
            meta = read_meta(path)
            metrics = meta.get("metrics") or {}
            metric = next((f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float)), "")
            rows.append(
                (stage, checkpoint_tag(path, meta), str(meta.get("step", "?")), metric, str(path))
            )
    if not rows:
        print("no checkpoints yet; make one with `nanochat run --preset tiny` or `nanochat train pretrain`")
        return 0
    widths = [max(len(r[i]) for r in rows + [("stage", "tag", "step", "metric", "path")]) for i in range(5)]
    for row in [("stage", "tag", "step", "metric", "path"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    from nanochat.checkpoint import MODEL_FILE, read_meta, resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    meta = read_meta(path)
    model_file = path / MODEL_FILE
    info = {"path": str(path), "model_bytes": model_file.stat().st_size if model_file.exists() else None}
    print(json.dumps({**info, **meta}, indent=2, default=str))
    return 0


def _import(args: argparse.Namespace) -> int:
    from nanochat.checkpoint import import_nanochat, read_meta

    out = import_nanochat(args.src, args.dst, step=args.step, tokenizer_dir=args.tokenizer, stage=args.stage)
    meta = read_meta(out)
    cfg = meta["model_config"]
    print(
        f"imported {args.src} step {meta['step']} (n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']}, "
        f"vocab {cfg['vocab_size']}) -> {out}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="list, inspect and import checkpoints")
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    ls = csub.add_parser("list", help="list complete checkpoints under $NANOCHAT_BASE_DIR/checkpoints")
    ls.add_argument("--stage", choices=STAGES, help="only this stage")
    ls.set_defaults(func=_list)

    show = csub.add_parser("show", help="print a checkpoint's meta.json")
    show.add_argument(
        "checkpoint", nargs="?", help="dir, tag dir or stage name (default: latest sft/mid/base)"
    )
    show.set_defaults(func=_show)

    imp = csub.add_parser("import-nanochat", help="convert a karpathy/nanochat checkpoint dir into ours")
    imp.add_argument("src", type=Path, help="nanochat dir with model_<step>.pt and meta_<step>.json")
    imp.add_argument("dst", type=Path, help="output checkpoint directory")
    imp.add_argument("--step", type=int, help="which step (default: the highest)")
    imp.add_argument(
        "--tokenizer", type=Path, help="dir with nanochat's tokenizer.pkl (default: SRC/../../tokenizer)"
    )
    imp.add_argument(
        "--stage", choices=STAGES, default="base", help="stage recorded in meta.json (default base)"
    )
    imp.set_defaults(func=_import)

    from nanochat.commands.export import add_import_hf_parser  # issue 13: the Hugging Face format

    add_import_hf_parser(csub)
