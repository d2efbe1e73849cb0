"""``nanochat checkpoint import-hf``: a transformers ``NanoChatForCausalLM`` directory as our checkpoint.

Reads ``config.json``, the safetensors weights (one file or an index of shards) and ``tokenizer.json``
of a local directory (e.g. a downloaded hub snapshot, or ``nanochat export hf`` output) and writes a
checkpoint (model + tokenizer copy) that chat, evals, serve and mid-training/SFT take like any other.
Refuses, with UnsupportedArchitectureError / TokenizerMappingError saying why, a model that is not the
nanochat architecture or a tokenizer that is not nanochat's kind. :func:`download_hf` fetches a hub repo
with ``huggingface_hub`` first. Needs the ``hf`` extra, never ``transformers``.

Rotary tables: transformers computes them in fp32, nanochat keeps bf16 copies (``GPTConfig.rotary_bf16``).
An export of ours carries its GPTConfig in the safetensors header and gets it back (so the original
logits come back exactly); any other model is imported with fp32 tables, matching transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from nanochat.checkpoint import check_state_dict, checkpoint_dir, save_checkpoint
from nanochat.common import get_logger
from nanochat.interop.hf_format import (
    CONFIG_FILE,
    CONFIG_METADATA_KEY,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    HFInteropError,
    from_hf_state_dict,
    gpt_config_from_hf,
    require,
)
from nanochat.interop.hf_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, tokenizer_from_hf
from nanochat.model import GPTConfig

log = get_logger(__name__)
# What a download fetches: enough to import, nothing else (no pytorch_model.bin, no original .pt files).
DOWNLOAD_PATTERNS = [
    CONFIG_FILE,
    "generation_config.json",
    "*.safetensors",
    WEIGHTS_INDEX_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    "README.md",
]
ROTARY_CHOICES = ("auto", "fp32", "bf16")


def import_hf(
    src: str | Path,
    dst: str | Path | None = None,
    stage: str = "base",
    tag: str | None = None,
    step: int = 0,
    rotary: str = "auto",
    overwrite: bool = False,
    origin: str | None = None,
    base: str | Path | None = None,
) -> Path:
    """Convert the transformers directory ``src`` into a checkpoint and return its path.

    ``dst`` defaults to ``checkpoints/<stage>/<tag>/step_<step>`` under the artifacts root ``base``
    (default ``$NANOCHAT_BASE_DIR``), ``tag``
    to ``src``'s name. ``rotary``: ``auto`` (the exported GPTConfig's setting, else fp32 like
    transformers), ``fp32`` or ``bf16`` tables. ``origin`` is recorded as where it came from (a repo id).
    Raises HFInteropError (or a subclass) with the fix; CheckpointError for the stage name.
    """
    src = Path(src).expanduser()
    if not (src / CONFIG_FILE).is_file():
        raise HFInteropError(f"{src} has no {CONFIG_FILE}: not a transformers model directory")
    if rotary not in ROTARY_CHOICES:
        raise HFInteropError(f"rotary must be one of {', '.join(ROTARY_CHOICES)}, got {rotary!r}")
    cfg = _read_json(src / CONFIG_FILE)
    tokenizer = tokenizer_from_hf(src / TOKENIZER_FILE)
    config = gpt_config_from_hf(cfg, tokenizer.vocab_size, str(src / CONFIG_FILE))
    tensors, metadata = _load_weights(src)
    config = _with_exported_options(config, metadata, rotary)
    state, dropped = from_hf_state_dict(tensors, config, bool(cfg.get("tie_word_embeddings")), str(src))
    _check_layers(state, config, src)
    tag = tag or _safe_tag(origin.rsplit("/", 1)[-1] if origin else src.resolve().name)
    dst = Path(dst) if dst else checkpoint_dir(stage, tag, step, base)
    if dst.exists() and not overwrite:
        raise HFInteropError(f"{dst} already exists; pass --out DIR, another --tag, or --force to replace it")
    extra: dict[str, Any] = {
        "imported_from": origin or str(src.resolve()),
        "hf_model_type": cfg.get("model_type"),
        "hf_rms_norm_eps": cfg.get("rms_norm_eps"),
    }
    if dropped:
        extra["dropped_vocab_rows"] = dropped
        log.warning(
            "%s: dropped %d embedding/head rows beyond the tokenizer's %d ids",
            src,
            dropped,
            config.vocab_size,
        )
    out = save_checkpoint(dst, state, config, tokenizer, stage=stage, step=step, extra=extra, tag=tag)
    log.info("imported %s -> %s", origin or src, out)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HFInteropError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise HFInteropError(f"{path} is not a JSON object")
    return data


def _safe_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "hf"


def _load_weights(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of ``model.safetensors`` (or of the shards an index names) and the header metadata."""
    if (src / WEIGHTS_FILE).is_file():
        files = [src / WEIGHTS_FILE]
    elif (src / WEIGHTS_INDEX_FILE).is_file():
        weight_map = _read_json(src / WEIGHTS_INDEX_FILE).get("weight_map") or {}
        files = [src / name for name in sorted(set(weight_map.values()))]
    else:
        bins = sorted(p.name for p in src.glob("*.bin"))
        hint = (
            f" (it has {bins[:2]}: re-save it with `model.save_pretrained(dir)`, which writes safetensors)"
            if bins
            else ""
        )
        raise HFInteropError(f"{src} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = metadata or (f.metadata() or {})
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
        except (SafetensorError, OSError) as err:
            raise HFInteropError(
                f"{path} is missing, truncated or corrupt ({err}); download it again"
            ) from None
    return tensors, metadata


def _with_exported_options(config: GPTConfig, metadata: dict[str, str], rotary: str) -> GPTConfig:
    """``config`` with the rotary table setting: from our export's header (``auto``) or as asked."""
    if rotary != "auto":
        return config.model_copy(update={"rotary_bf16": rotary == "bf16"})
    try:
        exported = GPTConfig(**json.loads(metadata[CONFIG_METADATA_KEY]))
    except (KeyError, ValueError, TypeError):
        return config.model_copy(update={"rotary_bf16": False})  # transformers' own tables are fp32
    same = exported.model_dump(exclude={"rotary_bf16"}) == config.model_dump(exclude={"rotary_bf16"})
    return config.model_copy(update={"rotary_bf16": exported.rotary_bf16 if same else False})


def _check_layers(state: dict[str, torch.Tensor], config: GPTConfig, src: Path) -> None:
    from nanochat.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    check_state_dict(model, state, src, HFInteropError, config_name=CONFIG_FILE,
                     hint="the download or export is incomplete, or config.json does not match the weights")


def download_hf(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> Path:
    """Download the files an import needs from hub repo ``repo_id`` (``owner/name``); returns the snapshot.

    Uses ``huggingface_hub.snapshot_download`` (its cache, ``$HF_HOME``; ``$HF_ENDPOINT``/``endpoint``
    for a mirror; ``$HF_TOKEN``/``token`` for gated repos). Raises HFInteropError saying what to do when
    the repo, the revision or the hub cannot be reached.
    """
    hub = require("huggingface_hub", "--download", "huggingface_hub")
    from huggingface_hub import errors

    try:
        path = hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            endpoint=endpoint,
            token=token,
            allow_patterns=DOWNLOAD_PATTERNS,
        )
    except errors.RevisionNotFoundError:
        raise HFInteropError(
            f"{repo_id} has no revision {revision!r}; check the branch, tag or commit"
        ) from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as err:
        raise HFInteropError(
            f"cannot access {repo_id} ({type(err).__name__}); check the id (owner/name) and, "
            "for a private or "
            "gated repo, set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as err:
        first_line = (str(err).splitlines() or [""])[0]
        raise HFInteropError(
            f"could not download {repo_id} ({type(err).__name__}: {first_line}); "
            "check the network (or HF_ENDPOINT), or download it elsewhere and run "
            "`nanochat checkpoint import-hf DIR` on the copied folder"
        ) from None
    return Path(path)
