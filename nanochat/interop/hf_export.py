"""``nanochat export hf``: a checkpoint as a transformers ``NanoChatForCausalLM`` directory.

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` without custom code, and in anything that reads that format
(vLLM's transformers backend, lm-evaluation-harness's ``hf`` model). Files: ``config.json``,
``generation_config.json``, ``model.safetensors`` (transformers' key names; our own GPTConfig in its
header, see :data:`CONFIG_METADATA_KEY`), ``tokenizer.json`` + ``tokenizer_config.json`` (with the chat
template) and a ``README.md`` model card with the run's metrics. Written atomically. Needs the ``hf``
extra (``tokenizers``), never ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nanochat.checkpoint import Checkpoint, load_checkpoint
from nanochat.common import atomic_directory, base_dir, get_logger
from nanochat.interop.hf_format import (
    CONFIG_FILE,
    CONFIG_METADATA_KEY,
    GENERATION_CONFIG_FILE,
    WEIGHTS_FILE,
    HFInteropError,
    hf_config,
    require,
    to_hf_state_dict,
)
from nanochat.interop.hf_tokenizer import BOS, EOS, PAD, write_hf_tokenizer

log = get_logger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
README_FILE = "README.md"


def export_hf(
    checkpoint: str | Path | Checkpoint, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write ``checkpoint`` (a directory or a loaded Checkpoint) as a transformers directory ``out_dir``.

    ``dtype``: ``float32`` (exact) or ``bfloat16`` (half the size; weights rounded). Raises HFInteropError
    when ``out_dir`` exists and ``overwrite`` is off, MissingExtraError without the ``hf`` extra, and
    CheckpointError for a bad checkpoint.
    """
    if dtype not in DTYPES:
        raise HFInteropError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    require("tokenizers", "`nanochat export hf`")  # fail before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise HFInteropError(
            f"{out_dir} already exists; choose another directory or pass --force to replace it"
        )
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    config, tokenizer = ckpt.config, ckpt.tokenizer
    torch_dtype = DTYPES[dtype]
    special = tokenizer.encode_special
    bos, eos, pad = tokenizer.get_bos_token_id(), special(EOS), special(PAD)
    tensors = to_hf_state_dict(ckpt.model.state_dict(), config, torch_dtype)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.model_dump())}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        _write_json(tmp / CONFIG_FILE, hf_config(config, bos, eos, pad, torch_dtype))
        # Generation stops where our engine does: at the end of an assistant turn or a new document.
        _write_json(
            tmp / GENERATION_CONFIG_FILE,
            {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": pad},
        )
        write_hf_tokenizer(tokenizer, tmp, config.sequence_len)
        (tmp / README_FILE).write_text(model_card(ckpt, dtype), encoding="utf-8")
    log.info("exported %s -> %s (%s)", ckpt.path, out_dir, dtype)
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---- model card ------------------------------------------------------------------------------------


def _run_root(path: Path) -> Path:
    """The ``$NANOCHAT_BASE_DIR`` a checkpoint belongs to (``<root>/checkpoints/<stage>/<tag>/step_N``)."""
    parents = path.resolve().parents
    if len(parents) > 3 and parents[2].name == "checkpoints":
        return parents[3]
    return base_dir()


def report_metrics(ckpt: Checkpoint) -> list[list[Any]]:
    """The run report's summary rows (``[metric, BASE, MID, SFT, RL]``) that have a value, for the card."""
    from nanochat import report

    try:
        run = report.collect(_run_root(ckpt.path), tag=ckpt.tag)
        rows = report.summary_rows(run)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as err:  # a partial run: the card just has fewer numbers
        log.warning("no report metrics for the model card: %s", err)
        return []
    return [row for row in rows if any(v is not None for v in row[1:])]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(ckpt: Checkpoint, dtype: str) -> str:
    """A short README.md: what the model is, its sizes, training metrics and evaluation results, usage."""
    c, meta = ckpt.config, ckpt.meta
    params = sum(p.numel() for p in ckpt.model.parameters())
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [nanochat]",
        "---",
        "",
        f"# {ckpt.tag}",
        "",
        f"A nanochat model (stage `{meta.get('stage')}`, step {meta.get('step')}) exported by "
        "`nanochat export hf` "
        f"in `{dtype}`. It runs as transformers' `NanoChatForCausalLM` with no custom code.",
        "",
        "| layers | width | heads | kv heads | vocab | context | parameters |",
        "|---|---|---|---|---|---|---|",
        f"| {c.n_layer} | {c.n_embd} | {c.n_head} | {c.n_kv_head} | {c.vocab_size} | {c.sequence_len} "
        f"| {params:,} |",
    ]
    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, int | float)}
    if metrics:
        lines += ["", "## Training metrics (at this checkpoint)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    rows = report_metrics(ckpt)
    if rows:
        lines += [
            "",
            "## Evaluation (from the run report)",
            "",
            "| metric | BASE | MID | SFT | RL |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,',
        '                              return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        f"Special tokens: `{BOS}` starts every document and conversation; generation stops at "
        f"`{EOS}` (end of the assistant turn) or `{BOS}`. Import it back with "
        "`nanochat checkpoint import-hf`.",
        "",
    ]
    return "\n".join(lines)
