"""CORE data: the real bundle download (against a local HTTP server) and the registry-built bundle."""

from __future__ import annotations

import functools
import http.server
import io
import threading
import zipfile

import pytest
from _helpers_eval import write_tiny_bundle

from nanochat.eval import core, core_data


@pytest.fixture
def bundle_server(tmp_path):
    """Serves eval_bundle.zip (real layout: one top-level eval_bundle/ directory) on localhost."""
    src = write_tiny_bundle(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, "eval_bundle/" + str(p.relative_to(src)))
    served = tmp_path / "www"
    served.mkdir()
    (served / "eval_bundle.zip").write_bytes(buf.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bundle_downloads_unpacks_and_is_cached(base_dir, bundle_server, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BASE_URL", bundle_server)
    assert core_data.bundle_url() == bundle_server + "/eval_bundle.zip"
    bundle = core_data.download_bundle()
    assert bundle == base_dir / "eval_bundle"
    tasks = core.load_bundle_tasks(bundle)
    assert [t.label for t in tasks] == ["copa", "winogrande", "bigbench_operators"]
    assert len(core.load_task_data(bundle, tasks[0])) == 6
    monkeypatch.setenv("NANOCHAT_EVAL_BASE_URL", "http://127.0.0.1:9")  # nothing listens: must use the cache
    assert core_data.download_bundle() == bundle
    assert core_data.resolve_bundle("auto") == bundle


def test_download_failure_names_the_fix(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(core.CoreEvalError, match="NANOCHAT_EVAL_BASE_URL"):
        core_data.download_bundle(timeout=2)


def test_embedded_bundle_converts_registry_data_and_reports_missing_tasks(base_dir):
    wanted = tuple(t for t in core.CORE_TASKS if t.label in ("copa", "winogrande", "winograd", "boolq", "jeopardy"))
    bundle = core_data.build_embedded_bundle(tasks=wanted)
    labels = [t.label for t in core.load_bundle_tasks(bundle)]
    assert labels == ["jeopardy", "copa", "winogrande", "boolq"]
    assert "winograd" in core_data.missing_tasks(bundle)
    copa = core.load_task_data(bundle, core.load_bundle_tasks(bundle)[1])
    assert len(copa) == 100 and all(len(i["choices"]) == 2 for i in copa)
    assert any(i["query"].endswith((", therefore", ", because")) for i in copa)
    wg = core.load_task_data(bundle, core.load_bundle_tasks(bundle)[2], 5)
    assert all(len(i["context_options"]) == 2 and "_" not in i["continuation"] for i in wg)
    jeopardy = core.load_bundle_tasks(bundle)[0]
    assert jeopardy.continuation_delimiter == "\nAnswer: " and jeopardy.num_fewshot == 10
    item = core.load_task_data(bundle, jeopardy, 1)[0]
    assert ": " in item["context"] and not item["context"].endswith("Answer:")


def test_bigbench_tasks_without_the_sdist_are_reported_missing(base_dir):
    wanted = tuple(t for t in core.CORE_TASKS if t.label == "bigbench_operators")
    bundle = core_data.build_embedded_bundle(tasks=wanted)
    assert "fetch-data" in core_data.missing_tasks(bundle)["bigbench_operators"]
