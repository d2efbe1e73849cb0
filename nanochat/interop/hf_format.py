"""The transformers ``nanochat`` format: weight names, config fields, and the errors both directions raise.

Source of every name here: transformers 5.x ``models/nanochat`` (``configuration_nanochat.py``,
``modeling_nanochat.py`` and ``convert_nanochat_checkpoints.py``). That model is our architecture:
parameter-free RMSNorm (so no norm weights), an RMSNorm after the embedding, RoPE in the "halves"
layout (``rotate_half``) followed by QK-norm, ReLU² MLPs (``hidden_act: relu2``), no biases, an untied
head and a ``final_logit_softcapping · tanh(x / cap)`` softcap. What differs numerically is listed in
docs/interop.md (rotary tables kept in bf16 by default here, RMSNorm epsilon).
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any

import torch

from nanochat.common import NanochatError
from nanochat.model import GPTConfig

MODEL_TYPE = "nanochat"
ARCHITECTURE = "NanoChatForCausalLM"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Our own GPTConfig, kept in the safetensors header so a re-import restores options transformers has no
# field for (``rotary_bf16``); transformers reads only the header's "format" entry.
CONFIG_METADATA_KEY = "nanochat_model_config"
# Our RMSNorm is F.rms_norm with eps=None: the input dtype's epsilon. transformers' computes in fp32.
RMS_NORM_EPS = float(torch.finfo(torch.float32).eps)
# Larger epsilons than this change the normalization visibly; such models are refused.
MAX_RMS_NORM_EPS = 1e-5
HF_EXTRA_HINT = "pip install 'nanochat[hf]'"

_LAYER_KEYS = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
_TOP_KEYS = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
_VOCAB_KEYS = ("transformer.wte.weight", "lm_head.weight")
_OUR_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class HFInteropError(NanochatError):
    """Converting to or from the Hugging Face format failed; the message names the file and the fix."""


class UnsupportedArchitectureError(HFInteropError):
    """A Hugging Face model that is not the nanochat architecture (or a variant we cannot represent)."""


class TokenizerMappingError(HFInteropError):
    """A ``tokenizer.json`` that is not a byte-level BPE with nanochat's special tokens."""


class MissingExtraError(HFInteropError):
    """An optional package of the ``hf`` extra is not installed."""


def require(module: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency or raise MissingExtraError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs the '{package or module}' package, which is not installed; "
            f"install the Hugging Face extra: {HF_EXTRA_HINT}"
        ) from None


# ---- weights ---------------------------------------------------------------------------------------


def to_hf_key(key: str) -> str:
    """Our state-dict key → transformers'.

    ``transformer.h.3.attn.c_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``.
    """
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    m = _OUR_LAYER.fullmatch(key)
    if m and m.group(2) in _LAYER_KEYS:
        return f"model.layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"
    raise HFInteropError(f"no transformers name for parameter {key!r}")


def from_hf_key(key: str) -> str | None:
    """transformers' key → ours, or None for a key our architecture has no place for."""
    reverse_top = {v: k for k, v in _TOP_KEYS.items()}
    if key in reverse_top:
        return reverse_top[key]
    m = _HF_LAYER.fullmatch(key)
    reverse_layer = {v: k for k, v in _LAYER_KEYS.items()}
    if m and m.group(2) in reverse_layer:
        return f"transformer.h.{m.group(1)}.{reverse_layer[m.group(2)]}"
    return None


def to_hf_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """transformers' tensors for our ``state``: renamed, embedding/head cut to ``vocab_size`` rows (our
    padding to a multiple of 64 is dropped), contiguous, in ``dtype``."""
    out = {}
    for key, tensor in state.items():
        if key in _VOCAB_KEYS:
            tensor = tensor[: config.vocab_size]
        out[to_hf_key(key)] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def from_hf_state_dict(
    tensors: dict[str, torch.Tensor], config: GPTConfig, tied: bool, source: str
) -> tuple[dict[str, torch.Tensor], int]:
    """Our fp32 state dict from transformers' tensors; returns it and how many vocab rows were dropped.

    Embedding/head rows beyond the tokenizer's ids are dropped (no token can be fed or decoded there);
    rows up to our padded size are zero. ``tied``: the head is the embedding (``tie_word_embeddings``).
    Raises UnsupportedArchitectureError for keys we have no place for, missing keys or wrong shapes.
    """
    unknown = sorted(k for k in tensors if from_hf_key(k) is None)
    if unknown:
        raise UnsupportedArchitectureError(
            f"{source} has weights the nanochat architecture does not have: {unknown[:5]}; only plain "
            f"{ARCHITECTURE} checkpoints (no norm weights, biases or extra modules) can be imported"
        )
    state = {from_hf_key(k): v.to(torch.float32) for k, v in tensors.items()}
    if tied and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    dropped = 0
    for key in _VOCAB_KEYS:
        if key not in state:
            continue
        rows = state[key].shape[0]
        if rows < config.vocab_size:
            raise UnsupportedArchitectureError(
                f"{source}: {to_hf_key(key)} has {rows} rows but the tokenizer has {config.vocab_size} ids"
            )
        dropped = rows - config.vocab_size
        kept = state[key][: config.vocab_size]
        pad = torch.zeros(config.padded_vocab_size - config.vocab_size, kept.shape[1])
        state[key] = torch.cat([kept, pad]).contiguous()
    return state, dropped


