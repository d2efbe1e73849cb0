"""The one configuration system: pydantic models, YAML presets, ``--set key=value`` overrides.

A *preset* (``nanochat/presets/<name>.yaml``) is a complete run description: tokenizer, model,
data, one training section per stage, Ray resources, evaluation and serving. Every command
loads a preset and applies overrides; invalid values fail here, before any worker starts, with
the field name and the allowed values.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nanochat.common import NanochatError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(NanochatError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerSettings(_Strict):
    vocab_size: int = Field(65536, ge=256 + 9 + 1, description="total vocab incl. the 9 special tokens")
    max_chars: int = Field(2_000_000_000, ge=1, description="stop training after this many characters")
    doc_cap: int = Field(10_000, ge=1, description="truncate each document to this many characters")


class ModelSettings(_Strict):
    depth: int = Field(20, ge=1, description="n_layer; width = depth * aspect_ratio")
    aspect_ratio: int = Field(64, ge=1)
    head_dim: int = Field(128, ge=8)
    n_kv_head: int | None = Field(None, description="GQA key/value heads (default: = n_head)")
    sequence_len: int = Field(2048, ge=8)
    rope_base: float = 10000.0
    logit_softcap: float = 15.0


class DataSettings(_Strict):
    source: Literal["builtin", "fineweb-edu", "climbmix"] = "builtin"
    num_shards: int = Field(-1, description="train shards to download (-1: all); the val shard is always added")
    packing: Literal["bestfit", "stream"] = "bestfit"
    seed: int = 42
    tokenizer_threads: int = Field(1, ge=1)
    ingest_buffer_mb: float | None = Field(
        None, gt=0, description="object-store MiB Ray Data may fill ahead of the trainer (None: 32 micro-batches per worker, >= 16)"
    )


class TrainSettings(_Strict):
    """One training stage (pretrain, midtrain or sft) on the shared loop."""

    device_batch_size: int = Field(32, ge=1, description="rows per worker per micro-step")
    total_batch_size: int = Field(524_288, ge=1, description="tokens per optimizer step (all workers)")
    num_iterations: int = Field(-1, description="optimizer steps; -1 = derive from the horizon below")
    target_param_data_ratio: float = Field(20.0, description="tokens = ratio x params when num_iterations=-1")
    num_epochs: float = Field(1.0, gt=0, description="mid/sft: passes over the mixture when num_iterations=-1")
    optimizer: Literal["muon_adamw", "adamw", "deepspeed_adamw"] = "muon_adamw"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the training forward/backward and Muon's Newton-Schulz step "
        "(auto: when the backend works, ZeRO < 3 and >= 2 min of training are left; see docs/training.md)"
    )
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    adamw_lr: float = Field(3e-3, description="lr of every parameter with optimizer=adamw|deepspeed_adamw")
    weight_decay: float = 0.0
    init_lr_frac: float = Field(1.0, gt=0, description="multiplier on every initial LR (SFT uses 0.02)")
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmdown_ratio: float = Field(0.2, ge=0, le=1)
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    eval_every: int = Field(250, description="val bpb/loss every N steps (-1: only at the end)")
    eval_tokens: int = Field(20 * 524_288, ge=1)
    sample_every: int = Field(2000, description="greedy samples every N steps (-1: only at the end)")
    save_every: int = Field(-1, description="checkpoint every N steps (-1: only at the end)")
    keep_checkpoints: int = Field(
        2, ge=1, description="newest checkpoints kept, both Ray's resume points and the exported "
        "checkpoints/<stage>/<tag>/step_* models (the final one is always kept)"
    )
    report_every: int = Field(10, ge=1, description="ray.train.report / log line every N steps")
    seed: int = Field(42, description="model init seed (pretrain) and per-step RNG")
    chat_eval_problems: int = Field(0, ge=0, description="SFT: MMLU/ARC-Easy letter accuracy on N eval questions at each eval")
    mfu_peak_flops: float | None = Field(None, description="per-worker peak FLOP/s for MFU (default: table/measured)")

    @model_validator(mode="after")
    def _check_optimizer_zero(self) -> TrainSettings:
        # Every optimizer runs under every ZeRO stage (muon_adamw regathers whole matrices from the
        # partitions: nanochat.train.muon_zero); only the offload needs sharded optimizer state.
        if self.offload_optimizer and self.zero_stage < 2:
            raise ValueError("offload_optimizer=true needs zero_stage 2 or 3")
        return self


class RLSettings(_Strict):
    """The ``rl`` stage (nanochat's ``chat_rl``): on-policy REINFORCE after SFT (see docs/rl.md).

    Learning rates are the ``sft`` section's base rates (``matrix_lr``, ``embedding_lr``, …) times
    ``init_lr_frac``, decayed linearly to 0 over the run, as nanochat does."""

    task: Literal["gsm8k", "arithmetic", "spelling_bee"] = Field("gsm8k", description="questions + reward")
    num_samples: int = Field(16, ge=2, description="completions per question (one group)")
    questions_per_step: int = Field(16, ge=1, description="groups per optimizer step")
    num_iterations: int = Field(-1, description="optimizer steps; -1 = one epoch over the train questions")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int | None = Field(50, ge=1)
    init_lr_frac: float = Field(0.05, gt=0, description="multiplier on the sft section's base LRs")
    optimizer: Literal["muon_adamw", "adamw"] = "muon_adamw"
    device_batch_size: int = Field(8, ge=1, description="rows per learner forward/backward")
    grad_clip: float = Field(0.0, ge=0, description="0 disables clipping (nanochat does not clip in RL)")
    num_rollout_actors: int = Field(1, ge=1, description="Ray actors each holding an Engine")
    rollout_batch_size: int = Field(64, ge=1, description="engine slots per rollout actor")
    rollout_cpus: float = Field(1.0, gt=0, description="CPUs per rollout actor (GPU clusters: one GPU each)")
    max_staleness: int = Field(0, ge=0, description="max optimizer steps between the weights that sampled a "
                               "rollout and the weights it trains (0 = on-policy; 1 overlaps rollouts with learning)")
    eval_every: int = Field(60, description="pass@k on held-out questions every N steps (-1: only at the end)")
    eval_questions: int = Field(400, ge=1)
    pass_k: int = Field(8, ge=1, description="samples per held-out question (pass@1..k)")
    save_every: int = Field(60, description="checkpoint every N steps (-1: only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    report_every: int = Field(1, ge=1)
    seed: int = 42


class RaySettings(_Strict):
    num_workers: int = Field(1, ge=1, description="training workers (the most, with min_workers set)")
    min_workers: int | None = Field(
        None, ge=1, description="elastic training: start once this many workers fit and resize between it "
        "and num_workers as nodes leave and return (None: a fixed num_workers; see docs/training.md)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where the training workers go: PACK fills nodes in turn, STRICT_SPREAD puts "
        "each worker on its own node, STRICT_PACK all on one node (Ray placement-group strategies)")
    use_gpu: bool | None = Field(None, description="None = use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint after a "
                              "worker or node fails (-1: without limit)")
    elastic_resize_s: float = Field(30.0, gt=0, description="elastic training: how often (seconds) a running "
                                    "worker group checks whether more workers fit again (Ray's default: 60)")
    storage_path: str | None = Field(None, description="local dir or pyarrow URI (s3://, gs://); default $BASE/ray_results")
    num_cpus: int | None = Field(None, description="logical CPUs for the embedded local Ray (default: max(4, 2*cores))")

    @model_validator(mode="after")
    def _check_elastic(self) -> RaySettings:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        return self


class EvalSettings(_Strict):
    core_max_per_task: int = Field(500, description="-1 = all examples")
    chat_max_problems: int = Field(-1)
    num_actors: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(512, ge=1)


class ServeSettings(_Strict):
    """The ``serve`` section. The address the API listens on is not here: it is the Serve config's
    ``http_options`` (``nanochat serve --host/--port``)."""

    min_replicas: int = Field(1, ge=0, description="engine replicas kept up (0: scale to zero; a request wakes one)")
    max_replicas: int = Field(1, ge=1, description="autoscaling bound (`nanochat serve --replicas MIN:MAX`)")
    router: Literal["prefix", "power_of_two"] = Field(
        "prefix", description="with max_replicas > 1: prefix = a conversation's turns go to the replica holding its "
        "history (an ingress deployment in front), power_of_two = Serve's default router, no ingress hop")
    max_batch_size: int = 16
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_k: int = 50
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' (env NANOCHAT_API_KEY)")
    max_waiting: int = Field(64, ge=1, description="sequences queued beyond the batch before 429s")
    target_ongoing_requests: float = Field(12.0, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests Serve sends one replica at once")
    max_queued_requests: int = Field(256, description="requests Serve queues before 503s (-1: no limit)")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica (None: 1 when the cluster has GPUs)")
    stream_interval_ms: float = Field(50.0, ge=0, description="min gap between SSE chunks of one stream after the first")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads of a CPU replica (None: Ray's default, the replica's num_cpus = 1)"
    )
    tools: bool = Field(True, description="run the python calculator on <|python_start|>…<|python_end|> (as nanochat)")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the decode step, built at replica start (auto: every batch size on GPU; "
        "on CPU the batch sizes whose compiled step measures faster at start, docs/engine.md)"
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_address(cls, data: Any) -> Any:
        """``serve.host``/``serve.port`` were never read: old presets that set them still load, with a warning."""
        if isinstance(data, dict) and ("host" in data or "port" in data):
            data = {k: v for k, v in data.items() if k not in ("host", "port")}
            warnings.warn("serve.host/serve.port are ignored (they never had an effect) and will become an error: "
                          "set the address in the Serve config's http_options or with `nanochat serve --host/--port`",
                          FutureWarning, stacklevel=2)
        return data


class MixturePart(_Strict):
    """Rows per source in one stage's conversation mixture (-1 = all rows of that source, 0 = none)."""

    chat: int = Field(-1, ge=-1, description="SmolTalk (hub) or chatterbot-corpus (builtin) conversations")
    mmlu: int = Field(0, ge=-1, description="MMLU train-side rows (hub: auxiliary_train; builtin: dev+validation)")
    arc: int = Field(0, ge=-1, description="ARC-Easy + ARC-Challenge train-side rows each (hub: train; builtin: validation)")
    gsm8k: int = Field(-1, ge=-1, description="GSM8K train-side rows (hub: train; builtin: test[:819])")
    identity_epochs: int = Field(1, ge=0, description="passes over the identity conversations")
    simple_spelling: int = Field(0, ge=0)
    spelling_bee: int = Field(0, ge=0)


class MixtureSettings(_Strict):
    """Conversation mixtures for mid-training and SFT (see docs/conversation-data.md)."""

    source: Literal["builtin", "hub"] = Field("builtin", description="builtin: offline registry data; hub: HF downloads")
    seed: int = 42
    mid: MixturePart = MixturePart(chat=-1, mmlu=-1, gsm8k=-1, identity_epochs=2, simple_spelling=200_000,
                                   spelling_bee=80_000)
    sft: MixturePart = MixturePart(chat=10_000, arc=-1, gsm8k=-1, identity_epochs=1, simple_spelling=300,
                                   spelling_bee=300)
    val_max: int = Field(5000, ge=-1, description="cap on validation conversations per stage (-1 = all)")


class Preset(_Strict):
    name: str = "custom"
    description: str = ""
    tokenizer: TokenizerSettings = TokenizerSettings()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    pretrain: TrainSettings = TrainSettings()
    midtrain: TrainSettings = TrainSettings(init_lr_frac=1.0, warmdown_ratio=0.2, eval_every=150)
    sft: TrainSettings = TrainSettings(
        init_lr_frac=0.02, warmdown_ratio=1.0, device_batch_size=4, total_batch_size=4 * 2048 * 8
    )
    rl: RLSettings = RLSettings()
    ray: RaySettings = RaySettings()
    eval: EvalSettings = EvalSettings()
    serve: ServeSettings = ServeSettings()
    mixture: MixtureSettings = MixtureSettings()

    @property
    def n_embd(self) -> int:
        return model_dim_for_depth(self.model.depth, self.model.aspect_ratio, self.model.head_dim)


def model_dim_for_depth(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> int:
    """nanochat's depth dial: width = depth * aspect_ratio, rounded up to a whole number of heads."""
    raw = depth * aspect_ratio
    return math.ceil(raw / head_dim) * head_dim


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _parse_value(raw: str) -> Any:
    """CLI override values are YAML scalars: ``3``, ``1e-3``, ``true``, ``null``, ``[1,2]``."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `nanochat config show` lists every field)"
        lines.append(f"  {field}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_preset(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Preset:
    """Load a preset by name (``tiny``, ``d20`` …) or YAML path and apply ``key=value`` overrides.

    Raises:
        ConfigError: unknown preset, malformed override, or a value the settings refuse.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(
            f"unknown preset '{name_or_path}': choose one of {available_presets()} or pass a YAML file path"
        )
    tree = yaml.safe_load(path.read_text()) or {}
    tree.setdefault("name", path.stem)
    return _validated(tree, overrides, str(path))


def apply_overrides(preset: Preset, overrides: list[str] | None) -> Preset:
    """A new preset: ``preset`` with ``key=value`` overrides applied, validated as a YAML preset's are.

    Raises:
        ConfigError: a malformed override or a value the settings refuse.
    """
    return _validated(preset.model_dump(), overrides, f"preset '{preset.name}'")


def _validated(tree: dict[str, Any], overrides: list[str] | None, source: str) -> Preset:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. pretrain.matrix_lr=0.01), got '{item}'")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(raw.strip()))
    try:
        return Preset.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def dump_preset(preset: Preset) -> str:
    return yaml.safe_dump(preset.model_dump(mode="json"), sort_keys=False)
