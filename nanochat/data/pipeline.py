"""The pretraining input pipeline on Ray Data: parquet shards → tokens → packed training rows.

``read_parquet`` (small blocks) → one ``map_batches`` stage on an actor pool whose class UDF loads
the tokenizer once per actor, prepends BOS to every document and packs each batch of documents
into rows of ``T+1`` tokens → rows ``{"inputs": int32[T], "targets": int64[T]}`` (targets are
the inputs shifted by one). Packing follows nanochat: ``bestfit`` (default) fills each row with
the largest whole documents that fit and crops the shortest one to fill the rest, so every row
starts with BOS and nothing is padded; ``stream`` concatenates documents and cuts windows. The
packing buffer is one batch of ``pack_buffer`` documents (nanochat keeps a rolling 1000).

Determinism: ordering is preserved (``preserve_order``) and every stage is a pure function of its
batch (but the resume's :class:`SkipRows`, which runs on one actor strictly in stream order), so the
same preset gives the same rows in the same order on every run. Epoch ``e > 0``
visits the train files in an order permuted by ``data.seed + e``.

The trainer caps how far the stream may run ahead (``ingest_buffer_bytes``: backpressure), so the
tokenize actor works only as fast as training consumes. On a 2-core machine this streams and never
starves the trainer: blocks are capped at
``target_max_block_size`` (256 KiB) so Train's equal split can hand out the first batch long
before the read ends, and every data task/actor asks for a fraction of a CPU (the embedded Ray
also overcommits logical CPUs; see ``nanochat.ray_utils``).

Consumption inside ``TorchTrainer`` (each worker gets a disjoint streaming split)::

    train_ds, val_ds = build_pretrain_datasets(preset, num_epochs=-1, skip_rows=rows_done)
    trainer = TorchTrainer(loop, datasets={"train": train_ds, "val": val_ds},
                           dataset_config=pretrain_data_config(buffer_bytes=ingest_buffer_bytes(...)), ...)

    def loop(config):  # on each worker
        it = ray.train.get_dataset_shard("train")
        for batch in it.iter_torch_batches(batch_size=B, dtypes=None, drop_last=True):
            x, y = batch["inputs"].long(), batch["targets"]   # [B, T] each
            ...

Each call of ``iter_torch_batches`` on a shard re-runs the pipeline from the start. For more
rows than one pass gives, build with ``num_epochs=N`` (one stream over N passes) or ``-1``
(practically endless); to resume, pass ``skip_rows`` = rows already consumed by all workers.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nanochat.common import NanochatError, base_dir, get_logger
from nanochat.data.packing import pack_best_fit_cropped, pack_stream

log = get_logger(__name__)

MAX_BLOCK_BYTES = 256 * 1024  # small blocks: Train's equal split can stream (ray-on-this-machine #3)
DATA_CPUS = 0.25  # per read task / actor: Train workers hold whole CPUs (ray-on-this-machine #2)
# Fractional CPUs alone would let Ray start one worker process per 0.25 CPU (each ~2-5 s of imports
# on 2 cores); a fixed, small number of concurrent read tasks keeps start-up cheap.
# "num_epochs=-1": passes enough for any run, yet a file list Ray Data lists quickly (its file
# listing costs CPU per path: 9 shards x 1000 passes took ~15 s of a core at start-up on 2 cores).
ENDLESS_PATHS = 2000


# ---- the training-row contract (pure numpy) -------------------------------------------------------


def rows_to_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Split ``[N, T+1]`` packed rows into the training contract ``inputs``/``targets`` ``[N, T]``."""
    return {"inputs": rows[:, :-1].astype(np.int32), "targets": rows[:, 1:].astype(np.int64)}


# ---- Ray Data stages ------------------------------------------------------------------------------


class TokenizeAndPack:
    """Class UDF for ``map_batches``: the tiktoken Encoding is loaded once per actor."""

    def __init__(
        self,
        tokenizer_dir: str,
        row_len: int,
        packing: str = "bestfit",
        num_threads: int = 1,
        trace_dir: str | None = None,
    ):
        from nanochat.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.load(tokenizer_dir)
        self.bos = self.tokenizer.get_bos_token_id()
        self.row_len = row_len
        self.pack = {"bestfit": pack_best_fit_cropped, "stream": pack_stream}[packing]
        self.num_threads = num_threads
        self.trace_dir = trace_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.trace_dir:  # one marker file per batch: lets a test see how far the stream has run
            import uuid

            Path(self.trace_dir, uuid.uuid4().hex).touch()
        texts = [str(t) for t in batch["text"]]
        docs = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads) if texts else []
        return rows_to_batch(self.pack(docs, self.row_len))


