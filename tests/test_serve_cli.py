"""`serve run serve_configs/local.yaml` and `nanochat serve` come up on a tiny checkpoint (subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _helpers_serve import build_tiny_checkpoint, free_port, wait_healthy  # noqa: E402

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen) -> None:
    # `serve run` in the background ignores SIGINT; SIGTERM stops it (and its local Ray).
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_serve_run_local_config_serves_the_newest_checkpoint(tmp_path, tiny_tokenizer, tiny_model_factory):
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("starts its own local Ray; unset RAY_ADDRESS")
    base = tmp_path / "base"
    build_tiny_checkpoint(base, tiny_tokenizer, tiny_model_factory, tag="cli-tag")
    port = free_port()
    config = (ROOT / "serve_configs" / "local.yaml").read_text().replace("port: 8000", f"port: {port}")
    config = config.replace("        - min_replicas=1\n", "        - min_replicas=1\n        - compile=false\n")  # CI time
    config_file = tmp_path / "local.yaml"
    config_file.write_text(config)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", str(config_file)], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", timeout=180)
        except TimeoutError:
            pytest.fail((tmp_path / "serve.log").read_text()[-6000:])
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["cli-tag"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    finally:
        _stop(proc)
        log.close()


def test_nanochat_serve_without_a_checkpoint_says_how_to_make_one(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "empty")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(BIN / "nanochat"), "serve", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert "no checkpoint found" in proc.stderr and "nanochat" in proc.stderr


def test_a_preset_that_still_sets_serve_host_or_port_loads_with_a_warning_naming_the_fix():
    from nanochat.config import load_preset

    with pytest.warns(FutureWarning, match=r"serve.host/serve.port are ignored.*nanochat serve --host/--port"):
        preset = load_preset("tiny", ["serve.host=0.0.0.0", "serve.port=8001"])
    assert preset.serve == load_preset("tiny").serve and "port" not in preset.serve.model_dump()


def test_serve_compile_defaults_to_auto_and_takes_true_or_false():
    from nanochat.config import ConfigError, load_preset

    assert load_preset("tiny").serve.compile == "auto"  # GPU: compiled; CPU: the batch sizes that measure faster
    assert load_preset("tiny", ["serve.compile=false"]).serve.compile is False
    assert load_preset("tiny", ["serve.compile=true"]).serve.compile is True
    with pytest.raises(ConfigError, match="serve.compile"):
        load_preset("tiny", ["serve.compile=sometimes"])


def test_the_serve_app_looks_up_checkpoint_names_in_the_artifacts_root_of_its_args(tmp_path, base_dir,
                                                                                  tiny_tokenizer, tiny_model_factory):
    from nanochat.serve.build import build_app_with

    other = tmp_path / "other_root"
    path = build_tiny_checkpoint(other, tiny_tokenizer, tiny_model_factory)
    app = build_app_with({"checkpoint": "sft", "base_dir": str(other)})  # $NANOCHAT_BASE_DIR has none
    assert app._bound_deployment.init_args[0]["checkpoint"] == str(path.resolve())
