"""Checkpoints: round trip, atomic writes, validation errors, discovery, nanochat import, CLI wrappers."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_tag,
    find_latest,
    import_nanochat,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from nanochat.cli import main as cli_main
from nanochat.model import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer


@pytest.fixture
def model(tiny_model_factory):
    return tiny_model_factory(n_kv_head=2)


def _save(model, tok, stage="base", tag="d2", step=10, **kw) -> Path:
    return save_checkpoint(
        checkpoint_dir(stage, tag, step), model, model.config, tok, stage=stage, step=step, **kw
    )


def _save_with_config(model, tok, **changes) -> Path:
    """A saved checkpoint whose meta.json's model_config then gets ``changes``."""
    path = _save(model, tok)
    meta = json.loads((path / "meta.json").read_text())
    meta["model_config"].update(changes)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.tensor([[1, 5, 9, 30, 200, 7, 7, 3]])


def test_round_trip_restores_weights_meta_and_tokenizer(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer, metrics={"val/bpb": 1.23})
    assert path == base_dir / "checkpoints" / "base" / "d2" / "step_000010"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "tokenizer"]
    ckpt = load_checkpoint(path)
    assert torch.equal(_logits(ckpt.model, IDS), _logits(model, IDS))
    assert not ckpt.model.training
    assert ckpt.config == model.config
    assert ckpt.tokenizer.fingerprint == tiny_tokenizer.fingerprint
    meta = ckpt.meta
    assert (meta["stage"], meta["step"], meta["tag"], ckpt.tag) == ("base", 10, "d2", "d2")
    assert meta["metrics"] == {"val/bpb": 1.23}
    assert meta["tokenizer"] == {
        "fingerprint": tiny_tokenizer.fingerprint,
        "vocab_size": tiny_tokenizer.vocab_size,
    }
    assert {"nanochat", "torch"} <= set(meta["versions"]) and meta["created"]


def test_save_refuses_tokenizer_model_vocab_mismatch(base_dir, model):
    other = Tokenizer.train_from_iterator(["hello world, this is some text. " * 20], vocab_size=256 + 9 + 10)
    with pytest.raises(CheckpointError, match="vocab"):
        _save(model, other)


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp(
    base_dir, model, tiny_tokenizer, monkeypatch
):
    path = _save(model, tiny_tokenizer)
    before = _logits(load_checkpoint(path).model, IDS)
    import nanochat.checkpoint as ck

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "save_file", half_then_fail)
    changed = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, changed, model.config, tiny_tokenizer, stage="base", step=10)
    assert torch.equal(_logits(load_checkpoint(path).model, IDS), before)
    assert [p.name for p in path.parent.iterdir()] == ["step_000010"]


