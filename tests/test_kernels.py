"""Attention backends against the reference (kernels/xla.py) and the reference against numpy.

Errors are norm-based: rel(a, b) = max|a - b| / max|b| (max over the whole array).
Tolerances: float32 1e-5, bfloat16 2e-2. The flash kernel runs in Pallas interpret mode
on CPU; its Triton (GPU) lowering is checked by lowering for the "cuda" platform.
The cuDNN call itself needs a GPU; on CPU the same arguments go through JAX's XLA path.
"""

from __future__ import annotations

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import kernels
from jaxllm.kernels import cudnn, flash, tiles, xla
from tests.fixtures import jax_internal, run_py


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def packed_ids(rng, b, t, docs=3, pad=3):
    """Segment ids 1..docs per row (random cut points), then `pad` padding tokens (id 0);
    positions restart at 0 in every document."""
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = [0, *sorted(rng.choice(np.arange(1, t - pad), docs - 1, replace=False)), t - pad]
        for d in range(docs):
            seg[r, cuts[d]:cuts[d + 1]] = d + 1
            pos[r, cuts[d]:cuts[d + 1]] = np.arange(cuts[d + 1] - cuts[d])
    return seg, pos


def slopes_for(h):
    return (2.0 ** -np.arange(1, h + 1) * 4).astype(np.float32)  # steep: ALiBi visibly matters


def numpy_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, slopes, causal, scale):
    """Independent reference: explicit loops over batch, head and query; float64."""
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, d))
    g = h // k.shape[2]
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(k.shape[1])
                        if kv_seg[bi, j] > 0 and kv_seg[bi, j] == q_seg[bi, i]
                        and (not causal or kv_pos[bi, j] <= q_pos[bi, i])]
                if not keys:
                    continue
                logits = np.array([q[bi, i, hi] @ k[bi, j, hi // g] * scale
                                   + (0.0 if slopes is None else
                                      slopes[hi] * (kv_pos[bi, j] - q_pos[bi, i]))
                                   for j in keys])
                w = np.exp(logits - logits.max())
                out[bi, i, hi] = (w / w.sum()) @ v[bi, keys, hi // g]
    return out


def random_qkv(rng, b, t, h, kh, d, dtype=jnp.float32, s=None):
    s = s or t
    shapes = [(b, t, h, d), (b, s, kh, d), (b, s, kh, d)]
    return [jnp.asarray(rng.standard_normal(x), dtype) for x in shapes]


def decode_inputs(d):
    """Decoding: 3 new queries (positions 10-12) of 4 heads over a 40-slot cache of 2 kv
    heads, 13 slots filled: q, k, v, q_seg, kv_seg, q_pos, kv_pos."""
    q, k, v = random_qkv(np.random.default_rng(7), 2, 3, 4, 2, d, s=40)
    q_seg = jnp.ones((2, 3), jnp.int32)
    q_pos = jnp.broadcast_to(jnp.arange(10, 13, dtype=jnp.int32), (2, 3))
    kv_seg = jnp.asarray(np.tile(np.arange(40) < 13, (2, 1)), jnp.int32)
    kv_pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    return q, k, v, q_seg, kv_seg, q_pos, kv_pos


@pytest.mark.parametrize("alibi,causal", [(True, True), (False, True), (True, False)])
def test_xla_reference_matches_numpy_on_packed_batch(alibi, causal):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng, 2, 24, 4, 2, 8)
    seg, pos = packed_ids(rng, 2, 24)
    sl = slopes_for(4) if alibi else None
    got = xla.attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos),
                        jnp.asarray(pos), None if sl is None else jnp.asarray(sl), causal)
    want = numpy_attention(*map(np.asarray, (q, k, v)), seg, seg, pos, pos, sl, causal, 8 ** -0.5)
    assert rel(got, want) < 1e-5
    assert np.all(np.asarray(got)[seg == 0] == 0)  # padding rows are zeros


def value_and_grads(fn, q, k, v, ct):
    """fn(q, k, v) and the gradients of sum(fn(q, k, v) * ct), in one compiled call."""
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(run)(q, k, v, ct)