class SkipRows:
    """Drop the first ``n`` rows of an ordered stream; right only if it sees the blocks in stream order.

    Ray Data 2.60 runs a map actor's tasks out of order by default (two in flight, and a task whose
    input block is already local, e.g. a small one inlined in the call, overtakes one whose block is
    still being fetched) and restarts a dead actor (the count starts over): either drops the wrong
    rows, which a resumed run then trains again. :func:`tokenized_dataset` runs this stage with
    :data:`SKIP_ROWS_OPTIONS` (one actor, one task at a time, in order, no restart); should a block
    of the stream still arrive after rows of a later block were dropped, this raises RuntimeError.
    """

    def __init__(self, n: int):
        self.remaining = n
        self.cut_block = -1  # the latest block (Ray Data task index) rows were dropped from

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        block = _task_index()
        if block is not None and block < self.cut_block:
            raise RuntimeError(f"SkipRows got block {block} of the stream after dropping rows of block "
                               f"{self.cut_block}: its blocks arrived out of order, so it dropped the wrong rows")
        if self.remaining <= 0:
            return batch
        k = min(self.remaining, len(batch["inputs"]))
        self.remaining -= k
        if block is not None:
            self.cut_block = max(self.cut_block, block)
        return {key: value[k:] for key, value in batch.items()}


# How the SkipRows stage runs (see SkipRows): one task in flight, executed in submission order, no restart.
SKIP_ROWS_TASKS_IN_FLIGHT = 1
SKIP_ROWS_OPTIONS = {"allow_out_of_order_execution": False, "max_restarts": 0}


def skip_first_rows(ds, n: int, udf: type[SkipRows] = SkipRows):
    """``ds`` (ordered, with an ``inputs`` column) without its first ``n`` rows: ``udf`` on one actor, in order."""
    import ray.data

    with warnings.catch_warnings():  # Ray 2.60 deprecates actor options as **kwargs, and offers no other way
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return ds.map_batches(
            udf,
            fn_constructor_kwargs={"n": n},
            batch_size=None,
            batch_format="numpy",
            # "true multi-threading" with one task in flight: the UDF runs in the task's own thread, where
            # Ray Data's TaskContext (the block's index, which SkipRows checks) is visible.
            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=SKIP_ROWS_TASKS_IN_FLIGHT,
                                               enable_true_multi_threading=True),
            num_cpus=0.1,
            **SKIP_ROWS_OPTIONS,
        )


def _task_index() -> int | None:
    """The running Ray Data task's index in its operator (tasks are numbered in input order), else None."""
    try:
        from ray.data._internal.execution.interfaces.task_context import TaskContext
    except ImportError:  # another Ray version: SkipRows then relies on SKIP_ROWS_OPTIONS alone
        return None
    ctx = TaskContext.get_current()
    return ctx.task_idx if ctx is not None else None


