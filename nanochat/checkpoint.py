"""Checkpoints: a directory with ``model.safetensors``, ``meta.json`` and a copy of the tokenizer.

Writes are atomic (temp dir + rename, see :func:`nanochat.common.atomic_directory`): a crash
mid-write leaves the previous checkpoint intact. Loads validate everything they can and raise
:class:`CheckpointError` naming the file and the fix. The layout under the artifacts root (the
``base`` argument of the functions that look there; default ``$NANOCHAT_BASE_DIR``):
``checkpoints/<stage>/<tag>/step_<step:06d>/`` with stage in base | mid | sft.

Training state (optimizer / ZeRO shards, data position) lives in Ray Train's run directory, not
here (see docs/training.md); this module only handles the portable model part. A checkpoint's tag
(its model id in the API, ``checkpoint list`` and reports) is the one recorded in ``meta.json``;
:func:`checkpoint_tag` is the one place that reads it.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat import __version__
from nanochat.common import NanochatError, atomic_directory, base_dir
from nanochat.model import GPT, GPTConfig, build_model
from nanochat.stages import CHECKPOINT_STAGES, get_stage
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(NanochatError):
    """A checkpoint is missing, incomplete, corrupt or does not fit what it is loaded into."""


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def tag(self) -> str:
        return checkpoint_tag(self.path, self.meta)


def checkpoints_root(stage: str, base: str | PathLike | None = None) -> Path:
    """``<base>/checkpoints/<stage>`` (``base``: the artifacts root, default ``$NANOCHAT_BASE_DIR``)."""
    if stage not in CHECKPOINT_STAGES:
        raise ValueError(f"unknown stage {stage!r} (allowed: {', '.join(CHECKPOINT_STAGES)})")
    return base_dir(base) / "checkpoints" / stage


def step_name(step: int) -> str:
    """The folder name of step ``step``'s checkpoint (``step_000012``), here and in Ray's run folder."""
    return f"step_{step:06d}"


def step_of(path: str | Path) -> int:
    """The step of a ``step_N`` folder (-1 for any other name)."""
    m = STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else -1


def checkpoint_dir(stage: str, tag: str, step: int, base: str | PathLike | None = None) -> Path:
    return checkpoints_root(stage, base) / tag / step_name(step)


def save_checkpoint(
    directory: str | Path,
    model: GPT | dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer: Tokenizer,
    stage: str,
    step: int,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    tag: str | None = None,
) -> Path:
    """Atomically write a checkpoint directory and return its path.

    ``tag`` is recorded in meta.json as the model's id; default: the layout's tag folder
    (``.../<tag>/step_N``) or the directory's own name. Writers that build a checkpoint somewhere
    else first (the trainer writes into a temp folder Ray then copies) must pass it.
    """
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab {tokenizer.vocab_size} != model vocab {config.vocab_size}")
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    directory = Path(directory)
    meta = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "step": int(step),
        "tag": tag or _layout_tag(directory),
        "model_config": config.model_dump(),
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "metrics": metrics or {},
        "versions": {"nanochat": __version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"extra": extra} if extra else {}),
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        tokenizer.save(tmp / TOKENIZER_SUBDIR)
    return directory


def _layout_tag(directory: Path) -> str:
    return directory.parent.name if STEP_DIR.fullmatch(directory.name) else directory.name


# Exports written before the trainer passed its tag recorded the name of its temp folder instead.
_LEGACY_EXPORT_TAG = "model"


def checkpoint_tag(directory: str | Path, meta: dict[str, Any] | None = None) -> str:
    """A checkpoint's tag (model id): the one recorded in meta.json, else its layout's tag folder.

    Checkpoints exported by earlier versions of the trainer recorded ``"model"`` (the temp folder the
    trainer wrote into); for those the trainer's own tag, also kept in ``meta["extra"]["tag"]``,
    is returned, else the layout's tag folder (``checkpoints/<stage>/<tag>/step_N``).
    """
    directory = Path(directory)
    meta = read_meta(directory) if meta is None else meta
    tag = meta.get("tag")
    if tag == _LEGACY_EXPORT_TAG:
        legacy = (meta.get("extra") or {}).get("tag")
        tag = legacy or (_layout_tag(directory) if directory.name.startswith("step_") else tag)
    return tag or _layout_tag(directory)


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path} is missing: {directory} is not a complete checkpoint")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err}); the checkpoint is corrupt") from None


def load_checkpoint(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    expected_stage: str | tuple[str, ...] | None = None,
    expected_tokenizer: Tokenizer | None = None,
) -> Checkpoint:
    """Load and validate a checkpoint; the model comes back in eval mode on ``device``."""
    directory = Path(directory)
    meta = read_meta(directory)
    if expected_stage is not None:
        allowed = (expected_stage,) if isinstance(expected_stage, str) else expected_stage
        if meta.get("stage") not in allowed:
            raise CheckpointError(
                f"{directory} is a '{meta.get('stage')}' checkpoint, but this needs a {' or '.join(allowed)} one"
            )
    try:
        config = GPTConfig(**meta["model_config"])
    except Exception as err:
        raise CheckpointError(f"{directory / META_FILE}: invalid model_config ({err})") from None
    tokenizer = _load_checkpoint_tokenizer(directory, meta)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer vocab {tokenizer.vocab_size} != model vocab_size {config.vocab_size}"
        )
    if expected_tokenizer is not None and expected_tokenizer.fingerprint != tokenizer.fingerprint:
        raise CheckpointError(
            f"{directory} was trained with a different tokenizer (fingerprint {tokenizer.fingerprint}, "
            f"current {expected_tokenizer.fingerprint}); retrain or use the matching tokenizer"
        )
    state = _load_tensors(directory / MODEL_FILE)
    model = build_model(config, device="cpu", init=False)
    check_state_dict(model, state, directory / MODEL_FILE)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return Checkpoint(path=directory, model=model, tokenizer=tokenizer, meta=meta)


def _load_checkpoint_tokenizer(directory: Path, meta: dict[str, Any]) -> Tokenizer:
    tok_dir = directory / TOKENIZER_SUBDIR
    if not tok_dir.is_dir():
        raise CheckpointError(f"{tok_dir} is missing: the checkpoint has no tokenizer copy")
    tokenizer = Tokenizer.load(tok_dir)
    recorded = meta.get("tokenizer", {}).get("fingerprint")
    if recorded and recorded != tokenizer.fingerprint:
        raise CheckpointError(f"{tok_dir}: tokenizer files do not match the fingerprint in {META_FILE}")
    return tokenizer


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err}); use an earlier checkpoint") from None


def check_state_dict(
    model: GPT, state: dict[str, torch.Tensor], where: str | Path, error: type[NanochatError] = CheckpointError,
    config_name: str = "its model_config", hint: str = "",
) -> None:
    """Raise ``error`` unless ``state`` holds exactly ``model``'s tensors (names and shapes; a model on
    the meta device will do). The message starts with ``where`` (the file read), names the first
    differences and ends with ``hint``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    tail = f" ({hint})" if hint else ""
    if missing or unexpected:
        raise error(
            f"{where} does not match {config_name}: missing {missing[:5]}, unexpected {unexpected[:5]}{tail}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise error(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)}{tail}"
            )


