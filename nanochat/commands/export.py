"""``nanochat export hf`` and ``nanochat checkpoint import-hf``: the Hugging Face format both ways.

Wiring over :mod:`nanochat.interop` (docs/interop.md). ``export hf CHECKPOINT OUT_DIR`` writes a
directory transformers, vLLM and lm-evaluation-harness load with no custom code; ``checkpoint import-hf
DIR`` (or ``--download REPO_ID``) turns such a directory into our checkpoint. The ``import-hf`` parser is
added to the ``checkpoint`` group by :func:`add_import_hf_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanochat.stages import CHECKPOINT_STAGES  # torch-free: `nanochat --help` stays fast


def _export_hf(args: argparse.Namespace) -> int:
    from nanochat.checkpoint import resolve_checkpoint
    from nanochat.interop.hf_export import export_hf

    source = resolve_checkpoint(args.checkpoint)
    out = export_hf(source, args.out_dir, dtype=args.dtype, overwrite=args.force)
    print(
        f"exported {source} -> {out} ({args.dtype}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained('{out}')"
    )
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from nanochat.common import NanochatError
    from nanochat.interop.hf_import import download_hf, import_hf

    if bool(args.src) == bool(args.download):
        raise NanochatError("give either a local directory DIR or --download REPO_ID (not both, not neither)")
    src = download_hf(args.download, revision=args.revision) if args.download else args.src
    out = import_hf(
        src,
        args.out,
        stage=args.stage,
        tag=args.tag,
        rotary=args.rotary,
        overwrite=args.force,
        origin=args.download,
    )
    print(
        f"imported {args.download or src} -> {out} (stage {args.stage}); chat with "
        f"`nanochat chat --checkpoint {out}`"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to another format (hf: transformers/vLLM directory)"
    )
    esub = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    hf = esub.add_parser(
        "hf",
        help="write a transformers NanoChatForCausalLM directory (model, tokenizer, chat template, card)",
        description="Write CHECKPOINT as a directory that transformers' AutoModelForCausalLM / AutoTokenizer "
        "load with no custom code (also vLLM, lm-evaluation-harness). Needs the 'hf' extra.",
    )
    hf.add_argument("checkpoint", help="checkpoint dir, tag dir or stage name (base|mid|sft: its latest)")
    hf.add_argument("out_dir", type=Path, help="output directory (must not exist unless --force)")
    hf.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weight dtype (default float32, exact; bfloat16 halves the size)",
    )
    hf.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    hf.set_defaults(func=_export_hf)


def add_import_hf_parser(csub: argparse._SubParsersAction) -> None:
    """Add ``import-hf`` to the ``nanochat checkpoint`` group."""
    imp = csub.add_parser(
        "import-hf",
        help="convert a transformers NanoChatForCausalLM directory (or hub repo) into our checkpoint",
        description="Read config.json, safetensors weights and tokenizer.json of a transformers 'nanochat' "
        "model and write our checkpoint (default checkpoints/<stage>/<tag>/step_000000). "
        "Needs the 'hf' extra.",
    )
    imp.add_argument("src", nargs="?", type=Path, help="local directory (e.g. a downloaded hub snapshot)")
    imp.add_argument("--download", metavar="REPO_ID", help="download this hub repo (owner/name) first")
    imp.add_argument("--revision", help="with --download: branch, tag or commit (default main)")
    imp.add_argument(
        "--stage",
        choices=CHECKPOINT_STAGES,
        default="base",
        help="stage to file it under: base (default; midtrain starts from it), mid (sft starts "
        "from it) or sft (chat/serve pick it first)",
    )
    imp.add_argument("--tag", help="checkpoint tag (default: the directory or repo name)")
    imp.add_argument(
        "--out", type=Path, help="output checkpoint directory (default: under $NANOCHAT_BASE_DIR)"
    )
    imp.add_argument(
        "--rotary",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="rotary tables: auto (as exported by nanochat, else fp32 like transformers)",
    )
    imp.add_argument("--force", action="store_true", help="replace the output checkpoint if it exists")
    imp.set_defaults(func=_import_hf)
