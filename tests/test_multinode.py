"""Training on a real two-node Ray cluster started on this host (tests/_cluster.py), as on a multi-node one.

One cluster (``ray start`` head + worker node) serves the whole module. The training runs are the same
tiny pretraining (ZeRO 2 + Muon, 2 workers, 6 steps, the same rows and seed) driven by a subprocess that
joins the cluster through ``RAY_ADDRESS``; checkpoints go to one ``storage_path`` on this host's disk,
which both nodes see (the shared file system of a real cluster). The single-node reference is the
same run with ``placement_strategy=STRICT_PACK`` (both workers on one node), made once for the module;
the two-node run (``STRICT_SPREAD``) is the one that loses its worker node halfway. The elastic run and
the ``ray job submit`` of the pipeline use the same cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from _cluster import (
    BIN,
    finish_driver,
    job_status,
    release,
    run_driver,
    start_cluster,
    start_driver,
    submit_job,
    wait_for_pause,
)
from _helpers_train import tiny_overrides

from nanochat.config import ConfigError, load_preset
from nanochat.train.scaling import check_elastic, scaling_config
from nanochat.train.schedule import BatchSizeError
from nanochat.train.trainer import train_stage

STEPS = 6
# Both placements run the same fp32 ops on the same rows in the same order, and gloo over TCP sums two
# ranks' gradients in the same order whether the peer is on this node or another, so the losses should
# be identical; measured: identical to the last bit (and after the node-loss restart too). The bound
# leaves the room test_muon_zero.py leaves between ZeRO stages (1e-4: reduction-order noise through
# Newton-Schulz over 10 steps) and is ~10^4 below how far the loss moves in these 6 steps (> 0.5 nats).
LOSS_TOL = 1e-4


def _overrides(placement: str, **extra) -> list[str]:
    """ZeRO 2 + Muon on the tiny shape; ``extra`` (``section__field=value``) comes last and wins."""
    return tiny_overrides(steps=STEPS) + [
        "pretrain.zero_stage=2", "pretrain.optimizer=muon_adamw", "pretrain.compile=false",
        "pretrain.report_every=1", "pretrain.eval_every=-1", f"ray.placement_strategy={placement}",
    ] + [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]


# ---- fast: the preset's placement and elastic options become Ray Train's ScalingConfig -------------------


def test_placement_strategy_reaches_the_scaling_config():
    preset = load_preset("tiny", ["ray.num_workers=2", "ray.placement_strategy=STRICT_SPREAD"])
    config = scaling_config(preset, use_gpu=False, resources={"CPU": 1.0})
    assert (config.num_workers, config.placement_strategy) == (2, "STRICT_SPREAD")
    assert load_preset("tiny").ray.placement_strategy == "PACK"  # Ray's default, unchanged


def test_an_unknown_placement_strategy_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="ray.placement_strategy.*STRICT_SPREAD"):
        load_preset("tiny", ["ray.placement_strategy=ANYWHERE"])


def test_min_workers_makes_an_elastic_worker_range_resized_every_elastic_resize_s():
    preset = load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=1", "ray.max_failures=-1"])
    config = scaling_config(preset, use_gpu=False, resources={"CPU": 1.0})
    assert config.num_workers == (1, 2) and config.elasticity_enabled
    assert config.elastic_resize_monitor_interval_s == 30  # the preset default (Ray's own is 60 s)
    faster = load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=1", "ray.elastic_resize_s=1.5"])
    assert scaling_config(faster, use_gpu=False, resources={"CPU": 1.0}).elastic_resize_monitor_interval_s == 1.5
    with pytest.raises(ConfigError, match="min_workers"):
        load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=3"])
    with pytest.raises(ConfigError, match="elastic_resize_s"):
        load_preset("tiny", ["ray.elastic_resize_s=0"])


def test_elastic_training_refuses_zero_shards_and_runs_without_retries():
    preset = load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=1", "ray.max_failures=1"])
    with pytest.raises(ConfigError, match="needs zero_stage 0"):
        check_elastic(preset, zero_stage=2)
    check_elastic(preset, zero_stage=0)
    with pytest.raises(ConfigError, match="max_failures"):
        check_elastic(load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=1"]), zero_stage=0)


def test_an_elastic_run_needs_a_global_batch_every_worker_count_divides(base_dir):
    """256 tokens per step = 4 rows x 32 tokens x 2 micro-steps on 1 worker or 1 on 2, but not on 3 workers:
    refused before any Ray worker starts, naming the count."""
    with pytest.raises(BatchSizeError, match="num_workers = 4 x 32 x 3"):
        train_stage("pretrain", "tiny", overrides=tiny_overrides(ray__num_workers=3, ray__min_workers=1,
                                                                ray__max_failures=1), base=base_dir)


# ---- slow: on the two-node cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer) -> Path:
    """The artifacts root every driver of this module uses (tokenizer saved once), and its storage."""
    root = tmp_path_factory.mktemp("multinode")
    tiny_tokenizer.save(root / "base" / "tokenizer")
    (root / "storage").mkdir()
    return root


@pytest.fixture(scope="module")
def cluster(workspace):
    cl = start_cluster(workspace / "cluster", workspace / "base")
    yield cl
    cl.stop()


def _spec(workspace: Path, name: str, placement: str, **extra) -> dict:
    return {"base": str(workspace / "base"), "storage": str(workspace / "storage"), "tag": name,
            "out": str(workspace / f"{name}.json"), "overrides": _overrides(placement, **extra)}


def _pausing(spec: dict, workspace: Path, *steps: int) -> dict:
    """The run is held after Ray recorded the checkpoint of each of ``steps`` until the test releases it."""
    spec.update(pause_at=list(steps), pause_dir=str(workspace / f"{spec['tag']}_pause"))
    Path(spec["pause_dir"]).mkdir()
    return spec


@pytest.fixture(scope="module")
def one_node_run(cluster, workspace) -> dict:
    """The reference: 2 workers packed on one node of the same cluster."""
    return run_driver(cluster, _spec(workspace, "one_node", "STRICT_PACK"))


@pytest.mark.slow
@pytest.mark.multinode
def test_one_node_reference_ran_both_workers_on_one_node(one_node_run):
    assert one_node_run["steps"] == list(range(1, STEPS + 1))
    assert len(one_node_run["actor_nodes"]) == 2 and len(set(one_node_run["actor_nodes"])) == 1, one_node_run
    assert one_node_run["losses"][0] - one_node_run["losses"][-1] > 0.5  # it trains


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_two_nodes_train_zero2_muon_to_the_one_node_losses_and_survive_losing_the_worker_node(
        cluster, workspace, one_node_run):
    """2 workers, one per node (STRICT_SPREAD), ZeRO 2 + Muon. The worker node's raylet is SIGKILLed once Ray
    recorded step 2's checkpoint (the run held there by a callback, steps 3-6 still to train) and a new node
    is brought up: with max_failures=1 the run restarts from step 2 across the head and the new node and
    finishes at step 6, with the one-node reference's losses at every step."""
    spec = _pausing(_spec(workspace, "two_nodes", "STRICT_SPREAD", pretrain__save_every=2, ray__max_failures=1),
                    workspace, 2)
    proc = start_driver(cluster, spec)
    try:
        wait_for_pause(proc, spec, 2)
        killed = cluster.kill_worker_raylet()
        cluster.wait_for_nodes(1)  # the GCS declared the node dead ...
        cluster.start_worker()  # ... and a replacement joined: STRICT_SPREAD needs two nodes again
        cluster.wait_for_nodes(2)
    finally:
        release(spec, 2)
    run = finish_driver(proc, spec, timeout=600)
    assert killed > 0
    assert run["steps"] == list(range(1, STEPS + 1))  # the same final step count
    assert run["result"]["num_iterations"] == STEPS
    # Two worker groups of one worker per node: the lost group on the head and the killed node, the
    # restarted one on the head and the replacement node.
    nodes = Counter(run["actor_nodes"])
    assert len(run["actor_nodes"]) == 4 and nodes.pop("head") == 2 and list(nodes.values()) == [1, 1], nodes
    assert set(run["nodes"].values()) == {"head", "worker"}, run["nodes"]
    # Resumed at step 2's checkpoint, not from scratch: steps 1-2 were trained once; steps 3.. by the
    # restarted group (the lost group's queued step-3 report may come first). They match the one-node
    # reference, so two-node training computes what one node does, and the restored weights, ZeRO shards
    # and data position (the rows consumed skipped, none twice) are exact.
    assert run["reported"].count(1) == 1 and run["reported"].count(2) == 1, run["reported"]
    assert run["reported"][-4:] == [3, 4, 5, 6], run["reported"]
    assert run["losses"] == pytest.approx(one_node_run["losses"], abs=LOSS_TOL)
    assert run["rows_consumed"] == [8 * s for s in run["steps"]]
    # Newton-Schulz ran on every matrix at every step each group trained (its count starts at the restart).
    assert all(n >= (s if s <= 2 else s - 2) for s, n in zip(run["steps"], run["ns_min"], strict=True)), run["ns_min"]
    # The final checkpoint was written by both ranks (ZeRO 2 shards, one per node) to the shared storage.
    final = Path(run["result"]["run_path"]) / f"step_{STEPS:06d}"
    assert final.is_dir(), sorted(p.name for p in Path(run["result"]["run_path"]).iterdir())
    shards = sorted(p.name for p in final.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    record = json.loads((Path(run["result"]["run_path"]) / "checkpoint_manager_snapshot.json").read_text())
    assert f"step_{STEPS:06d}" in json.dumps(record)


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_an_elastic_run_shrinks_when_a_node_is_lost_and_regrows_when_it_returns(cluster, workspace):
    """num_workers=(1, 2), one per node (2 of a node's 3 CPUs each), ZeRO 0: the worker node is lost after
    step 2's checkpoint, the run goes on from there with 1 worker on the head (twice the gradient
    accumulation: still 256 tokens per step); a node joins during the step-4 checkpoint and the run grows to
    2 workers again from there, finishing every step."""
    spec = _pausing(_spec(workspace, "elastic", "STRICT_SPREAD", pretrain__save_every=2, pretrain__zero_stage=0,
                          ray__min_workers=1, ray__max_failures=-1, ray__cpus_per_worker=2, ray__elastic_resize_s=1),
                    workspace, 2, 4)
    proc = start_driver(cluster, spec)
    try:
        wait_for_pause(proc, spec, 2)
        cluster.kill_worker_raylet()
        # Released once the GCS declared the node dead: the restart then sizes its group from the head alone
        # (see _cluster._refresh_node_view), 1 worker, instead of waiting out a start timeout for 2.
        cluster.wait_for_nodes(1)
        release(spec, 2)
        wait_for_pause(proc, spec, 4)  # reached by the one worker left on the head node
        cluster.start_worker()
        cluster.wait_for_nodes(2)
    finally:
        release(spec, 2)
        release(spec, 4)
    run = finish_driver(proc, spec, timeout=600)
    assert run["steps"] == list(range(1, STEPS + 1))
    # Three worker groups: 2 workers (head + the lost node), 1 (head), 2 again (head + the new node).
    nodes = Counter(run["actor_nodes"])
    assert len(run["actor_nodes"]) == 5 and nodes.pop("head") == 3 and list(nodes.values()) == [1, 1], nodes
    assert set(run["nodes"].values()) == {"head", "worker"}, run["nodes"]
    # Which worker count trained each step: at ZeRO 0 every rank orthogonalizes every matrix, and the count
    # (summed over ranks) starts with each group, so it is (steps since the group started) x workers.
    assert run["ns_min"] == [2, 4, 1, 2, 2, 4], run["ns_min"]
    # Steps 1-2 by the first group, then on from each checkpoint: nothing before a checkpoint trained again.
    assert run["reported"].count(1) == 1 and run["reported"].count(2) == 1, run["reported"]
    assert run["reported"][-2:] == [5, 6], run["reported"]
    # The global batch stayed 8 rows (256 tokens) per step whatever the worker count, and the data
    # position went on from each checkpoint's row count: 8 rows more per step, none lost or repeated.
    assert run["rows_consumed"] == [8 * s for s in run["steps"]], run["rows_consumed"]
    assert run["losses"][0] - run["losses"][-1] > 0.5


# ---- `ray job submit` of the whole pipeline to the cluster: logs, stop, resubmit ------------------------

# The tiny preset made as small as a job test can be: the stages up to pretraining run for real, a
# smaller tokenizer corpus, one 4-row micro-batch per step, a checkpoint every 2 of 16 steps (a stop
# during pretraining finds one, and lands before the end: stopping takes a few steps' time) and a
# progress line per step.
PIPELINE_STEPS = 16
PIPELINE_OVERRIDES = [
    "tokenizer.max_chars=2000000", f"pretrain.num_iterations={PIPELINE_STEPS}", "pretrain.device_batch_size=4",
    "pretrain.total_batch_size=1024", "pretrain.save_every=2", "pretrain.eval_every=-1", "pretrain.eval_tokens=2048",
    "pretrain.report_every=1", "pretrain.dtype=float32",  # fp32: both jobs compute the same losses (no bf16 probe)
]


def _printed_losses(log: str) -> dict[int, float]:
    """Step -> the smoothed training loss a job printed on its per-step progress line (``base step N/M | loss X``)."""
    return {int(step): float(loss) for step, loss in re.findall(r"(?m)^base step (\d+)/\d+ \| loss ([\d.]+)", log)}


def _stages(base: Path) -> dict:
    path = base / "runs" / "tiny" / "stages.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(1200)
def test_pipeline_job_submit_stop_and_resubmit_resumes_the_stopped_stage_from_its_checkpoint(cluster, workspace):
    """`ray job submit` of ray_jobs/pipeline.py to the two-node cluster; `ray job logs --follow` shows the
    stage progress; `ray job stop` once pretraining recorded a checkpoint; the resubmitted job skips every
    finished stage and resumes pretraining from that checkpoint. The head's dashboard lists both jobs and
    Train's runs."""
    base = workspace / "pipeline"
    entry = ["python", "ray_jobs/pipeline.py", "--preset", "tiny", "--stop-after", "pretrain",
             *[arg for o in PIPELINE_OVERRIDES for arg in ("--set", o)]]
    env_vars = {"NANOCHAT_BASE_DIR": str(base)}
    first = submit_job(cluster, entry, "pipeline-1", env_vars, wait=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    followed = workspace / "pipeline-1.follow.log"
    with followed.open("w") as sink:
        follow = subprocess.Popen([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, "--follow",
                                   "pipeline-1"], env=cluster.driver_env(), stdout=sink, stderr=subprocess.STDOUT)
    record = base / "ray_results" / "base-d4" / "checkpoint_manager_snapshot.json"
    try:
        deadline = time.time() + 600
        while not record.exists():  # Ray recorded pretraining's first checkpoint
            status = job_status(cluster, "pipeline-1") if follow.poll() is not None else "RUNNING"
            assert status in ("PENDING", "RUNNING") and time.time() < deadline, (status, followed.read_text()[-3000:])
            time.sleep(0.5)
        stop = cluster.ray_cli("job", "stop", "--address", cluster.dashboard, "pipeline-1", timeout=120)
        assert stop.returncode == 0, (stop.stdout + stop.stderr)[-2000:]
        follow.wait(timeout=120)  # --follow ends with the job
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    text = followed.read_text()
    for line in ("[1/11] data ", "[2/11] tokenizer ", "[3/11] tok_eval ", "[4/11] pretrain ", "tok_eval  finished in",
                 f"base step 2/{PIPELINE_STEPS}"):  # stage progress and pretraining's per-step line, as the job printed them
        assert line in text, (line, text[-3000:])
    assert job_status(cluster, "pipeline-1") == "STOPPED"
    stages = _stages(base)
    assert all(stages[s]["status"] == "done" for s in ("data", "tokenizer", "tok_eval")), stages
    assert stages["pretrain"]["status"] != "done", stages

    second = submit_job(cluster, entry, "pipeline-2", env_vars, wait=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in out, out[-5000:]
    for stage in ("data", "tokenizer", "tok_eval"):
        assert f"{stage:<9} done already" in out, (stage, out[-5000:])
    assert "pretrain  done already" not in out and "pretrain  finished in" in out, out[-5000:]
    resumed = int(out.split("resuming base/d4 from the latest checkpoint Ray recorded (step ")[1].split(")")[0])
    assert 2 <= resumed < PIPELINE_STEPS and resumed % 2 == 0, resumed  # the stopped job's checkpoint, not step 0
    trained = sorted({int(step) for step in re.findall(r"(?m)^base step (\d+)/", out)})
    assert trained == list(range(resumed + 1, PIPELINE_STEPS + 1)), trained  # on from there, to the end
    assert all(stages_now["status"] == "done" for stages_now in _stages(base).values())
    assert (base / "checkpoints" / "base" / "d4").is_dir()

    jobs = {j["submission_id"]: j for j in cluster.api("/api/jobs/") or []}
    assert (jobs["pipeline-1"]["status"], jobs["pipeline-2"]["status"]) == ("STOPPED", "SUCCEEDED"), jobs
    assert jobs["pipeline-2"]["entrypoint"].startswith("python ray_jobs/pipeline.py"), jobs["pipeline-2"]
    runs = (cluster.api("/api/train/v2/runs/v1") or {}).get("train_runs", [])
    statuses = [r["status"] for r in runs if r["name"] == "base-d4"]  # the stopped run and the resumed one
    assert len(statuses) == 2 and "FINISHED" in statuses, runs
    # Resume never mixes two checkpoints: the steps the stopped job trained past the recorded checkpoint
    # (before `ray job stop` ended it) are trained again from that checkpoint's weights, optimizer state,
    # smoothed loss and data position, so they print the stopped job's losses (fp32, the same rows in the
    # same order: identical). This once failed in 2 of ~10 runs (issue 14): the resumed job trained rows 0-3
    # again, because Ray Data ran the single SkipRows actor's tasks out of order (now one at a time, in
    # order; a resumed worker also checks its first micro-batch against the checkpoint's digest of it).
    stopped_losses, resumed_losses = _printed_losses(text), _printed_losses(out)
    again = sorted(set(stopped_losses) & set(resumed_losses))
    positions = [(r["step"], r.get("epoch"), r.get("rows_consumed"), r.get("train/raw_loss"))
                 for r in map(json.loads, (base / "checkpoints" / "base" / "d4" / "metrics.jsonl").read_text().splitlines())]
    # The one-worker run records the digest of the next micro-batch that a resume checks (not after the end).
    states = [json.loads(p.read_text()) for p in sorted((base / "ray_results" / "base-d4").glob("step_*/train_state.json"))]
    assert states and all(s["next_batch"] for s in states[:-1]) and states[-1]["next_batch"] is None, states
    assert [resumed_losses[s] for s in again] == pytest.approx([stopped_losses[s] for s in again], abs=LOSS_TOL), (
        f"the resumed job's losses differ from the stopped job's at steps {again}: stopped {stopped_losses}, "
        f"resumed {resumed_losses}; (step, epoch, rows, raw loss) {positions}")