# (T, D, H, K, dtype, alibi, causal, blocks): sizes 32/64/128 (and 100: padded to a block
# multiple), head sizes 16/32/64 (and 24: zero-padded to 32), MHA, GQA and MQA, G = 3.
B16 = flash.BlockSizes(16, 16, 16, 16, 16, 16)
B32 = flash.BlockSizes(32, 32, 32, 32, 32, 32)
MIXED = flash.BlockSizes(64, 32, 32, 64, 64, 32)
CASES = [
    (32, 16, 2, 1, jnp.float32, True, True, B16),
    (64, 32, 4, 2, jnp.float32, False, True, B16),
    (128, 64, 2, 2, jnp.float32, True, True, MIXED),
    (100, 24, 3, 1, jnp.float32, True, True, B32),
    (64, 16, 2, 1, jnp.float32, True, False, B32),
    (64, 32, 4, 2, jnp.bfloat16, True, True, B32),
    (128, 64, 2, 1, jnp.bfloat16, False, True, None),
]


@pytest.mark.parametrize("t,d,h,kh,dtype,alibi,causal,blocks", CASES)
def test_flash_matches_xla_outputs_and_grads(t, d, h, kh, dtype, alibi, causal, blocks):
    rng = np.random.default_rng(t + d + h)
    q, k, v = random_qkv(rng, 2, t, h, kh, d, dtype)
    seg, pos = (jnp.asarray(x) for x in packed_ids(rng, 2, t))
    sl = jnp.asarray(slopes_for(h)) if alibi else None

    def fl(q, k, v):
        return flash.attention(q, k, v, seg, seg, pos, pos, sl, causal, block_sizes=blocks)

    def ref(q, k, v):
        return xla.attention(q, k, v, seg, seg, pos, pos, sl, causal)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out, got = value_and_grads(fl, q, k, v, ct)
    want_out, want = value_and_grads(ref, q, k, v, ct)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, want_out) < tol
    assert np.all(np.asarray(out, np.float32)[np.asarray(seg) == 0] == 0)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.dtype == dtype, name
        assert rel(a, b) < tol, f"d{name}: {rel(a, b)}"


def test_flash_skips_tiles_with_no_visible_pair():
    """Poison v with NaN in tiles a q tile cannot see: skipped tiles are never read, so
    those q rows stay finite (the reference multiplies 0 * NaN and is NaN everywhere)."""
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 64, 2, 1, 16)
    blocks = flash.BlockSizes(*[16] * 6)
    # causal, one document: q tile 0 (rows 0-15) never sees kv tiles 1-3.
    seg = jnp.ones((1, 64), jnp.int32)
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    bad = v.at[:, 16:].set(jnp.nan)
    out = np.asarray(flash.attention(q, k, bad, seg, seg, pos, pos, block_sizes=blocks))
    assert np.isfinite(out[:, :16]).all() and np.isnan(out[:, 16:]).all()
    assert np.isnan(np.asarray(xla.attention(q, k, bad, seg, seg, pos, pos))[:, :16]).all()
    # packed: documents are tiles 0-1 and 2-3; q tiles 2-3 never see kv tiles 0-1.
    seg = jnp.asarray([[1] * 32 + [2] * 32], jnp.int32)
    pos = jnp.asarray([list(range(32)) * 2], jnp.int32)
    bad = v.at[:, :32].set(jnp.nan)
    out = np.asarray(flash.attention(q, k, bad, seg, seg, pos, pos, block_sizes=blocks))
    assert np.isfinite(out[:, 32:]).all() and np.isnan(out[:, :32]).all()


@pytest.mark.parametrize("causal", [True, False])
def test_tile_classes_are_sound_against_the_full_mask(causal):
    """Class 0 tiles hold no visible pair, class 2 tiles only visible pairs (brute force);
    one causal document gives exactly the lower triangle with a masked diagonal."""
    rng = np.random.default_rng(6)
    seg, pos = packed_ids(rng, 3, 128, docs=2, pad=20)
    seg_, pos_ = jnp.asarray(seg), jnp.asarray(pos)
    cls = np.asarray(tiles.tile_classes(tiles.Ids(seg_, seg_, pos_, pos_), 16, 32, causal))
    mask = np.asarray(xla.mask_and_bias(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos),
                                        jnp.asarray(pos), None, causal)[0])[:, 0]
    blocks = mask.reshape(3, 8, 16, 4, 32).transpose(0, 1, 3, 2, 4)  # [B, nq, nk, bq, bk]
    assert not blocks[cls == 0].any() and blocks[cls == 2].all()
    assert (cls == 0).sum() > 0 and (cls == 2).sum() > 0
    one = jnp.ones((1, 64), jnp.int32)
    ar = jnp.arange(64, dtype=jnp.int32)[None]
    cls = np.asarray(tiles.tile_classes(tiles.Ids(one, one, ar, ar), 16, 16, causal))[0]
    want = np.tril(np.full((4, 4), 2)) - np.eye(4, dtype=int) if causal else np.full((4, 4), 2)
    np.testing.assert_array_equal(cls, want)