@contextlib.contextmanager
def _small_blocks() -> Iterator[None]:
    """Build datasets under a DataContext with small blocks; each Dataset keeps its own copy."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.target_max_block_size, ctx.execution_options.preserve_order)
    ctx.target_max_block_size = MAX_BLOCK_BYTES
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.execution_options.preserve_order = saved


def endless_epochs(num_files: int) -> int:
    """Passes for an "endless" stream: ~``ENDLESS_PATHS`` paths in all, at least 2 and at most 500."""
    return min(500, max(2, -(-ENDLESS_PATHS // max(1, num_files))))


def distinct_paths(paths: Sequence[str]) -> list[str]:
    """Make repeated paths textually distinct: ``dir/./name`` for a file's 2nd read, ``dir/././name`` for its 3rd...

    Ray Data 2.60 reads a path listed several times in one ``read_parquet`` only once (while its
    metadata-based ``count()`` still counts every copy), which silently turned N epochs into one.
    """
    seen: Counter[str] = Counter()
    out = []
    for path in paths:
        repeat, seen[path] = seen[path], seen[path] + 1
        head, name = os.path.split(path)
        out.append(os.path.join(head, *(["."] * repeat), name) if repeat else path)
    return out


def epoch_file_order(files: Sequence[Path], num_epochs: int, seed: int) -> list[str]:
    """Train files for ``num_epochs`` passes: epoch 0 in shard order, epoch e permuted by seed+e."""
    out: list[str] = []
    for epoch in range(num_epochs):
        order = [str(f) for f in files]
        if epoch:
            random.Random(seed + epoch).shuffle(order)
        out.extend(order)
    return out


def tokenized_dataset(
    files: Sequence[str],
    tokenizer_dir: str | Path,
    row_len: int,
    *,
    packing: str = "bestfit",
    pack_buffer: int = 256,
    num_actors: int = 1,
    num_threads: int = 1,
    skip_rows: int = 0,
    read_tasks: int = 1,
    trace_dir: str | None = None,
):
    """``read_parquet(files)`` → tokenize + pack on an actor pool (→ skip the first rows)."""
    import ray.data

    with _small_blocks():
        ds = ray.data.read_parquet(
            list(files), columns=["text"], num_cpus=DATA_CPUS, concurrency=read_tasks, file_extensions=None
        )
        ds = ds.map_batches(
            TokenizeAndPack,
            fn_constructor_kwargs={
                "tokenizer_dir": str(tokenizer_dir),
                "row_len": row_len,
                "packing": packing,
                "num_threads": num_threads,
                "trace_dir": trace_dir,
            },
            batch_size=pack_buffer,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=DATA_CPUS,
        )
        if skip_rows > 0:
            ds = skip_first_rows(ds, skip_rows)
    return ds


def build_pretrain_datasets(
    preset,
    tokenizer_dir: str | Path | None = None,
    *,
    num_epochs: int = 1,
    skip_rows: int = 0,
    val_rows: int | None = None,
    pack_buffer: int = 256,
    num_actors: int | None = None,
    trace_dir: str | None = None,
    base: str | os.PathLike | None = None,
):
    """``(train_ds, val_ds)`` of packed rows ``{"inputs": int32[T], "targets": int64[T]}``.

    ``preset``: a Preset or preset name. ``num_epochs``: passes over the train shards in one
    stream (-1: practically endless). ``skip_rows``: rows of the train stream to drop first (resume).
    ``val_rows``: cap on val rows (default: ``pretrain.eval_tokens / T``, rounded up).
    ``trace_dir``: the train tokenizer writes one marker file per batch there (progress probe). Builtin
    shards are prepared on demand; the tokenizer must exist (``nanochat tok train``). ``base``: the
    artifacts root holding the shards and the default tokenizer (default ``$NANOCHAT_BASE_DIR``).
    """
    from nanochat.config import load_preset
    from nanochat.sources.pretrain import ensure_prepared, list_shards
    from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

    if isinstance(preset, str):
        preset = load_preset(preset)
    if num_epochs == 0 or num_epochs < -1:
        raise NanochatError(f"num_epochs must be >= 1 or -1 (endless), got {num_epochs}")
    if skip_rows < 0:
        raise NanochatError(f"skip_rows must be >= 0, got {skip_rows}")
    data = preset.data
    base = base_dir(base)
    tokenizer_dir = Path(tokenizer_dir or default_tokenizer_dir(base)).resolve()
    tokenizer = Tokenizer.load(tokenizer_dir)  # fail here, on the driver, with the fix in the message
    if tokenizer.vocab_size != preset.tokenizer.vocab_size:
        log.warning("tokenizer in %s has %d ids, preset says %d", tokenizer_dir, tokenizer.vocab_size,
                    preset.tokenizer.vocab_size)
    ensure_prepared(data.source, data.num_shards, base)
    train_files, val_files = list_shards(data.source, "train", base), list_shards(data.source, "val", base)
    if data.num_shards > 0:
        train_files = train_files[: data.num_shards]
    T = preset.model.sequence_len
    common = {
        "tokenizer_dir": tokenizer_dir,
        "row_len": T + 1,
        "packing": data.packing,
        "pack_buffer": pack_buffer,
        "num_actors": num_actors or 1,
        "num_threads": data.tokenizer_threads,
    }
    epochs = endless_epochs(len(train_files)) if num_epochs == -1 else num_epochs
    train_files = distinct_paths(epoch_file_order(train_files, epochs, data.seed))
    train_ds = tokenized_dataset(train_files, skip_rows=skip_rows, trace_dir=trace_dir, **common)
    val_ds = tokenized_dataset([str(f) for f in val_files], **common)
    val_rows = val_rows if val_rows is not None else -(-preset.pretrain.eval_tokens // T)
    if val_rows > 0:
        with _small_blocks():
            val_ds = val_ds.limit(val_rows)
    return train_ds, val_ds


def ingest_buffer_bytes(world: int, device_batch_size: int, seq_len: int, buffer_mb: float | None = None) -> float:
    """Object-store bytes the ingest may fill ahead of the trainer: 32 micro-batches per worker, >= 16 MiB.

    Without a cap, Ray Data's budget is a share of the whole object store, so on an endless stream the
    tokenize actor keeps running far ahead and takes CPU from training (measured on 2 cores: 80 document
    batches tokenized while the trainer used 15; with 16 MiB, 15 and no more data wait).
    """
    if buffer_mb:
        return buffer_mb * 2**20
    row_bytes = seq_len * (4 + 8)  # int32 inputs + int64 targets
    return max(16 * 2**20, 32 * world * device_batch_size * row_bytes)


def pretrain_data_config(datasets_to_split="all", buffer_bytes: float | None = None):
    """``ray.train.DataConfig`` that keeps our ordering (Train otherwise resets execution options).

    ``buffer_bytes`` caps the object-store memory the ingest pipeline may fill ahead of the trainer
    (backpressure); ``None`` leaves Ray Data's default budget.
    """
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    with warnings.catch_warnings():  # Ray 2.60's own defaults trip its exclude_resources deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        limits = DataConfig.default_ingest_options().resource_limits
        if buffer_bytes is not None:
            limits = ExecutionResources(cpu=limits.cpu, gpu=limits.gpu, object_store_memory=buffer_bytes,
                                        memory=limits.memory)
        options = ExecutionOptions(resource_limits=limits, preserve_order=True, verbose_progress=False)
        return DataConfig(datasets_to_split=datasets_to_split, execution_options=options)
