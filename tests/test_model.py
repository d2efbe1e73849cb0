"""GPT: parity with nanochat's DEC model, its state-dict names, KV-cache decoding, accounting, padding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES  # noqa: E402  (the shared fixtures folder, located once in conftest)
from safetensors.torch import load_file

from nanochat.model import GPT, GPTConfig, RotaryAngles, apply_rotary, build_model, config_for_depth

PARITY = FIXTURES / "parity" / "nanochat-dec-tiny"


@pytest.fixture(scope="module")
def parity():
    spec = json.loads(PARITY.with_suffix(".json").read_text())
    tensors = load_file(str(PARITY.with_suffix(".safetensors")))
    weights = {k: v for k, v in tensors.items() if not k.startswith("fixture.")}
    fixture = {k.removeprefix("fixture."): v for k, v in tensors.items() if k.startswith("fixture.")}
    config = GPTConfig(**spec["config"])
    model = build_model(config, init=False)
    model.load_state_dict(weights, strict=True)
    model.eval()
    return model, weights, fixture


def test_logits_match_nanochat_reference(parity):
    model, _, fx = parity
    with torch.no_grad():
        logits = model(fx["input_ids"])
    assert logits.shape == fx["expected_logits"].shape
    assert (logits - fx["expected_logits"]).abs().max().item() < 1e-4


def test_loss_matches_nanochat_reference(parity):
    model, _, fx = parity
    with torch.no_grad():
        loss = model(fx["input_ids"], targets=fx["targets"])
    assert abs(loss.item() - fx["expected_loss"].item()) < 1e-5


def test_parameter_names_equal_nanochat_state_dict_keys(parity):
    model, weights, _ = parity
    assert set(model.state_dict()) == set(weights)
    expected = {"transformer.wte.weight", "lm_head.weight"}
    for i in range(model.config.n_layer):
        expected |= {f"transformer.h.{i}.attn.c_{n}.weight" for n in ("q", "k", "v", "proj")}
        expected |= {f"transformer.h.{i}.mlp.c_fc.weight", f"transformer.h.{i}.mlp.c_proj.weight"}
    assert set(model.state_dict()) == expected


def test_rotary_tables_are_bf16_rounded_only_when_asked():
    exact = build_model(
        GPTConfig(
            sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, rotary_bf16=False
        )
    )
    rounded = build_model(
        GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    )
    assert rounded.cos.dtype == torch.bfloat16
    assert exact.cos.dtype == torch.float32
    assert torch.allclose(rounded.cos.float(), exact.cos, atol=4e-3)
    assert rounded.cos.shape[0] == 16 * 10  # rotary cache covers 10x the context


def test_loss_ignores_targets_equal_to_minus_one(tiny_model_factory):
    model = tiny_model_factory()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = torch.randint(0, model.config.vocab_size, (2, 12))
    targets[:, :5] = -1
    with torch.no_grad():
        loss = model(idx, targets=targets)
        logits = model(idx)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_logits_are_softcapped_at_15(tiny_model_factory):
    model = tiny_model_factory()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
        logits = model(torch.randint(0, model.config.vocab_size, (1, 8)))
    assert logits.dtype == torch.float32
    assert logits.abs().max().item() <= 15.0


# ---- KV cache ----------------------------------------------------------------------------------


def _full_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)



@pytest.mark.parametrize("x_dtype, table_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_rotary_gives_nanochats_rotation_bit_for_bit(x_dtype, table_dtype):
    """The full-width rotation (4 ops) equals nanochat's halves formula exactly, in every dtype mix."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 4, 64, generator=gen) * 3).to(x_dtype)
    angles = torch.rand(1, 7, 1, 32, generator=gen) * 100
    cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
    x1, x2 = x[..., :32], x[..., 32:]
    want = torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3).to(x_dtype)  # nanochat 10231df
    got = apply_rotary(x, *RotaryAngles(cos, sin).get(x_dtype))
    assert got.dtype == x_dtype and torch.equal(got, want)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_decode_step_of_rows_at_one_position_equals_the_masked_step_bit_for_bit(tiny_model_factory, n_kv_head):
    """The eager decode step's shortcut (every row at the same position: slice write, rotary slice, no
    mask) gives the same logits and cache contents as the general path over the same keys (index write,
    gathered rotary, mask), and as the cache's own forward."""
    from nanochat.engine_decode import decode_forward

    model = tiny_model_factory(n_kv_head=n_kv_head)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3))
    caches = [model.new_kv_cache(batch=4, max_len=32) for _ in range(3)]
    with torch.inference_mode():
        for cache in caches:
            model(ids[:, :6], kv_cache=cache.rows(0, 3))
        for t in range(6, 9):
            pos = torch.full((3,), t)
            fast = decode_forward(model, ids[:, t], None, caches[0].k, caches[0].v, t + 1, masked=False)
            masked = decode_forward(model, ids[:, t], pos, caches[1].k, caches[1].v, t + 1, masked=True)
            plain = model(ids[:, t : t + 1], kv_cache=caches[2].rows(0, 3))[:, -1]
            assert torch.equal(fast, masked) and torch.equal(fast, plain)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[2].v)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_incremental_decode_equals_full_forward(tiny_model_factory, n_kv_head):
    model = tiny_model_factory(n_kv_head=n_kv_head)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    full = _full_logits(model, ids)
    cache = model.new_kv_cache(batch=2, max_len=32)
    with torch.no_grad():
        prefill = model(ids[:, :8], kv_cache=cache)
        steps = [model(ids[:, t : t + 1], kv_cache=cache) for t in range(8, 20)]
    incremental = torch.cat([prefill, *steps], dim=1)
    assert (incremental - full).abs().max().item() < 1e-4
    assert cache.seqlens.tolist() == [20, 20]