def skip_without_cuda_lowering():
    """jaxlib <= 0.10.2 emits Triton IR when lowering for cuda on any host; later jaxlibs
    compile it right away and need the CUDA plugin's compilation handler."""
    version = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:3])
    if version > (0, 10, 2) and not jax_internal("jax._src.lib.triton",
                                                 "has_compilation_handler")("cuda"):
        pytest.skip("this jaxlib needs the CUDA plugin to lower Pallas kernels for cuda")


def test_flash_kernels_lower_to_triton_for_gpu():
    """Forward and the dq, dk/dv backward kernels pass the Pallas Triton lowering (cuda)."""
    skip_without_cuda_lowering()
    q = jax.ShapeDtypeStruct((2, 256, 6, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    sl = jax.ShapeDtypeStruct((6,), jnp.float32)

    def loss(q, k, v, seg, pos, sl):
        out = flash.attention(q, k, v, seg, seg, pos, pos, sl, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2))
    text = jax.jit(fn).trace(q, k, k, ids, ids, sl).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3
    assert text.count("flash_alibi_fwd") >= 1 and text.count("flash_alibi_dkv") >= 1


@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.bfloat16), (64, jnp.float32)])
def test_flash_kernels_compile_for_sm90_without_register_spills(d, dtype, tmp_path, monkeypatch):
    """Optional (needs the `triton` package): the Triton IR of all three kernels at the
    default tiles compiles to sm_90 PTX and ptxas reports no register spills."""
    triton = pytest.importorskip("triton")
    skip_without_cuda_lowering()
    import pathlib
    import subprocess

    from triton.backends.compiler import GPUTarget

    reg = jax_internal("jax._src.pallas.triton.pallas_call_registration")

    modules, lower = [], reg.lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", keep)
    q = jax.ShapeDtypeStruct((2, 1024, 6, d), dtype)
    k = jax.ShapeDtypeStruct((2, 1024, 2, d), dtype)
    ids = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    sl = jax.ShapeDtypeStruct((6,), jnp.float32)

    def loss(q, k, v, seg, pos, sl):
        out = flash.attention(q, k, v, seg, seg, pos, pos, sl, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, ids, ids, sl).lower(
        lowering_platforms=("cuda",))
    assert len(modules) == 3
    ptxas = sorted((pathlib.Path(triton.__file__).parent / "backends/nvidia/bin").glob("ptxas*"))
    opts = {"num_warps": flash.default_num_warps(d, dtype), "num_stages": 2}
    for i, text in enumerate(modules):
        (tmp_path / f"k{i}.ttir").write_text(text)
        kernel = triton.compile(str(tmp_path / f"k{i}.ttir"), target=GPUTarget("cuda", 90, 32),
                                options=opts)
        (tmp_path / f"k{i}.ptx").write_text(kernel.asm["ptx"])
        runs = [subprocess.run([str(exe), "-v", "--gpu-name", "sm_90a", str(tmp_path / f"k{i}.ptx"),
                                "-o", str(tmp_path / f"k{i}.cubin")],
                               check=False, capture_output=True, text=True) for exe in ptxas]
        info = next((r for r in runs if r.returncode == 0), runs[-1])  # one accepts the PTX
        assert info.returncode == 0, info.stderr
        assert "0 bytes spill stores" in info.stderr + info.stdout, info.stderr


def test_flash_rejects_bad_shapes_and_blocks():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 32, 3, 2, 16)
    ids = jnp.ones((1, 32), jnp.int32)
    with pytest.raises(ValueError, match="H % K"):
        flash.attention(q, k, v, ids, ids, ids, ids)
    q = q[:, :, :2]
    with pytest.raises(ValueError, match="block_q=48 must be a power of two >= 16"):
        flash.attention(q, k, v, ids, ids, ids, ids, block_sizes=flash.BlockSizes(block_q=48))


@pytest.mark.parametrize("segments,alibi", [("mask", False), ("mask", True),
                                            ("lengths", True), ("none", False)])
