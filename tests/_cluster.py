"""A real two-node Ray cluster on this host (``ray start`` head + one worker node) for the multi-node tests.

Each node is a ``ray start --block`` in its own process group with its own temp dir, ports and a custom
resource naming it (``node:head`` / ``node:worker`` style: ``head_node`` / ``worker_node``), so the
tests can tell where a worker ran and kill one node (its raylet, SIGKILL) without touching the other.
A second Ray on this host breaks Ray's address auto-detection ("Found multiple active Ray instances"),
so everything talks to this cluster through explicit addresses: drivers get ``RAY_ADDRESS`` (they run as
subprocesses, never in the pytest process, whose own Ray is ``conftest.ray_session``), the job CLI
gets ``--address``.

Run as a script, this file is the training driver those tests start (``python tests/_cluster.py
train SPEC.json``): it joins the cluster, runs ``train_stage`` on a small in-memory dataset and writes
the per-step losses and the node each rank ran on to ``SPEC["out"]``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _helpers_serve import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# Logical CPUs per node (overcommitted on 2 cores, as the embedded Ray does: Ray Data's tasks need free
# CPUs while the training workers hold theirs). With ray.cpus_per_worker=2 each node holds exactly one
# training worker, which is what an elastic run counts when it decides how many workers fit.
HEAD_CPUS, WORKER_CPUS = 3, 3


def job_env(base_dir: Path) -> dict[str, str]:
    """The environment of the nodes, the drivers and the CLIs: never an inherited ``RAY_ADDRESS``."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "NANOCHAT_BASE_DIR": str(base_dir),
        "RAY_AUTH_MODE": "token",  # 2.60 enables token auth; the CLIs need the mode to find the token
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        # The GCS declares a node dead after this many failed health checks this far apart (Ray: 5 x 3 s
        # after a 5 s delay); a killed raylet refuses at once, so its node is marked dead in ~5 s, while a
        # live raylet must stall for ~50 s (5 x the 10 s check timeout) before it counts as lost.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_initial_delay_ms": "1000",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _agent_ports() -> list[str]:
    return [f"--{flag}={free_port()}" for flag in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port")]


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the node's process group, SIGKILL what is left after ``grace_s``; wait until none is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.time() + wait_s
        while time.time() < deadline and _group_pids(proc.pid):
            proc.poll()
            time.sleep(0.2)
        if not _group_pids(proc.pid):
            break
    proc.poll()


@dataclass
class LocalCluster:
    """A head node and one worker node started with ``ray start`` on this host."""

    root: Path
    env: dict[str, str]
    gcs: str = ""  # RAY_ADDRESS for drivers (host:port of the head's GCS)
    dashboard: str = ""  # job submission address (http://host:port)
    head: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    temp_dirs: list[str] = field(default_factory=list)
    worker_starts: int = 0

    def driver_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, "RAY_ADDRESS": self.gcs, "PYTHONUNBUFFERED": "1", **extra}

    def ray_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.driver_env(), capture_output=True, text=True,
                              timeout=timeout)

    def _temp_dir(self) -> str:
        # Short and our own: unix socket paths have a length limit, and no other Ray on this host may find it.
        path = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")
        self.temp_dirs.append(path)
        return path

    def start_head(self) -> None:
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        log = open(self.root / "head.log", "w")
        self.head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={HEAD_CPUS}",
             '--resources={"head_node": 1}', f"--temp-dir={self._temp_dir()}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--ray-client-server-port={free_port()}", *_agent_ports(), "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_worker(self) -> None:
        """(Re)start the worker node; it joins the head (``wait_for_nodes`` waits until it has)."""
        self.worker_starts += 1
        log = open(self.root / f"worker{self.worker_starts}.log", "w")
        self.worker = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--address={self.gcs}", f"--num-cpus={WORKER_CPUS}",
             '--resources={"worker_node": 1}', f"--temp-dir={self._temp_dir()}", "--node-ip-address=127.0.0.1",
             *_agent_ports(), "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def api(self, path: str) -> object | None:
        """GET the head's dashboard API (``/api/jobs/``, ``/api/v0/nodes``, ...): its JSON, or None while it
        does not answer. Plain HTTP from this process: polling through the ``ray`` CLI would start a Python
        that imports Ray every second, which alone loads a 2-core machine."""
        import httpx
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        try:
            reply = httpx.get(f"{self.dashboard}{path}", headers=get_auth_headers_if_auth_enabled({}), timeout=20)
            return reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes (the state API's node records)."""
        reply = self.api("/api/v0/nodes?limit=100&detail=true")
        if not isinstance(reply, dict) or not reply.get("result"):
            return []
        return [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 300) -> None:
        """Until exactly ``count`` nodes are alive and the head accepts jobs (a lost node counts once the GCS
        has declared it dead: seconds, see ``job_env``)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in (("head", self.head), ("worker", self.worker)):
                assert proc is None or proc.poll() is None or (name == "worker" and count < 2), \
                    f"ray start ({name}) exited: {self.logs()}"
            if len(self.alive_nodes()) == count and isinstance(self.api("/api/jobs/"), list):
                return
            time.sleep(1)
        raise AssertionError(f"the cluster did not reach {count} alive nodes in {timeout:.0f} s: {self.logs()}")

    def kill_worker_raylet(self) -> int:
        """Node loss: SIGKILL the worker node's raylet (its workers die with it), then clear the rest of the
        node's processes. Returns the raylet's pid."""
        assert self.worker is not None
        raylets = [p for p in _group_pids(self.worker.pid) if "raylet/raylet" in _cmdline(p)]
        assert len(raylets) == 1, f"expected one raylet in the worker node's group, found {raylets}"
        os.kill(raylets[0], signal.SIGKILL)
        time.sleep(1)
        _stop_group(self.worker, grace_s=0)  # the rest of the node goes down with it (a lost machine)
        return raylets[0]

    def stop(self) -> None:
        """Stop both nodes; their session logs (Train's controller logs included) are kept under ``root``."""
        for proc in (self.worker, self.head):
            if proc is not None:
                _stop_group(proc, grace_s=5)  # nothing left to save: a graceful stop only costs time
        for i, path in enumerate(self.temp_dirs):
            for logs in Path(path).glob("session_2*/logs"):
                shutil.copytree(logs, self.root / f"ray_logs_{i}", dirs_exist_ok=True,
                                ignore=lambda d, names: [n for n in names if n.endswith((".sock", ".pb"))])
            shutil.rmtree(path, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))


def start_cluster(root: Path, base_dir: Path) -> LocalCluster:
    """A running head + worker node (both alive and accepting jobs); call ``stop()`` when done."""
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root=root, env=job_env(base_dir))
    try:
        cluster.start_head()
        cluster.wait_for_nodes(1)  # a worker node started before the head registered gives up at once
        cluster.start_worker()
        cluster.wait_for_nodes(2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_driver(cluster: LocalCluster, spec: dict) -> subprocess.Popen:
    """Start this file as a training driver against ``cluster`` (its output goes to ``<out>.log``)."""
    out = Path(spec["out"])
    out.with_suffix(".spec.json").write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, __file__, "train", str(out.with_suffix(".spec.json"))],
                            env=cluster.driver_env(NANOCHAT_BASE_DIR=spec["base"], **spec.get("env", {})), cwd=REPO,
                            stdout=open(out.with_suffix(".log"), "w"), stderr=subprocess.STDOUT)


