"""The local Ray's dashboard and metrics endpoint, seen over HTTP after a short real run.

One child process (so it owns its Ray: the test session's shared Ray runs without a dashboard)
starts the embedded Ray as every command does (dashboard on), trains a tiny pretraining run
through Ray Data + Ray Train, serves the checkpoint with Ray Serve and sends it traffic, while a
thread scrapes the node's Prometheus endpoint; then it asks the dashboard's REST API for the Train
run, the Data pipelines and the Serve app, and prints everything as one JSON line. The session's
shared Ray runs meanwhile, so an actor of the child also checks that Ray's state API finds the
child's own Ray while another instance runs on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _helpers_serve import free_port
from _helpers_train import tiny_overrides, write_text_shards

from nanochat.ray_utils import free_dashboard_port

# Metrics of the server (scraped with Ray's `ray_` prefix); histograms are checked through `_count`.
SERVE_METRICS = [
    "ray_nanochat_responses_total", "ray_nanochat_ttft_seconds_count", "ray_nanochat_inter_token_latency_seconds_count",
    "ray_nanochat_output_tokens_per_second", "ray_nanochat_running_sequences", "ray_nanochat_waiting_sequences",
    "ray_nanochat_kv_cache_slots_used", "ray_nanochat_kv_cache_slot_usage", "ray_nanochat_prefix_cache_hit_rate",
    "ray_nanochat_generated_tokens_total",
]
TRAIN_METRICS = ["ray_nanochat_train_loss", "ray_nanochat_train_lr_multiplier", "ray_nanochat_train_tokens_per_second",
                 "ray_nanochat_train_mfu", "ray_nanochat_train_val_bpb", "ray_nanochat_train_data_wait_fraction"]

CHILD = r"""
import json, os, re, sys, threading, time
import httpx
import ray

overrides, wanted = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
from ray import serve
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
from nanochat.metrics_export import metrics_endpoints
from nanochat.ray_console import dashboard_url
from nanochat.ray_utils import init_ray
from nanochat.serve.app import build_app
from nanochat.train.trainer import train_stage

init_ray(num_cpus=4)
url, headers = dashboard_url(), get_auth_headers_if_auth_enabled({})

@ray.remote(num_cpus=0)
class StateProbe:  # Ray's state API in a worker, called as Train's state actor calls it (no address)
    def ask(self):
        from ray._private.services import find_gcs_addresses
        from ray.dashboard.utils import get_address_for_submission_client
        from ray.util.state import get_actor

        seen = {"instances": len(find_gcs_addresses())}
        try:
            seen["resolved"] = get_address_for_submission_client(None)
            seen["actor_state"] = get_actor(ray.get_runtime_context().get_actor_id(), timeout=60).state
        except Exception as err:
            seen["error"] = f"{type(err).__name__}: {err}"
        return seen

state_api = ray.get(StateProbe.remote().ask.remote())
peak, statuses, stop = {}, set(), threading.Event()
SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')

def scrape():
    for endpoint in metrics_endpoints():
        for line in httpx.get(endpoint, timeout=10).text.splitlines():
            m = SAMPLE.match(line)
            if m and m.group(1).startswith("ray_nanochat_"):
                peak[m.group(1)] = max(peak.get(m.group(1), 0.0), float(m.group(3)))
                status = re.search(r'status="(\d+)"', m.group(2) or "")
                if status and float(m.group(3)) > 0:
                    statuses.add(status.group(1))

def scraping():
    while not stop.is_set():
        try:
            scrape()
        except Exception as err:
            print("scrape failed:", err, file=sys.stderr)
        stop.wait(1.0)

threading.Thread(target=scraping, daemon=True).start()
result = train_stage("pretrain", "tiny", overrides=overrides, tag="dash", restart=True)

port = int(sys.argv[3])
serve.start(http_options={"host": "127.0.0.1", "port": port})
serve.run(build_app({"checkpoint": result.checkpoint, "overrides": ["max_batch_size=2", "compile=false"]}), name="nanochat",
          route_prefix="/", blocking=False)
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        if httpx.get(base + "/health", timeout=5).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)

