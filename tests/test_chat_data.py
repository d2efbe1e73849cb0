"""Mid-training and SFT rows: masks, packing, and the Ray datasets built from a preset."""

from __future__ import annotations

import numpy as np
import pytest

from nanochat.config import load_preset
from nanochat.data.chat_data import (
    build_midtrain_datasets,
    build_sft_datasets,
    mid_rows,
    sft_row,
)
from nanochat.data.packing import pack_best_fit_padded

TOOL_CONV = {"messages": [
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": " so #### 42"},
    ]},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def supervised_tokens(tok, conv, seq_len=512):
    inputs, targets = sft_row(tok, conv, seq_len)
    return inputs, targets, [t for t in targets.tolist() if t >= 0]


def test_sft_supervises_assistant_text_end_and_python_calls_only(tiny_tokenizer):
    tok = tiny_tokenizer
    special = tok.encode_special
    inputs, targets, supervised = supervised_tokens(tok, TOOL_CONV)
    ids, mask = tok.render_conversation(TOOL_CONV)
    assert inputs.dtype == np.int32 and targets.dtype == np.int64 and inputs.shape == targets.shape == (512,)
    assert supervised == [i for i, m in zip(ids, mask) if m][: len(supervised)]
    assert special("<|python_start|>") in supervised and special("<|python_end|>") in supervised
    assert supervised.count(special("<|assistant_end|>")) == 2
    for never in ("<|output_start|>", "<|output_end|>", "<|user_start|>", "<|assistant_start|>", "<|bos|>"):
        assert special(never) not in supervised
    output_ids = tok.encode("42")
    # the tool's output tokens sit right after output_start and are never targets
    pos = ids.index(special("<|output_start|>"))
    assert all(targets[p - 1] == -1 for p in range(pos, pos + len(output_ids) + 2))
    assert tok.decode(supervised).startswith("Let me compute: ")


def test_sft_row_pads_with_assistant_end_and_minus_one(tiny_tokenizer):
    inputs, targets = sft_row(tiny_tokenizer, TOOL_CONV, 512)
    n = len(tiny_tokenizer.render_conversation(TOOL_CONV)[0]) - 1
    assert (inputs[n:] == tiny_tokenizer.encode_special("<|assistant_end|>")).all()
    assert (targets[n:] == -1).all()


def test_mid_rows_supervise_every_real_token(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = [TOOL_CONV, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    inputs, targets = mid_rows(tok, convs, 256)
    docs = [tok.render_conversation(c)[0] for c in convs]
    total = sum(len(d) for d in docs)
    assert inputs.shape == (1, 256)
    row = inputs[0].tolist() + [-1]
    assert targets[0, : total - 1].tolist() == row[1:total]  # targets = inputs shifted, mask ignored
    assert (targets[0, total - 1 :] == -1).all()  # only the BOS padding is ignored
    out_start = tok.encode_special("<|output_start|>")
    assert out_start in targets[0].tolist()  # tool output IS trained on in mid-training


def test_best_fit_packing_keeps_every_token_and_fills_rows():
    docs = [[i] * n for i, n in enumerate([5, 3, 8, 2, 7, 1, 4])]
    rows = pack_best_fit_padded(docs, 10, pad_id=-7)
    assert all(len(r) == 10 for r, _ in rows)
    flat = [t for r, n in rows for t in r[:n]]
    assert sorted(flat) == sorted(t for d in docs for t in d)
    assert [n for _, n in rows] == [10, 10, 10]  # 8+2, 7+3, 5+4+1
    assert all(t == -7 for r, n in rows for t in r[n:])
    with pytest.raises(ValueError, match="does not fit"):
        pack_best_fit_padded([[1] * 11], 10, 0)


def small_preset():
    return load_preset("tiny", [
        "mixture.mid.chat=60", "mixture.mid.mmlu=30", "mixture.mid.arc=10", "mixture.mid.gsm8k=10",
        "mixture.mid.simple_spelling=20", "mixture.mid.spelling_bee=10", "mixture.mid.identity_epochs=1",
        "mixture.sft.chat=40", "mixture.sft.arc=10", "mixture.sft.gsm8k=10", "mixture.sft.simple_spelling=10",
        "mixture.sft.spelling_bee=10", "mixture.val_max=40", "model.sequence_len=128",
    ])


def collect(ds):
    batches = list(ds.iter_batches(batch_size=1024, batch_format="numpy"))
    return np.concatenate([b["inputs"] for b in batches]), np.concatenate([b["targets"] for b in batches])


@pytest.mark.slow
def test_ray_datasets_have_contract_rows_and_are_deterministic(ray_session, tiny_tokenizer):
    preset = small_preset()
    mid_train, mid_val = build_midtrain_datasets(preset, tiny_tokenizer)
    inputs, targets = collect(mid_train)
    assert inputs.dtype == np.int32 and targets.dtype == np.int64 and inputs.shape[1] == 128
    assert (targets[:, :-1][targets[:, 1:] >= 0] >= 0).all()  # mid: -1 only as trailing padding
    again_inputs, again_targets = collect(build_midtrain_datasets(preset, tiny_tokenizer)[0])
    assert np.array_equal(inputs, again_inputs) and np.array_equal(targets, again_targets)
    assert mid_val.count() > 0

    sft_train, sft_val = build_sft_datasets(preset, tiny_tokenizer)
    s_inputs, s_targets = collect(sft_train)
    assert s_inputs.shape[1] == 128 and (s_targets >= 0).any(axis=1).all()
    assert (s_targets == -1).mean() > 0.1  # user turns and padding are masked
    assert tiny_tokenizer.encode_special("<|user_start|>") not in set(s_targets[s_targets >= 0].tolist())
    assert sft_val.count() > 0