# ---- config ----------------------------------------------------------------------------------------


def hf_config(config: GPTConfig, bos_id: int, eos_id: int, pad_id: int, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for a ``NanoChatForCausalLM`` with our ``config`` (field names from NanoChatConfig)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "attention_dropout": 0.0,
        "attention_bias": False,
        "rms_norm_eps": RMS_NORM_EPS,
        "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "final_logit_softcapping": float(config.logit_softcap),
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _refuse(source: str, what: str, fix: str = "") -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{source}: {what}; nanochat can import only the plain {ARCHITECTURE} "
        f"architecture{'; ' + fix if fix else ''}"
    )


def gpt_config_from_hf(cfg: dict[str, Any], vocab_size: int, source: str) -> GPTConfig:
    """Our GPTConfig for a transformers ``config.json`` dict; ``vocab_size`` is the tokenizer's.

    Raises UnsupportedArchitectureError naming the field when the model is not one we can run exactly.
    """
    model_type = cfg.get("model_type")
    if model_type != MODEL_TYPE:
        raise _refuse(
            source,
            f"model_type is {model_type!r}, not {MODEL_TYPE!r}",
            "export the model from nanochat or convert it with transformers' convert_nanochat_checkpoints",
        )
    archs = cfg.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise _refuse(source, f"architectures {archs} does not include {ARCHITECTURE}")
    hidden, heads = int(cfg.get("hidden_size", 768)), int(cfg.get("num_attention_heads", 6))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if hidden % heads or heads % kv_heads:
        raise _refuse(
            source, f"hidden_size {hidden}, {heads} heads and {kv_heads} kv heads do not divide evenly"
        )
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise _refuse(source, f"head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads")
    if int(cfg.get("intermediate_size", 8192)) != 4 * hidden:
        raise _refuse(
            source, f"intermediate_size {cfg.get('intermediate_size')} is not 4 × hidden_size ({4 * hidden})"
        )
    if cfg.get("hidden_act", "relu2") != "relu2":
        raise _refuse(source, f"hidden_act {cfg.get('hidden_act')!r} (nanochat's MLP is relu2)")
    if cfg.get("attention_bias") or cfg.get("qkv_bias"):
        raise _refuse(source, "attention_bias is set (nanochat has no biases)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _refuse(
            source, f"rope_type {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE is supported)"
        )
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cap = cfg.get("final_logit_softcapping", 15.0)
    if cap is None or float(cap) <= 0:
        raise _refuse(source, "final_logit_softcapping is off (nanochat always softcaps its logits)")
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    if eps > MAX_RMS_NORM_EPS:
        raise _refuse(
            source, f"rms_norm_eps {eps} is larger than {MAX_RMS_NORM_EPS} (ours: {RMS_NORM_EPS:.3g})"
        )
    if int(cfg.get("vocab_size", vocab_size)) < vocab_size:
        raise _refuse(
            source, f"vocab_size {cfg.get('vocab_size')} is smaller than the tokenizer's {vocab_size} ids"
        )
    try:
        return GPTConfig(
            sequence_len=int(cfg.get("max_position_embeddings", 2048)),
            vocab_size=vocab_size,
            n_layer=int(cfg.get("num_hidden_layers", 12)),
            n_head=heads,
            n_kv_head=kv_heads,
            n_embd=hidden,
            rope_base=float(theta),
            logit_softcap=float(cap),
        )
    except ValueError as err:
        raise _refuse(source, f"invalid sizes ({err})") from None