def test_cudnn_argument_plumbing_matches_reference_on_xla_path(segments, alibi):
    """Same mask/bias/lengths as the GPU call, through jax.nn's XLA path on CPU."""
    rng = np.random.default_rng(4)
    b, t, h, kh = 2, 32, 4, 2
    q, k, v = random_qkv(rng, b, t, h, kh, 16)
    if segments == "mask":  # packed documents and padding
        seg, pos = packed_ids(rng, b, t)
    else:  # one document per row, then padding ("none": no padding)
        lengths = [t - 5, t - 9] if segments == "lengths" else [t, t]
        seg = np.stack([(np.arange(t) < n).astype(np.int32) for n in lengths])
        pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    sl = jnp.asarray(slopes_for(h)) if alibi else None
    kwargs, valid = cudnn.cudnn_arguments(seg, seg, pos, pos, sl, True, segments=segments,
                                          dtype=q.dtype)
    assert kwargs["is_causal"] is True
    assert (kwargs["mask"] is not None) == (segments == "mask")
    assert (kwargs["bias"] is not None) == alibi
    if segments == "lengths":
        np.testing.assert_array_equal(kwargs["key_value_seq_lengths"], [t - 5, t - 9])
    if alibi:
        assert kwargs["bias"].shape == (b, h, t, t)
    np.testing.assert_array_equal(valid, seg > 0)
    got = cudnn.attention(q, k, v, seg, seg, pos, pos, sl, segments=segments,
                          implementation="xla")
    assert rel(got, xla.attention(q, k, v, seg, seg, pos, pos, sl)) < 1e-5


def test_cudnn_rejects_float32_and_unknown_segment_mode():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 16, 2, 2, 16)
    ids = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cudnn.attention(q, k, v, ids, ids, ids, ids)
    with pytest.raises(ValueError, match="segments='docs'; allowed: mask, lengths, none"):
        cudnn.attention(q, k, v, ids, ids, ids, ids, segments="docs", implementation="xla")


@pytest.mark.parametrize("platform,alibi,dtype,want", [
    ("gpu", False, jnp.bfloat16, "cudnn"), ("gpu", False, jnp.float16, "cudnn"),
    ("gpu", True, jnp.bfloat16, "flash"), ("gpu", False, jnp.float32, "flash"),
    ("rocm", False, jnp.bfloat16, "flash"), ("cpu", False, jnp.bfloat16, "xla"),
    ("cpu", True, jnp.float32, "xla"), ("tpu", True, jnp.bfloat16, "flash"),
    ("tpu", False, jnp.bfloat16, "splash"), ("tpu", False, jnp.float32, "splash"),
])
def test_resolve_backend_auto_choices(platform, alibi, dtype, want):
    assert kernels.resolve_backend("auto", alibi=alibi, platform=platform, dtype=dtype) == want


def test_resolve_backend_names_and_errors():
    for name in ("xla", "cudnn", "flash", "splash"):
        assert kernels.resolve_backend(name, alibi=True, platform="cpu") == name
    assert kernels.resolve_backend("auto", alibi=False) == "xla"  # this CPU test host
    with pytest.raises(ValueError, match="unknown attention backend 'fast'; allowed: auto, xla"):
        kernels.resolve_backend("fast", alibi=False)


def test_dispatcher_flash_matches_xla_with_default_ids():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 32, 2, 1, 16)
    sl = jnp.asarray(slopes_for(2))
    got = kernels.attention(q, k, v, alibi_slopes=sl, backend="flash")
    want = kernels.attention(q, k, v, alibi_slopes=sl, backend="auto")
    assert rel(got, want) < 1e-5


def test_xla_and_cudnn_backends_import_no_pallas():
    """The Pallas backends are imported only when chosen, so a JAX without (or with a
    broken) Pallas still runs the xla and cudnn backends."""
    code = ("import sys, jax.numpy as jnp\nfrom jaxllm import kernels\n"
            "q = jnp.ones((1, 8, 2, 16))\n"
            "kernels.attention(q, q, q, backend='xla')\n"
            "print(sorted(m for m in sys.modules if 'pallas' in m))")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_kv_cache_shapes_match_reference(backend):
    """Decoding: 3 new queries (positions 10-12) over a 40-slot cache, 13 slots filled."""
    q, k, v, q_seg, kv_seg, q_pos, kv_pos = decode_inputs(16)
    sl = jnp.asarray(slopes_for(4))
    if backend == "flash":
        got = flash.attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sl)
    else:
        got = cudnn.attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sl, implementation="xla")
    assert rel(got, xla.attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, sl)) < 1e-5