def test_kv_cache_rows_with_different_lengths_decode_together(tiny_model_factory):
    """Continuous batching: sequences prefilled separately into slots, then one shared decode step."""
    model = tiny_model_factory(n_kv_head=2)
    torch.manual_seed(2)
    a = torch.randint(0, model.config.vocab_size, (1, 6))
    b = torch.randint(0, model.config.vocab_size, (1, 11))
    nxt = torch.randint(0, model.config.vocab_size, (2, 1))
    cache = model.new_kv_cache(batch=2, max_len=32)
    with torch.no_grad():
        model(a, kv_cache=cache.rows(0, 1))
        model(b, kv_cache=cache.rows(1, 2))
        assert cache.seqlens.tolist() == [6, 11]
        step = model(nxt, kv_cache=cache)
    want_a = _full_logits(model, torch.cat([a, nxt[:1]], 1))[:, -1]
    want_b = _full_logits(model, torch.cat([b, nxt[1:]], 1))[:, -1]
    assert (step[0, -1] - want_a[0]).abs().max().item() < 1e-4
    assert (step[1, -1] - want_b[0]).abs().max().item() < 1e-4


def test_kv_cache_overflow_is_an_error(tiny_model_factory):
    model = tiny_model_factory()
    cache = model.new_kv_cache(batch=1, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# ---- accounting, depth dial, padding ----------------------------------------------------------


def _meta_model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


@pytest.mark.parametrize(
    "depth, n_params, flops",
    [(20, 560_988_160, 3.49e9), (32, 1_879_048_192, 1.208e10)],
)
def test_param_count_and_flops_match_reference_formulas(depth, n_params, flops):
    config = config_for_depth(depth, vocab_size=65536)
    model = _meta_model(config)
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    assert model.num_params() == 2 * V * d + 12 * L * d * d == n_params
    assert model.estimate_flops() == pytest.approx(flops, rel=5e-3)


@pytest.mark.parametrize(
    "depth, width, heads", [(12, 768, 6), (20, 1280, 10), (26, 1664, 13), (32, 2048, 16)]
)
def test_depth_dial_sets_width_and_heads(depth, width, heads):
    config = config_for_depth(depth, vocab_size=32768)
    assert (config.n_layer, config.n_embd, config.n_head, config.head_dim) == (depth, width, heads, 128)
    assert config.n_kv_head == heads


def test_vocab_is_padded_to_64_and_logits_sliced_back():
    config = GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = build_model(config)
    assert config.padded_vocab_size == 320
    assert model.transformer.wte.weight.shape == (320, 32)
    assert model.lm_head.weight.shape == (320, 32)
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 300)