def test_process_killed_mid_write_leaves_previous_checkpoint_loadable(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    before = _logits(load_checkpoint(path).model, IDS)
    script = textwrap.dedent(
        f"""
        import os, torch
        import nanochat.checkpoint as ck
        def crash(tensors, filename, metadata=None):
            open(filename, "wb").write(b"partial")
            os._exit(9)  # hard crash: no cleanup handlers run
        ck.save_file = crash
        ckpt = ck.load_checkpoint({str(path)!r})
        sd = {{k: v * 2 for k, v in ckpt.model.state_dict().items()}}
        ck.save_checkpoint({str(path)!r}, sd, ckpt.config, ckpt.tokenizer, stage="base", step=10)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert torch.equal(_logits(load_checkpoint(path).model, IDS), before)
    assert find_latest("base") == path  # the orphaned temp dir is not mistaken for a checkpoint


def test_truncated_safetensors_names_the_file(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_safetensors_names_the_file(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(path)


def test_missing_model_file_names_it(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(path)


def test_missing_meta_names_the_file(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json is missing"):
        load_checkpoint(path)


def test_invalid_meta_json_names_the_file(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json is not valid JSON"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_file_and_tensor(base_dir, model, tiny_tokenizer):
    path = _save_with_config(model, tiny_tokenizer, n_embd=128)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: [\w.]+ has shape \(384, 64\), the config needs \(384, 128\)",
    ):
        load_checkpoint(path)


def test_layer_count_mismatch_lists_missing_keys(base_dir, model, tiny_tokenizer):
    path = _save_with_config(model, tiny_tokenizer, n_layer=3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its model_config: missing"):
        load_checkpoint(path)


def test_unknown_config_field_is_reported(base_dir, model, tiny_tokenizer):
    path = _save_with_config(model, tiny_tokenizer, bogus=1)
    with pytest.raises(CheckpointError, match=r"meta\.json: invalid model_config"):
        load_checkpoint(path)


def test_tokenizer_mismatch_with_expected_is_an_error(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    import argparse
    import inspect

    other = Tokenizer.train_from_iterator([inspect.getsource(argparse)], vocab_size=384)
    with pytest.raises(CheckpointError, match="different tokenizer"):
        load_checkpoint(path, expected_tokenizer=other)
    assert (
        load_checkpoint(path, expected_tokenizer=tiny_tokenizer).tokenizer.fingerprint
        == tiny_tokenizer.fingerprint
    )


def test_tampered_tokenizer_copy_names_the_tokenizer_dir(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    ranks = path / "tokenizer" / "mergeable_ranks.tiktoken"
    lines = ranks.read_text().splitlines()
    lines[300], lines[301] = lines[301].split()[0] + " 300", lines[300].split()[0] + " 301"
    ranks.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"tokenizer: tokenizer files do not match the fingerprint"):
        load_checkpoint(path)


def test_expected_stage_is_enforced(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer, stage="base")
    with pytest.raises(CheckpointError, match="'base' checkpoint, but this needs a mid or sft"):
        load_checkpoint(path, expected_stage=("mid", "sft"))


# ---- discovery ---------------------------------------------------------------------------------


def test_find_latest_prefers_deepest_tag_then_highest_step(base_dir, model, tiny_tokenizer):
    _save(model, tiny_tokenizer, tag="d2", step=5)
    _save(model, tiny_tokenizer, tag="d2", step=20)
    _save(model, tiny_tokenizer, tag="d10", step=1)
    _save(model, tiny_tokenizer, tag="d10", step=3)
    assert find_latest("base") == checkpoint_dir("base", "d10", 3)
    assert find_latest("base", tag="d2") == checkpoint_dir("base", "d2", 20)
    assert [p.name for p in list_checkpoints("base", "d2")] == ["step_000005", "step_000020"]


def test_resolve_checkpoint_by_stage_path_tag_dir_and_default_order(base_dir, model, tiny_tokenizer):
    base = _save(model, tiny_tokenizer, stage="base", step=4)
    assert resolve_checkpoint(None) == base
    mid = _save(model, tiny_tokenizer, stage="mid", step=2)
    assert resolve_checkpoint(None) == mid  # sft > mid > base
    assert resolve_checkpoint("base") == base
    assert resolve_checkpoint(str(base)) == base
    assert resolve_checkpoint(str(base.parent)) == base


def test_lookups_use_the_artifacts_root_they_are_passed_not_the_environment(base_dir, tmp_path, model,
                                                                             tiny_tokenizer):
    other = tmp_path / "other_root"
    path = save_checkpoint(checkpoint_dir("mid", "d2", 7, base=other), model, model.config, tiny_tokenizer,
                           stage="mid", step=7)
    assert path == other / "checkpoints" / "mid" / "d2" / "step_000007"
    assert find_latest("mid", base=other) == path
    assert list_checkpoints("mid", base=other) == [path]
    assert resolve_checkpoint(None, base=other) == path
    assert resolve_checkpoint("mid", base=other) == path
    with pytest.raises(CheckpointError, match=str(base_dir / "checkpoints")):  # $NANOCHAT_BASE_DIR has none
        resolve_checkpoint(None)


def test_no_checkpoint_error_names_the_command(base_dir):
    with pytest.raises(CheckpointError, match="nanochat run --preset tiny"):
        resolve_checkpoint(None)
    with pytest.raises(CheckpointError, match="nanochat train midtrain"):
        find_latest("mid")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(base_dir / "nope"))


# ---- nanochat import ---------------------------------------------------------------------------


def _fake_nanochat_run(root: Path, model, tok: Tokenizer, step: int = 10, vocab: int | None = None) -> Path:
    """Lay out a karpathy/nanochat run: base_checkpoints/d2/model_<step>.pt + meta, tokenizer/tokenizer.pkl."""
    cfg = model.config
    vocab = vocab or cfg.vocab_size
    src = root / "base_checkpoints" / "d2"
    src.mkdir(parents=True)
    state = {}
    for k, v in model.state_dict().items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:vocab]  # nanochat (OCT) did not pad the vocab
        state[f"_orig_mod.{k}"] = v.to(torch.bfloat16)  # torch.compile prefix, bf16 weights
    torch.save(state, src / f"model_{step:06d}.pt")
    meta = {
        "step": step,
        "val_bpb": 1.5,
        "model_config": {
            "sequence_len": cfg.sequence_len,
            "vocab_size": vocab,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head,
            "n_embd": cfg.n_embd,
        },
        "user_config": {"depth": cfg.n_layer, "run": "dummy"},
        "device_batch_size": 4,
        "max_seq_len": cfg.sequence_len,
    }
    (src / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
    return src


def _bf16_rounded(model):
    clone = build_model(model.config, init=False)
    clone.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return clone.eval()


def test_import_nanochat_checkpoint_reproduces_logits(base_dir, tmp_path, model, tiny_tokenizer):
    src = _fake_nanochat_run(tmp_path / "nanochat_run", model, tiny_tokenizer)
    out = import_nanochat(src, tmp_path / "imported")
    ckpt = load_checkpoint(out)
    assert (ckpt.meta["step"], ckpt.meta["stage"]) == (10, "base")
    assert ckpt.meta["extra"]["nanochat_meta"] == {"step": 10, "val_bpb": 1.5}
    assert ckpt.tokenizer.fingerprint == tiny_tokenizer.fingerprint
    assert ckpt.model.transformer.wte.weight.dtype == torch.float32
    assert (_logits(ckpt.model, IDS) - _logits(_bf16_rounded(model), IDS)).abs().max().item() < 1e-5


def test_import_pads_an_unpadded_vocab(base_dir, tmp_path):
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 20
    tok = Tokenizer.train_from_iterator([text], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = build_model(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
    src = _fake_nanochat_run(tmp_path / "run", model, tok, vocab=300)
    assert torch.load(src / "model_000010.pt")["_orig_mod.lm_head.weight"].shape[0] == 300
    ckpt = load_checkpoint(import_nanochat(src, tmp_path / "out"))
    assert ckpt.model.lm_head.weight.shape[0] == 320
    assert (
        _logits(ckpt.model, IDS % 300) - _logits(_bf16_rounded(model), IDS % 300)
    ).abs().max().item() < 1e-5


def test_import_refuses_head_architecture(base_dir, tmp_path, model, tiny_tokenizer):
    src = _fake_nanochat_run(tmp_path / "run", model, tiny_tokenizer)
    state = torch.load(src / "model_000010.pt")
    state["_orig_mod.resid_lambdas"] = torch.ones(model.config.n_layer)
    torch.save(state, src / "model_000010.pt")
    with pytest.raises(CheckpointError, match="HEAD-architecture"):
        import_nanochat(src, tmp_path / "out")


def test_import_refuses_sliding_windows(base_dir, tmp_path, model, tiny_tokenizer):
    src = _fake_nanochat_run(tmp_path / "run", model, tiny_tokenizer)
    meta = json.loads((src / "meta_000010.json").read_text())
    meta["model_config"]["window_pattern"] = "SSSL"
    (src / "meta_000010.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="window_pattern"):
        import_nanochat(src, tmp_path / "out")


def test_import_without_tokenizer_points_at_flag(base_dir, tmp_path, model, tiny_tokenizer):
    src = _fake_nanochat_run(tmp_path / "run", model, tiny_tokenizer)
    (tmp_path / "run" / "tokenizer" / "tokenizer.pkl").unlink()
    with pytest.raises(CheckpointError, match="--tokenizer"):
        import_nanochat(src, tmp_path / "out")


def test_import_of_non_nanochat_dir_is_an_error(base_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not a nanochat checkpoint"):
        import_nanochat(tmp_path, tmp_path / "out")


# ---- CLI wrappers (in-process) -----------------------------------------------------------------


def test_cli_import_list_and_show(base_dir, tmp_path, model, tiny_tokenizer, capsys):
    src = _fake_nanochat_run(tmp_path / "run", model, tiny_tokenizer, step=7)
    dst = checkpoint_dir("base", "d2", 7)
    assert cli_main(["checkpoint", "import-nanochat", str(src), str(dst)]) == 0
    assert "imported" in capsys.readouterr().out
    assert cli_main(["checkpoint", "list"]) == 0
    listing = capsys.readouterr().out
    assert "base" in listing and "d2" in listing and str(dst) in listing
    assert cli_main(["checkpoint", "show", "base"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["path"] == str(dst) and shown["step"] == 7 and shown["model_bytes"] > 0
    assert read_meta(dst)["extra"]["imported_from"] == str(src)


def test_cli_show_without_checkpoints_exits_2_with_hint(base_dir, capsys):
    assert cli_main(["checkpoint", "show"]) == 2
    assert "nanochat run --preset tiny" in capsys.readouterr().err
    assert cli_main(["checkpoint", "list"]) == 0
    assert "no checkpoints yet" in capsys.readouterr().out


def test_model_config_round_trips_through_meta(base_dir, model, tiny_tokenizer):
    path = _save(model, tiny_tokenizer)
    assert GPTConfig(**read_meta(path)["model_config"]) == model.config


# ---- tags (the model id) ------------------------------------------------------------------------


def test_a_checkpoint_written_outside_its_tag_folder_records_the_given_tag(base_dir, tmp_path, model, tiny_tokenizer):
    # The trainer writes into <temp>/model/step_N first (Ray copies it); the id must be the run's tag.
    path = save_checkpoint(tmp_path / "model" / "step_000003", model, model.config, tiny_tokenizer, stage="base",
                           step=3, tag="d4")
    assert read_meta(path)["tag"] == "d4" and load_checkpoint(path).tag == "d4"
    assert read_meta(_save(model, tiny_tokenizer, tag="d2"))["tag"] == "d2"  # default: the layout's tag folder


def test_exports_recorded_with_the_temp_folder_name_model_load_with_their_real_tag(base_dir, model, tiny_tokenizer,
                                                                                 capsys):
    # Exports by earlier versions recorded tag "model" (the trainer's temp folder) and the real tag in extra.
    legacy = _save(model, tiny_tokenizer, tag="d4", step=5, extra={"tag": "d4"})
    meta = json.loads((legacy / "meta.json").read_text())
    (legacy / "meta.json").write_text(json.dumps({**meta, "tag": "model"}))
    assert load_checkpoint(legacy).tag == "d4" and checkpoint_tag(legacy) == "d4"
    bare = _save(model, tiny_tokenizer, tag="d6", step=5)  # no extra: the layout's tag folder
    (bare / "meta.json").write_text(json.dumps({**read_meta(bare), "tag": "model"}))
    assert checkpoint_tag(bare) == "d6"
    assert cli_main(["checkpoint", "list"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["base", "d4"], ["base", "d6"]]


def test_prune_keeps_the_newest_steps_and_always_the_last(tmp_path):
    for step in (2, 10, 4, 6):
        (tmp_path / f"step_{step:06d}").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["step_000002", "step_000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step_000006", "step_000010"]
    prune_checkpoints(tmp_path, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step_000010"]