def prune_checkpoints(tag_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-step ``step_*`` folders of a tag folder; returns those deleted.

    The highest step is always kept (``keep`` < 1 counts as 1).
    """
    steps = sorted((p for p in Path(tag_dir).glob("step_*") if p.is_dir() and step_of(p) >= 0), key=step_of)
    doomed = steps[: -max(1, keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def list_checkpoints(stage: str, tag: str | None = None, base: str | PathLike | None = None) -> list[Path]:
    """Complete checkpoints of a stage (those with a meta.json), oldest step first."""
    root = checkpoints_root(stage, base)
    tags = [root / tag] if tag else [p for p in root.glob("*") if p.is_dir()]
    found = [p for t in tags for p in t.glob("step_*") if (p / META_FILE).exists()]
    return sorted(found, key=lambda p: (p.parent.name, step_of(p)))


def find_latest(stage: str, tag: str | None = None, base: str | PathLike | None = None) -> Path:
    """The newest checkpoint of ``stage``: the deepest ``d<N>`` tag (else newest tag), highest step."""
    base = base_dir(base)
    root = checkpoints_root(stage, base)
    if tag is None:
        tags = [p for p in root.glob("*") if p.is_dir() and any((s / META_FILE).exists() for s in p.glob("step_*"))]
        if not tags:
            raise CheckpointError(
                f"no {stage} checkpoint under {root}; create one with `{get_stage(stage).command}` "
                "(or run the whole pipeline: `nanochat run --preset tiny`)"
            )
        depth_tags = [(int(m.group(1)), p) for p in tags if (m := re.fullmatch(r"d(\d+)", p.name))]
        chosen = max(depth_tags)[1] if depth_tags else max(tags, key=lambda p: p.stat().st_mtime)
        tag = chosen.name
    steps = list_checkpoints(stage, tag, base)
    if not steps:
        raise CheckpointError(f"no complete {stage} checkpoint under {root / tag}; run `{get_stage(stage).command}`")
    return max(steps, key=step_of)


def resolve_checkpoint(
    spec: str | None, default_stages: tuple[str, ...] = ("sft", "mid", "base"), base: str | PathLike | None = None
) -> Path:
    """A path, a stage name (its latest checkpoint), or None (latest of the first stage that has one).

    Stage names and None look under ``<base>/checkpoints`` (default ``$NANOCHAT_BASE_DIR``)."""
    base = base_dir(base)
    if spec and spec in CHECKPOINT_STAGES:
        return find_latest(spec, base=base)
    if spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not (path / META_FILE).exists():  # a tag directory: take its highest step
            steps = sorted((p for p in path.glob("step_*") if (p / META_FILE).exists()), key=step_of)
            if not steps:
                raise CheckpointError(f"{path} holds no checkpoint ({META_FILE} missing)")
            return steps[-1]
        return path
    for stage in default_stages:
        try:
            return find_latest(stage, base=base)
        except CheckpointError:
            continue
    raise CheckpointError(
        f"no checkpoint found under {base / 'checkpoints'}; train one with `nanochat run --preset tiny` "
        "(the whole pipeline) or `nanochat train pretrain --preset tiny`"
    )


# ---- interop with karpathy/nanochat ------------------------------------------------------------

_NANOCHAT_HEAD_ONLY_KEYS = ("resid_lambdas", "x0_lambdas", "value_embeds", "smear", "backout", "ve_gate")


def import_nanochat(
    src: str | Path,
    dst: str | Path,
    step: int | None = None,
    tokenizer_dir: str | Path | None = None,
    stage: str = "base",
) -> Path:
    """Convert a nanochat checkpoint dir (``model_<step>.pt`` + ``meta_<step>.json``) into ours.

    Handles ``_orig_mod.`` prefixes (torch.compile) and bf16 weights (cast to fp32). The tokenizer
    is read from nanochat's ``tokenizer.pkl`` (default: ``<src>/../../tokenizer``). Only the DEC
    architecture is supported; HEAD-only parameters are refused with a clear error.
    """
    src = Path(src)
    models = sorted(src.glob("model_*.pt"))
    if not models:
        raise CheckpointError(f"{src} has no model_<step>.pt file: not a nanochat checkpoint directory")
    if step is None:
        step = max(int(re.search(r"model_(\d+)\.pt", p.name).group(1)) for p in models)
    model_path, meta_path = src / f"model_{step:06d}.pt", src / f"meta_{step:06d}.json"
    for p in (model_path, meta_path):
        if not p.exists():
            raise CheckpointError(f"{p} is missing")
    meta = json.loads(meta_path.read_text())
    mc = dict(meta["model_config"])
    window = mc.pop("window_pattern", "L")
    if set(str(window)) - {"L"}:
        raise CheckpointError(f"{meta_path}: window_pattern {window!r} (sliding windows) is nanochat HEAD; only DEC is supported")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{model_path} could not be read ({err})") from None
    state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    head_only = [k for k in state if any(h in k for h in _NANOCHAT_HEAD_ONLY_KEYS)]
    if head_only:
        raise CheckpointError(f"{model_path} has HEAD-architecture parameters {head_only[:3]}; only DEC is supported")
    config = GPTConfig(**{k: v for k, v in mc.items() if k in GPTConfig.model_fields})
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else src.parent.parent / "tokenizer"
    tokenizer = _tokenizer_from_nanochat_pickle(tok_dir / "tokenizer.pkl")
    model = build_model(config, init=False)
    # nanochat may not pad the vocab; pad embedding/head rows with zeros to our multiple of 64.
    for key in ("transformer.wte.weight", "lm_head.weight"):
        want = model.state_dict()[key].shape[0]
        if key in state and state[key].shape[0] < want:
            pad = torch.zeros(want - state[key].shape[0], state[key].shape[1])
            state[key] = torch.cat([state[key], pad])
    check_state_dict(model, state, model_path)
    extra = {"imported_from": str(src), "nanochat_meta": {k: meta.get(k) for k in ("step", "val_bpb") if k in meta}}
    return save_checkpoint(dst, state, config, tokenizer, stage=stage, step=step, extra=extra)


def _tokenizer_from_nanochat_pickle(path: Path) -> Tokenizer:
    if not path.exists():
        raise CheckpointError(f"{path} not found: pass --tokenizer DIR pointing at nanochat's tokenizer directory")
    with open(path, "rb") as f:
        enc = pickle.load(f)  # nanochat stores a pickled tiktoken.Encoding; only load files you trust
    specials = enc._special_tokens
    n = len(enc._mergeable_ranks)
    if [specials.get(t) for t in SPECIAL_TOKENS] != list(range(n, n + len(SPECIAL_TOKENS))):
        raise CheckpointError(f"{path}: special tokens are not nanochat's 9 tokens at the last ids")
    return Tokenizer.from_ranks(enc._pat_str, dict(enc._mergeable_ranks))


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint directory atomically (e.g. to export the final model)."""
    src = Path(src)
    read_meta(src)
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)