def test_reference_init_zeroes_head_and_residual_projections():
    model = build_model(
        GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    )
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_proj.weight.abs().sum() == 0
        assert block.attn.c_q.weight.std().item() == pytest.approx(32**-0.5, rel=0.2)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.2)


def test_invalid_head_layout_is_rejected():
    with pytest.raises(ValueError, match="n_head"):
        build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=4, n_kv_head=3, n_embd=32))


# ---- the training loss ------------------------------------------------------------------------


def _losses_and_grads(model: GPT, loss_fn, weight: torch.Tensor, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn()
    (loss * weight).sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_loss_equals_nanochats_formula_in_values_and_gradients(reduction, bf16):
    """With targets and grad on, the model's fused loss gives nanochat's F.cross_entropy over the fp32
    softcapped logits (10231df GPT.forward): the same values and the same gradient in every parameter,
    ignored targets included, on a padded vocab (the logits are a slice) with logits past the cap."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for block in model.transformer.h:  # zero at init: every weight gets a gradient to compare
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 4.0)  # logits well past +-15: the softcap and its gradient matter
    idx = torch.randint(0, 300, (3, 16))
    targets = torch.randint(0, 300, (3, 16))
    targets[0, :5] = -1
    targets[2, 7] = -1
    weight = torch.rand(targets.numel()) if reduction == "none" else torch.tensor(1.7)

    def reference():
        logits = model(idx)  # grad on: the fp32 softcapped logits, not in place
        return F.cross_entropy(logits.view(-1, 300), targets.view(-1), ignore_index=-1, reduction=reduction)

    got, got_grads = _losses_and_grads(model, lambda: model(idx, targets, loss_reduction=reduction), weight, bf16)
    want, want_grads = _losses_and_grads(model, reference, weight, bf16)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if reduction == "none":
        assert (got.view(3, 16)[targets == -1] == 0).all()
    for name, grad in want_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        # bf16: the logits' gradient is rounded to bf16 once in both (at most an ulp apart, 2^-8)
        tol = 4e-3 * scale if bf16 else 1e-5 * scale
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_softcap_cross_entropy_compiles_whole_and_equals_the_reference(dtype, reduction):
    """One graph under torch.compile (fullgraph, dynamic=False as in training), the reference's values and
    gradient compiled and eager; a mean over no target is NaN, as F.cross_entropy gives."""
    from nanochat.losses import softcap_cross_entropy, softcap_cross_entropy_reference

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 8, 192, generator=gen) * 30).to(dtype)
    targets = torch.randint(0, 192, (4, 8), generator=gen)
    targets[1] = -1
    weight = torch.rand(32, generator=gen) if reduction == "none" else torch.tensor(0.3)
    compiled = torch.compile(softcap_cross_entropy, fullgraph=True, dynamic=False)
    results = []
    for fn in (softcap_cross_entropy_reference, softcap_cross_entropy, compiled):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets, 15.0, reduction)
        (loss * weight).sum().backward()
        results.append((loss.detach(), x.grad))
    (want, want_grad), rest = results[0], results[1:]
    for got, grad in rest:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=0,
                                   atol=(1e-2 if dtype == torch.bfloat16 else 1e-6) * want_grad.abs().max().item())
    none = torch.full((2, 3), -1)
    assert softcap_cross_entropy(logits[:2, :3].requires_grad_(True), none, 15.0).isnan()
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(logits, targets, 15.0, "max")
