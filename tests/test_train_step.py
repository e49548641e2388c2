"""The traced train step: remat policy of the scanned block, bf16 matmuls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxllm import benchmark as B
from jaxllm import optim, parallel
from jaxllm.config import defaults
from jaxllm.state import abstract_state
from jaxllm.train.step import make_train_step


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize("remat,loss_chunk,policies", [
    ("none", 0, []),  # one logits chunk: computed directly, nothing recomputed
    ("none", 16, ["None"]),  # only the chunked loss's checkpoint
    ("dots_no_batch", 16, ["DotsSaveable(only_if_no_batch_dims=True)", "None"]),
    ("dots_no_batch", 0, ["DotsSaveable(only_if_no_batch_dims=True)"]),
])
def test_train_step_remat_policy_and_bf16_matmuls(remat, loss_chunk, policies):
    """The traced train step checkpoints the scanned block with the configured policy and
    each logits chunk when there are several, and with model.dtype=bfloat16 no matmul runs
    with two float32 operands."""
    cfg = B.bench_config(defaults(), "tiny", 32, "rope", "xla", 2, 256)
    cfg.model.remat = remat
    cfg.train.loss_chunk = loss_chunk
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    tx = optim.build_optimizer(cfg)
    model_def, tree, _ = abstract_state(cfg, mesh, tx)
    batch = {k: jax.ShapeDtypeStruct((2, 32), jnp.int32)
             for k in ("inputs", "targets", "segment_ids", "positions")}
    with parallel.activate(cfg, mesh):
        jaxpr = jax.make_jaxpr(make_train_step(cfg, model_def, tx))(tree, batch)
    eqns = list(_eqns(jaxpr.jaxpr))
    found = sorted(str(e.params["policy"]) for e in eqns if e.primitive.name == "remat2")
    assert found == policies
    dots = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns
            if e.primitive.name == "dot_general"]
    assert dots.count(("bfloat16", "bfloat16")) >= 10
    assert ("float32", "float32") not in dots