def chat(client, messages, **kw):
    body = {"messages": messages, "max_tokens": 24, "temperature": 0.0, **kw}
    return client.post(base + "/v1/chat/completions", json=body, timeout=120)

def streaming(i):  # six at once on two slots: some sequences always wait while the load runs
    with httpx.Client() as client:
        while not stop.is_set():
            body = {"messages": [{"role": "user", "content": f"Tell me a story number {i}"}], "max_tokens": 32,
                    "stream": True, "seed": i}
            with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    pass

with httpx.Client() as client:
    first = chat(client, [{"role": "user", "content": "Hello there"}])
    assert first.status_code == 200, first.text
    first = first.json()
    history = [{"role": "user", "content": "Hello there"},
               {"role": "assistant", "content": first["choices"][0]["message"]["content"] or "ok"}]
    chat(client, history + [{"role": "user", "content": "And then?"}])  # the history's prefix is cached
    missing_model = chat(client, [{"role": "user", "content": "hi"}], model="no-such-model").status_code
load = [threading.Thread(target=streaming, args=(i,), daemon=True) for i in range(6)]
for t in load:
    t.start()
deadline = time.monotonic() + 120
while time.monotonic() < deadline and not (wanted <= {k for k, v in peak.items() if v > 0} and "404" in statuses):
    time.sleep(1.0)
stop.set()
for t in load:
    t.join(timeout=120)
scrape()

job = ray.get_runtime_context().get_job_id()
api = {path: httpx.get(url + path, headers=headers, timeout=60).json()
       for path in ("/api/train/v2/runs/v1", f"/api/data/datasets/{job}", "/api/serve/applications/")}
print("RESULT " + json.dumps({"dashboard": url, "peak": peak, "statuses": sorted(statuses), "api": api,
                              "missing_model": missing_model, "state_api": state_api}))
serve.shutdown()
"""


@pytest.fixture(scope="module")
def dashboard_run(ray_session, tmp_path_factory, tiny_tokenizer) -> dict:
    """The child's JSON result (one run shared by this module's tests). The session's Ray runs meanwhile:
    a second Ray instance on the host, as when a user's `ray start` cluster runs beside a command."""
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("starts its own local Ray; unset RAY_ADDRESS")
    base = tmp_path_factory.mktemp("dashboard_base")
    tiny_tokenizer.save(base / "tokenizer")
    write_text_shards(base / "data" / "builtin")
    ray_tmp = tempfile.mkdtemp(prefix="nc-dash-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DASHBOARD": "1", "RAY_TMPDIR": ray_tmp,
           "RAY_metrics_report_interval_ms": "1000",  # this Ray only: export every second, not every 10 s
           # Train's state actor asks the state API about the run every second, not every 30 s
           "RAY_TRAIN_STATE_ACTOR_RECONCILIATION_INTERVAL_S": "1"}
    env.pop("NANOCHAT_VERBOSE", None)
    # 128-token context: room for a chat prompt and its reply (the tiny helper's 32 tokens are not)
    overrides = tiny_overrides(steps=12, model__sequence_len=128, pretrain__total_batch_size=512,
                               pretrain__report_every=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(overrides), json.dumps(SERVE_METRICS + TRAIN_METRICS),
         str(free_port())], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its Ray goes with it: a leftover Ray would confuse every later test
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-5000:])
    lost = [str(f) for f in Path(ray_tmp).rglob("logs/worker-*")
            if "Found multiple active Ray instances" in f.read_text(errors="replace")]
    return {**json.loads(lines[-1][len("RESULT "):]), "stderr": proc.stderr, "lost_workers": lost}


