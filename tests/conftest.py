"""Shared test fixtures: an isolated artifact dir, tiny tokenizer/model, one local Ray per session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Fast, quiet, CPU-only defaults for every test process (and the Ray workers they start).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The local Ray's dashboard (on for users) costs ~10 processes and ~1 GB: only tests/test_dashboard.py turns it on.
os.environ.setdefault("NANOCHAT_DASHBOARD", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))



def _find_shared() -> Path:
    """The project's shared reference/fixtures folder: $NANOCHAT_SHARED_DIR, next to the checkout, or /work/shared."""
    candidates = [os.environ.get("NANOCHAT_SHARED_DIR"), Path(__file__).resolve().parents[1].parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "fixtures").is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parents[1].parent / "shared"


SHARED = _find_shared()
FIXTURES = SHARED / "fixtures"

TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3,
    "In the beginning God created the heaven and the earth. And the earth was without form. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 4,
    "Numbers 12345 67890 3.14159 and 2024-11-28 appear here. " * 4,
    "日本語のテキストと中文文本, 한국어 텍스트, émojis 🎉🚀 and accents café naïve. " * 3,
]


@contextlib.contextmanager
def _base_dir_env(path: Path) -> Iterator[None]:
    """Set $NANOCHAT_BASE_DIR for session-scoped set-up (monkeypatch is per test), then restore it."""
    saved = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = saved


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    """A fresh $NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real BPE tokenizer trained in-process on a few texts (256 bytes + 9 specials + ~120 merges)."""
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(TINY_TEXTS * 4, vocab_size=256 + 9 + 119)


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_tokenizer):
    """Build a small randomly initialized GPT (non-zero head so outputs are not trivial)."""
    import torch

    from nanochat.model import GPTConfig, build_model

    def make(seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_kv_head: int = 4, seq: int = 128):
        torch.manual_seed(seed)
        config = GPTConfig(
            sequence_len=seq,
            vocab_size=tiny_tokenizer.vocab_size,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            n_embd=n_embd,
        )
        model = build_model(config)
        with torch.no_grad():  # the reference init zeroes the head; give it signal for tests
            for p in model.parameters():
                if p.dim() == 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.05)
        model.eval()
        return model

    return make


@pytest.fixture(scope="session")
def tok(tiny_tokenizer):
    """The session's tiny tokenizer, under the short name the engine tests use."""
    return tiny_tokenizer


@pytest.fixture
def model(tiny_model_factory):
    """A fresh default tiny GPT (seed 0, 2 layers, 64 wide, 4 heads, 128-token context) for one test."""
    return tiny_model_factory()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One embedded local Ray shared by every test that needs it (start-up is ~5 s, ~1 GB).

    Its workers inherit a session-wide scratch $NANOCHAT_BASE_DIR, never the user's ~/.cache; code that
    runs in workers gets the real artifact paths passed explicitly.
    """
    import ray

    from nanochat.ray_utils import init_ray

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("tests start their own local Ray; unset RAY_ADDRESS")
    with _base_dir_env(tmp_path_factory.mktemp("ray_workers_base")):
        init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def _prepared_tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared_tiny")
    with _base_dir_env(root):
        from nanochat.config import load_preset
        from nanochat.sources.pretrain import prepare
        from nanochat.tokenizer_train import train_tokenizer

        prepare("builtin", progress=False)
        train_tokenizer(load_preset("tiny"), max_chars=3_000_000)
    return root


@pytest.fixture
def prepared_tiny_data(_prepared_tiny_root, monkeypatch) -> Path:
    """$NANOCHAT_BASE_DIR with the real builtin shards and the tiny preset's tokenizer (built once)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(_prepared_tiny_root))
    return _prepared_tiny_root


@pytest.fixture(scope="session")
def gloo_world_of_one(tmp_path_factory):
    """A one-process gloo group in this process, so DeepSpeed's engine runs here as in a Ray Train worker.

    One per session: DeepSpeed keeps the first group it saw (``deepspeed.comm``'s backend), so a group
    destroyed after one module and created anew for the next fails there ("Group ... is not registered").
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
