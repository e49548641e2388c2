"""TPU attention kernels (splash, and the Mosaic ALiBi flash kernel) against the reference.

Both run in the Pallas interpreter (interpret=True, so on any host). Errors as in
test_kernels.py: max|a - b| / max|b|, float32 <= 1e-5, bfloat16 <= 2e-2, outputs and
dq/dk/dv. Every case has packed documents
and trailing padding (packed_ids); lengths 200 and 100 are not block multiples. That the
kernels lower to Mosaic for a TPU is checked in test_lowering.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import kernels
from jaxllm.kernels import flash_tpu, splash, xla
from tests.test_kernels import (MODEL_MESH_SCRIPT, decode_inputs, packed_ids, random_qkv, rel,
                                run_on_8_devices, slopes_for, value_and_grads)

B128 = flash_tpu.BlockSizes(*[128] * 6)


def check_against_xla(fn, t, d, h, kh, dtype, alibi, causal=True, scale=None, seed=0):
    """fn(q, k, v, seg, pos, slopes) vs xla.attention: outputs and all three gradients."""
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, 2, t, h, kh, d, dtype)
    seg, pos = (jnp.asarray(x) for x in packed_ids(rng, 2, t))
    sl = jnp.asarray(slopes_for(h)) if alibi else None
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out, got = value_and_grads(lambda q, k, v: fn(q, k, v, seg, pos, sl), q, k, v, ct)
    want_out, want = value_and_grads(
        lambda q, k, v: xla.attention(q, k, v, seg, seg, pos, pos, sl, causal, scale), q, k, v, ct)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape
    errors = {"out": rel(out, want_out),
              **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", got, want, strict=True)}}
    assert all(e < tol for e in errors.values()), errors
    assert np.all(np.asarray(out, np.float32)[np.asarray(seg) == 0] == 0)  # padding rows


# (T, D, H, K, dtype, alibi, causal): head sizes 64 and 128, MHA / GQA / MQA, T = 200 and
# 100 padded to the 128 block (two and one q tiles; tiles across document boundaries).
FLASH_CASES = [
    (200, 64, 4, 2, jnp.float32, True, True),
    (256, 128, 2, 2, jnp.float32, False, True),
    (100, 128, 2, 1, jnp.float32, True, False),
    (256, 64, 4, 1, jnp.bfloat16, True, True),
    (200, 128, 2, 2, jnp.bfloat16, False, True),
]


@pytest.mark.parametrize("t,d,h,kh,dtype,alibi,causal", FLASH_CASES)
def test_flash_tpu_matches_xla_outputs_and_grads(t, d, h, kh, dtype, alibi, causal):
    def fn(q, k, v, seg, pos, sl):
        return flash_tpu.attention(q, k, v, seg, seg, pos, pos, sl, causal, block_sizes=B128,
                                   interpret=True)
    check_against_xla(fn, t, d, h, kh, dtype, alibi, causal, seed=t + d)


# (T, D, H, K, dtype, scale): splash has no ALiBi; the scale is applied to q by the backend.
SPLASH_CASES = [
    (200, 64, 4, 2, jnp.float32, None),
    (128, 128, 2, 2, jnp.float32, 0.3),
    (256, 64, 2, 1, jnp.bfloat16, None),
    (100, 128, 4, 2, jnp.bfloat16, None),
]


@pytest.mark.parametrize("t,d,h,kh,dtype,scale", SPLASH_CASES)
def test_splash_matches_xla_outputs_and_grads(t, d, h, kh, dtype, scale):
    def fn(q, k, v, seg, pos, sl):
        return splash.attention(q, k, v, seg, seg, pos, pos, sl, scale=scale, interpret=True)
    check_against_xla(fn, t, d, h, kh, dtype, False, scale=scale, seed=t + d)


def test_splash_applies_the_softmax_scale():
    """splash computes q.k unscaled: without the backend's scaling of q the result would be
    the reference at scale 1 (checked to differ), not at 1/sqrt(D)."""
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 1, 128, 2, 2, 64)
    ids = jnp.ones((1, 128), jnp.int32)
    pos = jnp.arange(128, dtype=jnp.int32)[None]
    got = splash.attention(q, k, v, ids, ids, pos, pos, interpret=True)
    assert rel(got, xla.attention(q, k, v, ids, ids, pos, pos)) < 1e-5
    assert rel(got, xla.attention(q, k, v, ids, ids, pos, pos, scale=1.0)) > 0.1


def test_flash_tpu_skips_tiles_with_no_visible_pair():
    """NaN in the v tiles a q tile cannot see stays out of its rows: class 0 tiles run no
    code (the reference multiplies 0 * NaN and is NaN everywhere)."""
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 256, 2, 1, 64)
    seg = jnp.asarray([[1] * 128 + [2] * 128], jnp.int32)  # documents = tiles 0 and 1
    pos = jnp.asarray([list(range(128)) * 2], jnp.int32)
    bad = v.at[:, 128:].set(jnp.nan)
    for causal in (True, False):
        out = np.asarray(flash_tpu.attention(q, k, bad, seg, seg, pos, pos, None, causal,
                                             block_sizes=B128, interpret=True))
        assert np.isfinite(out[:, :128]).all() and np.isnan(out[:, 128:]).all()
    assert np.isnan(np.asarray(xla.attention(q, k, bad, seg, seg, pos, pos))[:, :128]).all()


def test_flash_tpu_plan_fetches_the_last_live_tile():
    """4 * fetch + class: dead steps repeat the block index of the last live tile (no DMA),
    a row that starts dead loads its first live tile, an all-dead row tile 0."""
    cls = jnp.asarray([[[1, 2, 0, 0], [0, 0, 2, 1], [0, 0, 0, 0]]], jnp.int32)
    plan = np.asarray(flash_tpu._plan(cls))
    np.testing.assert_array_equal(plan & 3, cls)
    np.testing.assert_array_equal(plan >> 2, [[[0, 1, 1, 1], [2, 2, 2, 3], [0, 0, 0, 0]]])


def test_tpu_backends_reject_what_they_cannot_do():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 128, 2, 2, 64)
    ids = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="splash attention has no ALiBi; use attention backend"):
        splash.attention(q, k, v, ids, ids, ids, ids, jnp.ones(2))
    with pytest.raises(ValueError, match="block_q=192 must be a power of two >= 128"):
        flash_tpu.attention(q, k, v, ids, ids, ids, ids,
                            block_sizes=flash_tpu.BlockSizes(block_q=192))
    with pytest.raises(ValueError, match="H % K"):
        flash_tpu.attention(q[:, :, :1], k, v, ids, ids, ids, ids)
    with kernels.lowering_for("cuda"), pytest.raises(
            ValueError, match="splash attention is a TPU .Mosaic. kernel and the platform is cuda"):
        splash.attention(q, k, v, ids, ids, ids, ids)
    with pytest.raises(ValueError, match="bytes of tile metadata .* use larger blocks"):
        flash_tpu._plan(jnp.ones((33, 64, 64), jnp.int32))  # > 512 KiB


def test_config_accepts_every_backend_and_only_those():
    from jaxllm import config
    assert config.choices(config.SCHEMA["model"]["attention_backend"].choices) == kernels.BACKENDS
    cfg = config.tiny()
    cfg.model.attention_backend = "splash"
    config.validate(cfg)
    cfg.model.attention_backend = "mosaic"
    with pytest.raises(config.ConfigError, match="model.attention_backend.*splash"):
        config.validate(cfg)


def test_compare_backends_on_each_platform():
    """bench --compare_backends times these (kernels.compared_backends)."""
    assert kernels.compared_backends("tpu") == ("xla", "splash", "flash")
    assert kernels.compared_backends("gpu") == ("xla", "cudnn", "flash")
    with kernels.lowering_for("tpu"):
        assert kernels.compared_backends() == ("xla", "splash", "flash")


@pytest.mark.parametrize("backend", ["splash", "flash_tpu"])
def test_decoding_over_a_cache_matches_reference(backend):
    """3 new queries (positions 10-12) over a 40-slot cache, 13 filled (T != S). splash's
    causal mask is by index, so that backend runs xla here; the flash kernel takes it."""
    q, k, v, q_seg, kv_seg, q_pos, kv_pos = decode_inputs(64)
    sl = jnp.asarray(slopes_for(4)) if backend == "flash_tpu" else None
    fn = {"splash": splash.attention, "flash_tpu": flash_tpu.attention}[backend]
    got = fn(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sl, interpret=True)
    assert rel(got, xla.attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sl)) < 1e-5


def test_dispatcher_picks_tpu_kernels_when_targeting_tpu():
    """Under lowering_for("tpu", interpret=True), `auto` and `flash` run the TPU kernels
    (in the interpreter) and match the reference."""
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 128, 2, 1, 64)
    sl = jnp.asarray(slopes_for(2))
    with kernels.lowering_for("tpu", interpret=True):
        assert kernels.resolve_backend("auto", alibi=True) == "flash"
        assert kernels.resolve_backend("auto", alibi=False) == "splash"
        alibi = kernels.attention(q, k, v, alibi_slopes=sl, backend="auto")
        plain = kernels.attention(q, k, v, backend="auto")
    assert kernels.target_platform() == "cpu"
    assert rel(alibi, kernels.attention(q, k, v, alibi_slopes=sl, backend="xla")) < 1e-5
    assert rel(plain, kernels.attention(q, k, v, backend="xla")) < 1e-5


@pytest.mark.parametrize("pos", ["alibi", "rope"])
def test_model_runs_tpu_kernels_per_shard_on_a_mesh(pos):
    """`auto` as on TPU (ALiBi: the Mosaic flash kernel; RoPE: splash) in the interpreter:
    on a (2,2,2) mesh of CPU devices each kernel sees per-shard q/k/v blocks, and loss and
    grads match the xla backend on one device (float32, GQA, packed documents, padding)."""
    script = MODEL_MESH_SCRIPT.replace('pos_encoding="alibi"', f'pos_encoding="{pos}"').replace(
        '(got, g), text = loss_and_grads("flash", (2, 2, 2))',
        'from jaxllm import kernels\nwith kernels.lowering_for("tpu", interpret=True):\n'
        '    (got, g), text = loss_and_grads("auto", (2, 2, 2))')
    assert script.count(f'pos_encoding="{pos}"') == 1 and "lowering_for" in script
    out = run_on_8_devices(script)
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
    _, loss_err, grad_err, local = line.split()
    assert float(loss_err) < 1e-5 and float(grad_err) < 1e-4 and local == "True", line