def finish_driver(proc: subprocess.Popen, spec: dict, timeout: float = 600) -> dict:
    """Wait for a driver; return what it wrote (``spec["out"]``), or fail with the tail of its log."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = Path(spec["out"]).with_suffix(".log")
    assert proc.returncode == 0, f"driver failed ({proc.returncode}): {log.read_text()[-4000:]}"
    return json.loads(Path(spec["out"]).read_text())


def run_driver(cluster: LocalCluster, spec: dict, timeout: float = 600) -> dict:
    return finish_driver(start_driver(cluster, spec), spec, timeout)


def wait_for_pause(proc: subprocess.Popen, spec: dict, step: int, timeout: float = 300) -> None:
    """Wait until the driver's run is held after the checkpoint of ``step`` (see ``_pause_callback``)."""
    deadline = time.time() + timeout
    while not (Path(spec["pause_dir"]) / f"paused_{step}").exists():
        assert proc.poll() is None, Path(spec["out"]).with_suffix(".log").read_text()[-4000:]
        assert time.time() < deadline, f"the run never reached its step-{step} checkpoint"
        time.sleep(0.2)


def release(spec: dict, step: int) -> None:
    (Path(spec["pause_dir"]) / f"release_{step}").write_text("go")


def submit_job(cluster: LocalCluster, entrypoint: list[str], submission_id: str, env_vars: dict[str, str],
               wait: bool = True, timeout: float = 1500) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir REPO`` to the cluster's head (``--no-wait`` unless ``wait``).

    Retried while the head's job agent is still registering (it can lag the dashboard on a loaded machine)."""
    runtime_env = json.dumps({"env_vars": env_vars})
    deadline = time.time() + 180
    while True:
        job = cluster.ray_cli("job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
                              "--submission-id", submission_id, "--runtime-env-json", runtime_env,
                              *([] if wait else ["--no-wait"]), "--", *entrypoint, timeout=timeout)
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(5)


def job_status(cluster: LocalCluster, submission_id: str) -> str:
    """PENDING / RUNNING / STOPPED / SUCCEEDED / FAILED, from ``ray job status``'s message."""
    out = cluster.ray_cli("job", "status", "--address", cluster.dashboard, submission_id)
    text = out.stdout + out.stderr
    for phrase, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"), ("failed", "FAILED")):
        if f"'{submission_id}' {phrase}" in text:
            return status
    found = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", text)
    return found.group(1) if found else f"? {text[-300:]}"