@pytest.mark.slow
def test_the_local_ray_starts_its_dashboard_and_says_where_it_and_its_logs_are(dashboard_run):
    url = dashboard_run["dashboard"]
    assert url.startswith("http://127.0.0.1:")  # localhost only
    assert f"Ray dashboard: {url}" in dashboard_run["stderr"]
    assert "Ray's own logs: /tmp/nc-dash-" in dashboard_run["stderr"]


@pytest.mark.slow
def test_ray_state_api_in_a_worker_reaches_this_ray_while_another_ray_runs_on_the_host(dashboard_run):
    """Regression: without an address, Ray's state API (Train's state actor polls it) scanned the host
    for GCS processes and failed with "Found multiple active Ray instances" (or asked another Ray)."""
    seen = dashboard_run["state_api"]
    assert seen["instances"] >= 2, seen  # the case under test: this Ray and the session's
    assert "error" not in seen, seen
    assert seen["resolved"] == dashboard_run["dashboard"]
    assert seen["actor_state"] == "ALIVE"
    assert dashboard_run["lost_workers"] == []  # no worker (Train's state actor polled) met the error


def test_the_dashboard_port_is_the_first_one_free_from_the_given_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = free_dashboard_port(first=port, tries=20)
    assert got is not None and port < got < port + 20
    with socket.socket() as check:  # the port it returned can be bound
        check.bind(("127.0.0.1", got))


@pytest.mark.slow
def test_the_dashboard_api_lists_the_train_run_the_data_pipelines_and_the_serve_app(dashboard_run):
    api = dashboard_run["api"]
    runs = {run["name"]: run for run in api["/api/train/v2/runs/v1"]["train_runs"]}
    assert "base-dash" in runs and runs["base-dash"]["status"] == "FINISHED", runs.keys()
    datasets = next(v for k, v in api.items() if k.startswith("/api/data/datasets/"))["datasets"]
    assert any(d["dataset"].startswith("train") for d in datasets), [d["dataset"] for d in datasets]
    assert any(d["dataset"].startswith("val") for d in datasets), [d["dataset"] for d in datasets]
    app = api["/api/serve/applications/"]["applications"]["nanochat"]
    assert app["status"] == "RUNNING" and "NanochatServer" in app["deployments"]


@pytest.mark.slow
def test_a_scrape_has_every_training_and_server_metric_with_a_nonzero_sample(dashboard_run):
    peak = dashboard_run["peak"]
    # Data wait can be a true 0 in every exported sample (the ingest buffer was always full): present is enough.
    nonzero = [m for m in SERVE_METRICS + TRAIN_METRICS if m != "ray_nanochat_train_data_wait_fraction"]
    assert not [m for m in nonzero if peak.get(m, 0.0) <= 0], {m: peak.get(m) for m in nonzero}
    assert "ray_nanochat_train_data_wait_fraction" in peak
    assert dashboard_run["missing_model"] == 404
    assert {"200", "404"} <= set(dashboard_run["statuses"])  # responses are counted by status


@pytest.mark.slow
def test_ray_workers_output_stays_off_the_quiet_console(dashboard_run):
    err = dashboard_run["stderr"]
    for noise in ("Reporting training result", "core_worker.cc", "PYTHON worker processes have been started",
                  "Failed to query Ray Train Controller", "Starting execution of Dataset"):
        assert noise not in err, noise
    assert "base step 12/12" in err  # the training progress, as plain lines (not a terminal)


def test_the_grafana_dashboard_charts_every_metric_nanochat_exports():
    import re

    from nanochat.metrics_export import TRAIN_GAUGES

    repo = Path(__file__).resolve().parents[1]
    board = json.loads((repo / "deploy" / "grafana" / "nanochat.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    served = set(re.findall(r'"(nanochat_\w+)"', (repo / "nanochat" / "serve" / "http_api.py").read_text()))
    exported = {name for name, _ in TRAIN_GAUGES.values()} | served
    assert {"nanochat_responses_total", "nanochat_inter_token_latency_seconds", "nanochat_kv_cache_slot_usage"} <= served
    assert not {name for name in exported if f"ray_{name}" not in exprs}
