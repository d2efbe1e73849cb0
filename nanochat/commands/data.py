"""``nanochat data prepare|info``: write or download the pretraining shards, and describe them."""

from __future__ import annotations

import argparse
import json

from nanochat.commands.config import add_preset_args
from nanochat.config import load_preset
from nanochat.sources.pretrain import SOURCES, data_dir, list_shards, prepare, read_manifest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="pretraining data: prepare shards, show what is on disk")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prep = dsub.add_parser(
        "prepare",
        help="write the builtin shards or download fineweb-edu/climbmix shards (idempotent, resumable)",
    )
    add_preset_args(prep)
    prep.add_argument("--source", choices=SOURCES, help="data source (default: the preset's data.source)")
    prep.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="downloads: train shards 0..N-1 to fetch (-1 all); builtin: train shards to cut the corpus "
        "into (-1 auto). The val shard is always included. Default: the preset's data.num_shards",
    )
    prep.add_argument("--force", action="store_true", help="rewrite/re-download even when complete")
    prep.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_prepare)

    info = dsub.add_parser("info", help="show the shards and provenance of a prepared source")
    add_preset_args(info)
    info.add_argument("--source", choices=SOURCES)
    info.set_defaults(func=_info)


def _source_and_shards(args: argparse.Namespace) -> tuple[str, int]:
    preset = load_preset(args.preset, args.overrides)
    num_shards = getattr(args, "num_shards", None)
    return args.source or preset.data.source, preset.data.num_shards if num_shards is None else num_shards


def _prepare(args: argparse.Namespace) -> int:
    source, num_shards = _source_and_shards(args)
    out = prepare(source, num_shards=num_shards, force=args.force, workers=args.workers,
                  progress=not args.no_progress)
    train, val = list_shards(source, "train"), list_shards(source, "val")
    print(f"{source}: {len(train)} train shards + val {val[0].name} in {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    source, _ = _source_and_shards(args)
    manifest = read_manifest(source)
    shards = list_shards(source, "all")
    size = sum(p.stat().st_size for p in shards)
    print(f"source: {source}\ndir: {data_dir(source)}\nshards: {len(shards)} ({size / 1e6:.1f} MB), "
          f"val = {shards[-1].name}")
    if manifest:
        for key in ("num_docs", "num_chars", "created"):
            if key in manifest:
                print(f"{key}: {manifest[key]}")
        print("provenance: " + json.dumps(manifest.get("provenance", {}), indent=2)[:4000])
    return 0
