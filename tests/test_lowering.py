"""The whole jitted train step lowers for hardware this host does not have.

`jax.export.export(step, platforms=["tpu"])` (or "cuda") on a CPU-only jaxlib runs the
Pallas Mosaic / Triton lowerings of the attention kernels inside the real train step
(`train.step.jit_train_step`, the construction the training loop uses) from abstract
shapes: nothing is allocated and no TPU or GPU is needed. `kernels.lowering_for(platform)`
makes `auto` choose as on that platform and the kernels lower instead of interpreting.
What works here: a mesh of CPU devices (one, or eight simulated in a subprocess) provides
the shardings; the export records only the device count, so the same module is what a
TPU/GPU slice of that size would compile. What this cannot prove: the device compilers'
own passes (Mosaic in libtpu, Triton's PTX generation and cuDNN's plan) run only there.

Checks: the kernels' custom calls (named) are in the module, and on the fused-kernel
paths no [T, T] (or padded [Tp, Tp]) tensor is; the xla backend shows the check can fail.
T = 384 (padded to 512 by the TPU flash kernel) matches no other dimension of the model.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxllm import kernels, optim, parallel
from jaxllm.config import defaults
from jaxllm.state import abstract_state
from jaxllm.train.step import jit_train_step
from tests.fixtures import jax_internal
from tests.test_kernels import run_on_8_devices, skip_without_cuda_lowering

T = 384
SQUARE = re.compile(r"tensor<(?:[0-9]+x)*(?:384x384|512x512)x[^>]*>")
# Lowering proofs, not artifacts to keep: these custom calls have no serialization
# compatibility guarantee, which jax.export otherwise enforces.
UNSTABLE_CALLS = ("__gpu$xla.gpu.triton", "__cudnn$fmhaScaleBiasSoftmax",
                  "__cudnn$fmhaScaleBiasSoftmaxBackward", "__cudnn$fmhaSoftmax",
                  "__cudnn$fmhaSoftmaxBackward")


def small_cfg(pos, backend, dtype="bfloat16", mesh=(1, 1, 1)):
    c = defaults()
    c.model.update(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                   d_ff=1024, dtype=dtype, pos_encoding=pos, attention_backend=backend)
    c.data.seq_len = T
    c.train.batch_size = 4
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return c


def export_train_step(platform, cfg, devices=1):
    """The StableHLO text of the jitted train step exported for `platform`."""
    mesh = parallel.make_mesh(cfg, jax.devices()[:devices])
    tx = optim.build_optimizer(cfg)
    model_def, abstract, shardings = abstract_state(cfg, mesh, tx)
    ids = jax.ShapeDtypeStruct((cfg.train.batch_size, T), jnp.int32,
                               sharding=parallel.batch_sharding(mesh))
    batch = {"inputs": ids, "targets": ids, "segment_ids": ids, "positions": ids}
    checks = [export.DisabledSafetyCheck.custom_call(c) for c in UNSTABLE_CALLS]
    with parallel.activate(cfg, mesh), kernels.lowering_for(platform):
        step = jit_train_step(cfg, model_def, tx, shardings, mesh)
        exported = export.export(step, platforms=[platform], disabled_checks=checks)(
            abstract, batch)
    assert exported.platforms == (platform,) and exported.nr_devices == devices
    return exported.mlir_module()


def kernel_names(text):
    """Mosaic kernels' `kernel_name`s and Triton kernels' `name`s."""
    return re.findall(r'(?<!\w)(?:kernel_)?name = "((?:splash|flash)_\w+)"', text)


@pytest.mark.parametrize("pos,kernel", [("alibi", "flash_alibi_tpu"), ("rope", "splash_mqa"),
                                        ("learned", "splash_mqa"), ("none", "splash_mqa")])
def test_train_step_lowers_for_tpu_with_mosaic_kernels(pos, kernel):
    """`auto` on TPU: ALiBi -> the Mosaic flash kernel, else splash (GQA: its multi-query
    kernel); forward, dq and dk/dv kernels present (the layers are scanned: one copy)."""
    text = export_train_step("tpu", small_cfg(pos, "auto"))
    names = kernel_names(text)
    assert text.count("tpu_custom_call") == 3, names
    assert sorted(n.split("_segmented")[0] for n in names) == sorted(
        f"{kernel}_{part}" for part in ("dkv", "dq", "fwd")), names
    assert not SQUARE.findall(text)


def test_xla_backend_keeps_square_score_tensors():
    """The control for the [T, T] check: the reference backend materialises the scores."""
    text = export_train_step("tpu", small_cfg("alibi", "xla"))
    assert "tpu_custom_call" not in text and SQUARE.findall(text)


@pytest.mark.parametrize("pos,backend,calls", [
    ("alibi", "flash", ["__gpu$xla.gpu.triton"]),
    ("rope", "flash", ["__gpu$xla.gpu.triton"]),
    ("rope", "cudnn", ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]),
    ("alibi", "cudnn", ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]),
    ("alibi", "auto", ["__gpu$xla.gpu.triton"]),  # auto on GPU: ALiBi -> flash
    ("rope", "auto", ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]),
])
def test_train_step_lowers_for_cuda(pos, backend, calls, monkeypatch):
    """GPU: the Triton flash kernels (forward, dq, dk/dv; no [T, T] tensor) and cuDNN's
    fused attention (whose packed-document mask and ALiBi bias are dense by design,
    kernels/cudnn.py). A CPU jaxlib has no cuDNN to report its version, which the cuDNN
    lowering only uses to gate features: the test states 9.10."""
    skip_without_cuda_lowering()
    monkeypatch.setattr(jax_internal("jax._src.cudnn.fused_attention_stablehlo"),
                        "check_cudnn_version", lambda: 91000)
    text = export_train_step("cuda", small_cfg(pos, backend))
    found = sorted(set(re.findall(r"custom_call @([^(]+)\(", text)))
    assert found == sorted(calls), found
    if "__gpu$xla.gpu.triton" in calls:
        assert sorted(kernel_names(text)) == ["flash_alibi_dkv", "flash_alibi_dq",
                                              "flash_alibi_fwd"]
        assert not SQUARE.findall(text)


MESH_EXPORT_SCRIPT = r"""
import re
from tests.test_lowering import export_train_step, small_cfg, kernel_names
for pos in ("alibi", "rope"):
    text = export_train_step("tpu", small_cfg(pos, "auto", mesh=(2, 2, 2)), devices=8)
    # per shard: batch 4 / (data*fsdp) = 1, heads 4 / tensor = 2, kv heads 1; head size 64
    print("RESULT", pos, len(kernel_names(text)), "tensor<1x384x2x64xbf16>" in text,
          "tensor<1x384x1x64xbf16>" in text)
"""


def test_train_step_lowers_for_a_tpu_slice_from_a_cpu_mesh():
    """A (2,2,2) mesh of CPU devices exports for an 8-chip TPU slice: the kernels run per
    shard (batch over data+fsdp, heads over tensor) on [1, T, 2, 64] q blocks."""
    out = run_on_8_devices(MESH_EXPORT_SCRIPT)
    lines = [ln.split()[1:] for ln in out.splitlines() if ln.startswith("RESULT")]
    assert lines == [["alibi", "3", "True", "True"], ["rope", "3", "True", "True"]], out
