"""The Hugging Face format both ways: ``nanochat export hf`` and ``nanochat checkpoint import-hf``.

Real parts throughout: transformers' own ``NanoChatForCausalLM`` / ``AutoTokenizer`` load what we export,
a transformers-written checkpoint is imported, and the download goes through ``huggingface_hub`` against a
local HTTP server that answers the hub's API. Models are tiny and random, built in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (the dev extra), never needed to train or serve
from _helpers_hf import COMMIT, CONVERSATIONS, VARIED, fake_hub, tiny_gpt
from conftest import TINY_TEXTS
from safetensors.torch import load_file

from nanochat.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from nanochat.interop.hf_export import export_hf
from nanochat.interop.hf_format import (
    HFInteropError,
    MissingExtraError,
    TokenizerMappingError,
    UnsupportedArchitectureError,
)
from nanochat.interop.hf_import import download_hf, import_hf
from nanochat.interop.hf_tokenizer import write_hf_tokenizer
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def wide_tokenizer() -> Tokenizer:
    """A 2000-id BPE trained in-process on the tiny texts plus Python's stdlib sources (offline, varied)."""
    root = Path(json.__file__).parent.parent
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:60]]
    return Tokenizer.train_from_iterator(TINY_TEXTS * 4 + texts, vocab_size=2000)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_interop")


@pytest.fixture(scope="module")
def checkpoints(work, tiny_tokenizer, wide_tokenizer) -> dict[str, Path]:
    """Our checkpoints: default (bf16 rotary tables) and fp32 tables on the tiny tokenizer; one on the
    wide one (2000 ids, padded to 2048 in our model: the export drops the padding rows)."""
    out = {}
    for name, tok, bf16 in (
        ("bf16", tiny_tokenizer, True),
        ("fp32", tiny_tokenizer, False),
        ("wide", wide_tokenizer, True),
    ):
        model = tiny_gpt(tok, rotary_bf16=bf16)
        out[name] = save_checkpoint(
            work / "ckpt" / name, model, model.config, tok, stage="sft", step=7, metrics={"val/bpb": 1.2345}
        )
    return out


@pytest.fixture(scope="module")
def exported(work, checkpoints) -> dict[str, Path]:
    return {name: export_hf(path, work / "hf" / name) for name, path in checkpoints.items()}


def _sequences(tokenizer: Tokenizer, n: int = 3, length: int = 40) -> torch.Tensor:
    rows = [
        tokenizer.encode(" ".join(TINY_TEXTS[i:] + TINY_TEXTS[:i]), prepend="<|bos|>")[:length]
        for i in range(n)
    ]
    return torch.tensor(rows)


def _hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _our_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(path).model(ids)


# ---- export ----------------------------------------------------------------------------------------


