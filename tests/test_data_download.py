"""The one downloader (nanochat.sources.download) against a real local HTTP server: retry, resume, atomic, errors."""

from __future__ import annotations

import pytest
from _helpers_http import FileServer

from nanochat.sources.download import DownloadError, download, download_all, fetch_bytes

DATA = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture(scope="module")
def module_server():
    srv = FileServer({"file": DATA}, redirects={"moved": "file"})
    yield srv
    srv.close()


@pytest.fixture
def server(module_server):
    module_server.reset()
    return module_server


def test_transient_5xx_is_retried_until_the_file_arrives(server, tmp_path):
    server.fail_first = {"file": 2}
    dest = download(f"{server.url}/file", tmp_path / "f.bin", backoff=0.01)
    assert dest.read_bytes() == DATA
    assert [status for *_, status in server.log] == [503, 503, 200]


def test_cut_connection_resumes_with_a_range_request(server, tmp_path):
    server.cut_first = {"file": 1}
    dest = download(f"{server.url}/file", tmp_path / "f.bin", backoff=0.01)
    assert dest.read_bytes() == DATA
    assert server.log == [("file", None, 200), ("file", f"bytes={len(DATA) // 2}-", 206)]
    assert not (tmp_path / "f.bin.tmp").exists()


def test_a_failed_download_leaves_no_file_under_the_final_name(server, tmp_path):
    server.cut_first = {"file": 3}
    with pytest.raises(DownloadError, match="peer closed connection.*rerun to resume"):
        download(f"{server.url}/file", tmp_path / "f.bin", attempts=3, backoff=0.01)
    assert not (tmp_path / "f.bin").exists()
    partial = (tmp_path / "f.bin.tmp").read_bytes()
    assert 0 < len(partial) < len(DATA) and DATA.startswith(partial), "the partial file is kept for a rerun"
    # the rerun picks up where the last attempt stopped
    download(f"{server.url}/file", tmp_path / "f.bin", backoff=0.01)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert server.log[-1] == ("file", f"bytes={len(partial)}-", 206)


def test_bytes_the_check_rejects_are_downloaded_again_and_never_kept(server, tmp_path):
    seen = []

    def check(path):
        seen.append(path.read_bytes())
        if len(seen) == 1:
            raise ValueError("not parquet")

    assert download(f"{server.url}/file", tmp_path / "f.bin", backoff=0.01, check=check).read_bytes() == DATA
    assert [status for *_, status in server.log] == [200, 200], "the rejected file was restarted, not resumed"

    def reject(path):
        raise ValueError("not parquet")

    with pytest.raises(DownloadError, match="not usable.*not parquet"):
        download(f"{server.url}/file", tmp_path / "g.bin", attempts=2, backoff=0.01, check=reject)
    assert not (tmp_path / "g.bin").exists() and not (tmp_path / "g.bin.tmp").exists()


def test_404_fails_at_once_naming_the_url_and_the_fix(server, tmp_path):
    with pytest.raises(DownloadError) as info:
        download(f"{server.url}/missing", tmp_path / "m.bin", hint="set NANOCHAT_X_URL to a mirror", backoff=0.01)
    message = str(info.value)
    assert f"{server.url}/missing" in message and "404" in message and "NANOCHAT_X_URL" in message
    assert len(server.log) == 1, "a 404 is not retried"
    assert not (tmp_path / "m.bin").exists()


def test_redirects_are_followed(server, tmp_path):
    assert download(f"{server.url}/moved", tmp_path / "f.bin").read_bytes() == DATA
    assert [status for *_, status in server.log] == [302, 200]


def test_fetch_bytes_retries_and_names_the_url_on_404(server):
    server.fail_first = {"file": 1}
    assert fetch_bytes(f"{server.url}/file", backoff=0.01) == DATA
    with pytest.raises(DownloadError, match=f"{server.url}/nope.*use a mirror"):
        fetch_bytes(f"{server.url}/nope", hint="use a mirror", backoff=0.01)


def test_download_all_skips_present_files_and_names_every_failure(server, tmp_path):
    (tmp_path / "have.bin").write_bytes(b"already here")
    jobs = [(f"{server.url}/file", tmp_path / "a.bin"), (f"{server.url}/file", tmp_path / "have.bin"),
            (f"{server.url}/gone", tmp_path / "b.bin")]
    with pytest.raises(DownloadError, match="1 of 2 files failed.*/gone"):
        download_all(jobs, workers=2, progress=False, backoff=0.01)
    assert (tmp_path / "a.bin").read_bytes() == DATA and (tmp_path / "have.bin").read_bytes() == b"already here"
    assert download_all(jobs[:2], progress=False) == 0