# ---- the driver (runs in a subprocess with RAY_ADDRESS set) ----------------------------------------


def _worker_placement(pid_dir: Path) -> tuple[dict[int, str], list[str]]:
    """``({rank: "head" | "worker"}, [node of every training worker actor this job started])``: the node of
    the actor whose pid each rank wrote (the latest worker group), and, for every worker of every group
    (restarts and the workers of a lost node included), ``"head"`` or the id of the worker node it ran on."""
    import ray
    from ray.util.state import list_actors

    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "head_node" in n["Resources"])  # never lost
    job = ray.get_runtime_context().get_job_id()
    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job)], detail=True,
                         limit=1000, raise_on_missing_output=False)
    by_pid = {a["pid"]: ("head" if a["node_id"] == head else "worker") for a in actors}
    ranks = {int(f.stem.split("_")[1]): by_pid.get(int(f.read_text()), "?") for f in sorted(pid_dir.glob("rank_*.pid"))}
    return ranks, ["head" if a["node_id"] == head else a["node_id"] for a in actors]


def _pause_callback(steps: list[int], folder: str, elastic: bool, timeout_s: float = 240):
    """A Train callback (it runs in the controller) that, once per step in ``steps``, after Ray recorded that
    step's checkpoint, writes ``folder/paused_<step>`` and waits for ``folder/release_<step>``: the test
    kills or restarts a node in between. The workers stop at their next report meanwhile (Train's result
    queue holds one report), so the node is lost mid-run, with a checkpoint recorded and steps left.
    ``elastic``: on release, refresh the node view an elastic run sizes its next worker group from."""
    from ray.train import UserCallback

    class PauseAfterCheckpoint(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            step = metrics[0].get("step") if metrics else None
            paused = Path(folder) / f"paused_{step}"
            if checkpoint is None or step not in steps or paused.exists():
                return
            paused.write_text(str(step))
            deadline = time.time() + timeout_s
            while not (Path(folder) / f"release_{step}").exists() and time.time() < deadline:
                time.sleep(0.2)
            if elastic:
                _refresh_node_view()

    return PauseAfterCheckpoint()


def _refresh_node_view() -> None:
    """Make Ray Data's AutoscalingCoordinator (the actor that tells an elastic Train run how many workers
    fit) re-read the cluster's nodes now instead of at its next 20 s tick (``TICK_INTERVAL_S``, Ray 2.60),
    so a run released after a node left or joined sizes its next worker group from the nodes as they are.
    Private API, used by this test seam only; nanochat itself relies on the periodic tick."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("nanochat-tests", recompute=True), timeout=60)


def _drive(spec: dict) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _helpers_train import token_datasets

    from nanochat.ray_utils import init_ray
    from nanochat.tokenizer import Tokenizer
    from nanochat.train.metrics import read_jsonl
    from nanochat.train.trainer import train_stage

    base = Path(spec["base"])
    init_ray(base=base)
    tokenizer = Tokenizer.load(base / "tokenizer")
    pid_dir = Path(spec["out"]).with_suffix(".pids")
    elastic = any(o.startswith("ray.min_workers=") for o in spec["overrides"])
    t0 = time.time()
    result = train_stage(
        "pretrain", "tiny", num_workers=2, tag=spec["tag"], overrides=spec["overrides"],
        datasets=token_datasets(tokenizer, 32, train_rows=spec.get("train_rows", 200), val_rows=32),
        storage_path=spec["storage"], debug_pid_dir=str(pid_dir), base=base,
        callbacks=[_pause_callback(spec["pause_at"], spec["pause_dir"], elastic)] if spec.get("pause_at") else None,
    )
    # After a restart the steps between the checkpoint and the failure are trained and reported again:
    # the last report of each step is the one the finished run stands on.
    records = sorted({r["step"]: r for r in read_jsonl(result.metrics_path) if "train/raw_loss" in r}.values(),
                     key=lambda r: r["step"])
    reported = [r["step"] for r in read_jsonl(result.metrics_path) if "train/raw_loss" in r]
    nodes, actor_nodes = _worker_placement(pid_dir)
    Path(spec["out"]).write_text(json.dumps({
        "steps": [r["step"] for r in records], "losses": [r["train/raw_loss"] for r in records], "reported": reported,
        "rows_consumed": [r["rows_consumed"] for r in records], "ns_min": [r.get("muon/ns_min") for r in records],
        "last": records[-1] if records else {}, "nodes": nodes, "actor_nodes": actor_nodes,
        "seconds": time.time() - t0,
        "result": result.as_dict(),
    }, default=str))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "train":
        _drive(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit("usage: python tests/_cluster.py train SPEC.json")