def test_export_writes_a_directory_transformers_loads_without_custom_code(exported, tiny_tokenizer):
    d = exported["bf16"]
    assert {p.name for p in d.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    }
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and cfg["architectures"] == ["NanoChatForCausalLM"]
    assert (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    ) == (64, 2, 4, 2)
    assert cfg["intermediate_size"] == 256 and cfg["max_position_embeddings"] == 128
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["final_logit_softcapping"] == 15.0
    assert cfg["bos_token_id"] == tiny_tokenizer.encode_special("<|bos|>")
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == tiny_tokenizer.encode_special("<|assistant_end|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == "NanoChatForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|assistant_end|>"
    keys = set(load_file(str(d / "model.safetensors")))
    assert keys == set(model.state_dict())  # transformers' own key names, nothing missing or extra
    card = (d / "README.md").read_text()
    assert "NanoChatForCausalLM" in card and "| val/bpb | 1.2345 |" in card and "| 2 | 64 | 4 | 2 |" in card


def test_transformers_logits_equal_ours_within_1e_4_with_fp32_rotary_tables(
    exported, checkpoints, tiny_tokenizer
):
    ids = _sequences(tiny_tokenizer)
    ours, theirs = _our_logits(checkpoints["fp32"], ids), _hf_logits(exported["fp32"], ids)
    assert theirs.shape == ours.shape == (*ids.shape, tiny_tokenizer.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_with_default_bf16_rotary_tables_argmax_is_equal_at_every_position(
    exported, checkpoints, tiny_tokenizer
):
    ids = _sequences(tiny_tokenizer)
    ours, theirs = _our_logits(checkpoints["bf16"], ids), _hf_logits(exported["bf16"], ids)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    diff = (ours - theirs).abs().max().item()
    assert 0 < diff < 1e-2  # only the bf16 rounding of cos/sin differs (docs/interop.md)


def test_export_drops_our_vocab_padding_rows_and_logits_still_match(exported, checkpoints, wide_tokenizer):
    cfg = json.loads((exported["wide"] / "config.json").read_text())
    assert cfg["vocab_size"] == wide_tokenizer.vocab_size == 2000
    assert load_file(str(exported["wide"] / "model.safetensors"))["lm_head.weight"].shape == (2000, 64)
    ids = _sequences(wide_tokenizer)
    assert torch.equal(
        _our_logits(checkpoints["wide"], ids).argmax(-1), _hf_logits(exported["wide"], ids).argmax(-1)
    )


def test_bfloat16_export_writes_bf16_weights_that_import_as_the_rounded_originals(work, checkpoints):
    out = export_hf(checkpoints["fp32"], work / "hf_bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    back = load_checkpoint(import_hf(out, work / "back_bf16"))
    original = load_checkpoint(checkpoints["fp32"]).model.state_dict()
    for key, tensor in back.model.state_dict().items():
        if key.startswith("transformer.h."):
            assert torch.equal(tensor, original[key].bfloat16().float()), key


def test_export_refuses_to_overwrite_an_existing_directory(exported, checkpoints):
    with pytest.raises(HFInteropError, match="--force"):
        export_hf(checkpoints["bf16"], exported["bf16"])


def test_a_missing_optional_package_names_the_hf_extra(monkeypatch, checkpoints, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(MissingExtraError, match=r"nanochat\[hf\]"):
        export_hf(checkpoints["bf16"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- tokenizer and chat template -------------------------------------------------------------------


def test_hf_tokenizer_gives_our_ids_on_varied_strings(work, wide_tokenizer):
    write_hf_tokenizer(wide_tokenizer, work, 128)
    hf = transformers.AutoTokenizer.from_pretrained(work)
    bos = wide_tokenizer.get_bos_token_id()
    assert [hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [
        wide_tokenizer.encode_special(t) for t in SPECIAL_TOKENS
    ]
    for text in VARIED:
        ours = wide_tokenizer.encode(text)
        # Special-token strings as text, as our encode does them:
        assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours, text
        # HF's default makes them specials (like tiktoken's allowed_special="all") and prepends <|bos|>:
        assert hf(text)["input_ids"] == [bos] + wide_tokenizer.enc.encode(text, allowed_special="all"), text
        assert hf.decode(ours) == wide_tokenizer.decode(ours) == text


def test_apply_chat_template_equals_our_rendering(exported, wide_tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(exported["wide"])
    for conv in CONVERSATIONS:
        prompt = hf.apply_chat_template(conv, add_generation_prompt=True, return_dict=False)
        assert list(prompt) == wide_tokenizer.render_for_completion(conv)
        if (
            conv[-1]["role"] == "assistant"
        ):  # a trailing assistant turn is dropped, as render_for_completion does
            continue
        full = [*conv, {"role": "assistant", "content": "Sure: 42."}]
        assert (
            list(hf.apply_chat_template(full, return_dict=False))
            == wide_tokenizer.render_conversation(full)[0]
        )
    text = hf.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user_start|>You are terse.\n\nName a color.<|user_end|><|assistant_start|>"


def test_chat_template_joins_text_parts_of_user_and_system_content_as_our_server_does(exported, wide_tokenizer):
    """OpenAI content parts (what vLLM's chat frontend passes by default) render as the joined string."""
    hf = transformers.AutoTokenizer.from_pretrained(exported["wide"])
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]}]
    text = hf.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user_start|>You are terse.\n\nName a color.<|user_end|><|assistant_start|>"
    joined = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    assert list(hf.apply_chat_template(parts, add_generation_prompt=True, return_dict=False)) == \
        wide_tokenizer.render_for_completion(joined)
    with pytest.raises(Exception, match="must be of type text"):
        hf.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                               add_generation_prompt=True)


def test_chat_template_refuses_what_our_renderer_refuses(exported):
    hf = transformers.AutoTokenizer.from_pretrained(exported["wide"])
    for bad in (
        [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    ):
        with pytest.raises(Exception, match="alternate"):
            hf.apply_chat_template(bad, add_generation_prompt=True)


# ---- import ----------------------------------------------------------------------------------------


def test_import_hf_of_an_export_gives_our_original_logits_back_exactly(
    work, exported, checkpoints, tiny_tokenizer
):
    ids = _sequences(tiny_tokenizer)
    for name in ("bf16", "fp32"):
        back = load_checkpoint(import_hf(exported[name], work / "back" / name, stage="sft"))
        assert back.tokenizer.fingerprint == tiny_tokenizer.fingerprint
        assert (
            back.config == load_checkpoint(checkpoints[name]).config
        )  # rotary_bf16 restored from the header
        with torch.no_grad():
            assert torch.equal(back.model(ids), _our_logits(checkpoints[name], ids)), name
        assert back.meta["stage"] == "sft" and back.meta["extra"]["imported_from"]


@pytest.mark.parametrize("variant", ["plain", "tied_head_and_padded_vocab"])
def test_a_checkpoint_written_by_transformers_imports_and_matches_its_logits(
    tmp_path, tiny_tokenizer, variant
):
    v = tiny_tokenizer.vocab_size
    config = transformers.NanoChatConfig(
        vocab_size=v + (13 if variant != "plain" else 0),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        final_logit_softcapping=12.0,
        tie_word_embeddings=variant != "plain",
        bos_token_id=tiny_tokenizer.get_bos_token_id(),
        eos_token_id=v - 5,
        pad_token_id=v - 5,
    )
    torch.manual_seed(1)
    model = transformers.NanoChatForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    write_hf_tokenizer(tiny_tokenizer, tmp_path / "hf", 128)
    ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ours"))
    assert (
        ckpt.config.rope_base == 5000.0 and ckpt.config.logit_softcap == 12.0 and not ckpt.config.rotary_bf16
    )
    ids = _sequences(tiny_tokenizer)
    with torch.no_grad():
        theirs, ours = model(ids).logits[..., :v], ckpt.model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_a_tokenizer_converted_by_transformers_from_our_tiktoken_encoding_imports_as_ours(
    tmp_path, exported, wide_tokenizer
):
    """transformers' tiktoken converter (how karpathy/nanochat-d32's tokenizer.json was made) maps back."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from nanochat.interop.hf_tokenizer import tokenizer_from_hf
    from nanochat.tokenizer import RANKS_FILE

    enc = (
        wide_tokenizer.enc
    )  # convert_tiktoken_to_fast minus its blobfile-based file dump: ours is that format
    converter = TikTokenConverter(
        vocab_file=str(wide_tokenizer.save(tmp_path) / RANKS_FILE),
        pattern=enc._pat_str,
        extra_special_tokens=enc._special_tokens,
    )
    converter.converted().save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_from_hf(tmp_path / "tokenizer.json").fingerprint == wide_tokenizer.fingerprint


def test_model_card_carries_the_run_report_metrics(base_dir, tiny_tokenizer, tmp_path):
    model = tiny_gpt(tiny_tokenizer)
    path = save_checkpoint(
        checkpoint_dir("sft", "d2", 3), model, model.config, tiny_tokenizer, stage="sft", step=3
    )
    results = base_dir / "eval" / "sft" / "d2" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(
        json.dumps({"kind": "chat", "chatcore": 0.125, "tasks": {"ARC-Easy": {"accuracy": 0.5, "n": 8}}})
    )
    card = (export_hf(path, tmp_path / "hf") / "README.md").read_text()
    assert "| ARC-Easy | - | - | 0.5000 | - |" in card and "| ChatCORE | - | - | 0.1250 | - |" in card


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
        (lambda c: c.update(intermediate_size=300), "intermediate_size 300"),
        (
            lambda c: c.update(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
            "rope_type 'linear'",
        ),
        (lambda c: c.update(final_logit_softcapping=None), "final_logit_softcapping is off"),
        (lambda c: c.update(attention_bias=True), "attention_bias"),
        (lambda c: c.update(rms_norm_eps=1e-3), "rms_norm_eps"),
    ],
)
def test_import_refuses_an_unsupported_architecture_naming_the_field(tmp_path, exported, edit, message):
    d = _copy(exported["bf16"], tmp_path / "m")
    _edit_json(d / "config.json", edit)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        import_hf(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_weights_the_architecture_does_not_have(tmp_path, exported):
    from safetensors.torch import save_file

    d = _copy(exported["bf16"], tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(64)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedArchitectureError, match="model.norm.weight"):
        import_hf(d, tmp_path / "out")


def _drop_specials(t):
    t["added_tokens"] = t["added_tokens"][:3]


def _rename_special(t):
    t["added_tokens"][0]["content"] = "<|endoftext|>"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_specials, "9 special tokens"),
        (_rename_special, "9 special tokens"),
        (lambda t: t.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda t: t.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
        (lambda t: t["model"].update(type="WordPiece"), "WordPiece"),
        (lambda t: t["model"]["vocab"].update({"▁word": len(t["model"]["vocab"])}), "byte-level"),
        (lambda t: t["model"].update(merges=list(reversed(t["model"]["merges"]))), "rank order"),
    ],
)
def test_import_refuses_a_tokenizer_it_cannot_map(tmp_path, exported, edit, message):
    d = _copy(exported["bf16"], tmp_path / "m")
    _edit_json(d / "tokenizer.json", edit)
    with pytest.raises(TokenizerMappingError, match=message):
        import_hf(d, tmp_path / "out")


def test_import_needs_safetensors_and_says_how_to_get_them(tmp_path, exported):
    d = _copy(exported["bf16"], tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(HFInteropError, match="save_pretrained"):
        import_hf(d, tmp_path / "out")


def test_imported_checkpoint_chats_through_our_engine_and_can_start_midtraining(
    base_dir, exported, tiny_tokenizer
):
    from nanochat.checkpoint import resolve_checkpoint
    from nanochat.engine import Engine, SamplingParams
    from nanochat.train.trainer import resolve_source_checkpoint

    path = import_hf(exported["bf16"], tag="tiny-hf")
    assert path == checkpoint_dir("base", "tiny-hf", 0)
    assert resolve_checkpoint(None) == path  # what chat / serve / eval pick when given no checkpoint
    assert resolve_source_checkpoint("midtrain", None, "tiny-hf") == path
    ckpt = load_checkpoint(path)
    prompt = tiny_tokenizer.render_for_completion([{"role": "user", "content": "hello"}])
    completion = Engine(ckpt.model, ckpt.tokenizer).generate_batch(
        prompt, SamplingParams(max_tokens=5, temperature=0)
    )[0]
    with torch.no_grad():  # greedy: the first token is the argmax of a plain forward pass
        first = int(ckpt.model(torch.tensor([prompt]))[0, -1].argmax())
    assert completion.tokens[0] == first


# ---- download --------------------------------------------------------------------------------------


@pytest.fixture
def hub(exported):
    with fake_hub("me/tiny", exported["bf16"]) as served:
        yield served


def test_download_fetches_a_hub_repo_and_imports_it(tmp_path, hub, exported, tiny_tokenizer, monkeypatch):
    endpoint, seen = hub
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    snapshot = download_hf("me/tiny", cache_dir=tmp_path / "hf_cache", endpoint=endpoint)
    assert snapshot.name == COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == (
        exported["bf16"] / "model.safetensors"
    ).read_bytes()
    assert any(s.startswith("GET /me/tiny/resolve/") for s in seen)
    ckpt = load_checkpoint(import_hf(snapshot, tmp_path / "ours", origin="me/tiny"))
    assert ckpt.meta["tag"] == "tiny" and ckpt.meta["extra"]["imported_from"] == "me/tiny"
    assert ckpt.tokenizer.fingerprint == tiny_tokenizer.fingerprint


def test_download_of_an_unknown_repo_or_unreachable_hub_says_what_to_do(tmp_path, hub):
    endpoint, _ = hub
    with pytest.raises(HFInteropError, match="check the id"):
        download_hf("me/missing", cache_dir=tmp_path / "c1", endpoint=endpoint)
    with pytest.raises(HFInteropError, match="import-hf DIR"):
        download_hf("me/tiny", cache_dir=tmp_path / "c2", endpoint="http://127.0.0.1:9")


# ---- command line ----------------------------------------------------------------------------------


def test_cli_export_then_import_hf_round_trip(base_dir, checkpoints, tmp_path, capsys):
    from nanochat.checkpoint import find_latest
    from nanochat.cli import main

    out = tmp_path / "hf_cli"
    assert main(["export", "hf", str(checkpoints["bf16"]), str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["checkpoint", "import-hf", str(out), "--stage", "mid", "--tag", "from-hf"]) == 0
    assert find_latest("mid", "from-hf") == checkpoint_dir("mid", "from-hf", 0)
    assert main(["checkpoint", "import-hf", str(out), "--stage", "mid", "--tag", "from-hf"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["checkpoint", "import-hf"]) == 2
    assert "--download REPO_ID" in capsys.readouterr().err