def run_on_8_devices(script: str) -> str:
    """Run `script` in a fresh Python with 8 simulated CPU devices; its stdout."""
    res = run_py(script, devices=8, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxllm.kernels import flash, xla
mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
           for s in [(4, 32, 4, 16), (4, 32, 2, 16), (4, 32, 2, 16)])
seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 16 + [0] * 4], 4, 0), jnp.int32)
pos = jnp.asarray(np.repeat([list(range(12)) + list(range(16)) + [0] * 4], 4, 0), jnp.int32)
sl = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
def with_grads(fn):
    def f(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)
    return jax.jit(f)
fl = with_grads(lambda q, k, v: flash.attention(q, k, v, seg, seg, pos, pos, sl,
                                                shard_axes=("data", "tensor")))
with jax.set_mesh(mesh):
    xs = [jax.device_put(a, NamedSharding(mesh, P("data", None, "tensor", None)))
          for a in (q, k, v)]
    got = fl(*xs)
    text = fl.lower(*xs).as_text()
want = with_grads(lambda q, k, v: xla.attention(q, k, v, seg, seg, pos, pos, sl))(q, k, v)
err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print("ERR", err, "LOCAL", "tensor<1x32x2x16xf32>" in text and "tensor<1x32x1x16xf32>" in text)
"""


def test_flash_runs_per_shard_under_shard_map_on_8_devices():
    """shard_axes: batch over `data`, heads over `tensor`; the kernels see per-shard
    [1, 32, 2, 16] q and [1, 32, 1, 16] k/v blocks, and outputs and grads match."""
    out = run_on_8_devices(SHARDED_SCRIPT)
    _, err, _, local = out.split()
    assert float(err) < 1e-5 and local == "True", out


def test_flash_shard_axes_needs_a_mesh():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 16, 2, 2, 16)
    ids = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="shard_axes needs a mesh"):
        flash.attention(q, k, v, ids, ids, ids, ids, shard_axes=("data", None))


MODEL_MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jaxllm import parallel
from jaxllm.config import defaults
from jaxllm.state import init_state
from jaxllm.model.loss import forward_sums
from jaxllm import optim

def cfg_for(backend, mesh):
    c = defaults()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                   dtype="float32", pos_encoding="alibi", attention_backend=backend)
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return c

rng = np.random.default_rng(0)
toks = rng.integers(1, 128, size=(8, 33))
seg = np.ones((8, 32), np.int32); seg[:, 20:] = 2; seg[1, 28:] = 0
pos = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(8, 0).astype(np.int32)
batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos}

def loss_and_grads(backend, mesh_shape):
    cfg = cfg_for(backend, mesh_shape)
    mesh = parallel.make_mesh(cfg, jax.devices()[:int(np.prod(mesh_shape))])
    model_def, state, _ = init_state(cfg, mesh, optim.build_optimizer(cfg))
    def f(params, b):
        nll, _, _, w = forward_sums(model_def, params, b, 0)
        return nll / w.sum()
    with parallel.activate(cfg, mesh):
        b = parallel.global_batch({k: jnp.asarray(v) for k, v in batch.items()}, mesh)
        fn = jax.jit(jax.value_and_grad(f))
        text = fn.lower(state["params"], b).as_text()
        return fn(state["params"], b), text

(ref, gref), _ = loss_and_grads("xla", (1, 1, 1))
(got, g), text = loss_and_grads("flash", (2, 2, 2))
g, gref = jax.device_get((g, gref))
# relative to each leaf's scale, floored at 1e-3 of the largest gradient: k_bias's true
# gradient is exactly zero (it shifts all of a query's scores alike), its computed one noise
top = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(gref))
err = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3 * top))
          for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gref)))
# per shard: batch 8 / (data*fsdp = 4) = 2, heads 4 / tensor 2 = 2, kv heads 2 / 2 = 1
print("RESULT", abs(float(got) / float(ref) - 1), err,
      "tensor<2x32x2x8xf32>" in text and "tensor<2x32x1x8xf32>" in text)
"""


def test_model_runs_flash_per_shard_on_a_mesh():
    """The model hands the flash kernel its mesh axes (batch over data+fsdp, heads over
    tensor) from the logical rules: on a (2,2,2) mesh the kernel sees per-shard q/k/v
    blocks, and loss and grads match the xla backend on one device (float32, ALiBi, GQA,
    packed documents and padding)."""
    out = run_on_8_devices(MODEL_MESH_SCRIPT)
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
    _, loss_err, grad_err, local = line.split()
    assert float(loss_err) < 1e-5 and float(grad_err) < 1e-4 and local == "True", line
