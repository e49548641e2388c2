"""Optimizers: `build_optimizer(cfg)` and the pieces the train loop logs and shards.

Train-step contract (see build.py, sophia.py):

    tx = build_optimizer(cfg)                      # optax.GradientTransformationExtraArgs
    extra = hessian_extra_args(cfg, step, model_fn, params, batch, rng)   # {} unless Sophia
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    lr = lr_schedule(cfg)(step); metrics |= optimizer_metrics(opt_state)
"""

from jaxllm.optim.adam8bit import (
    SIGNED_MAP,
    UNSIGNED_MAP,
    adam8bit,
    block_for,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    scale_by_adam8bit,
)
from jaxllm.optim.build import (
    build_optimizer,
    decay_mask,
    hessian_estimator,
    hessian_extra_args,
    lr_schedule,
    resolved_hparams,
    skip_nonfinite,
)
from jaxllm.optim.sophia import SophiaState, gauss_newton_bartlett, hutchinson, scale_by_sophia
from jaxllm.optim.state import opt_state_bytes, opt_state_shardings, optimizer_metrics

__all__ = [
    "SIGNED_MAP", "UNSIGNED_MAP", "SophiaState", "adam8bit", "block_for", "build_optimizer",
    "decay_mask", "dequantize_blockwise", "dynamic_map", "gauss_newton_bartlett",
    "hessian_estimator", "hessian_extra_args", "hutchinson", "lr_schedule", "opt_state_bytes",
    "opt_state_shardings", "optimizer_metrics", "quantize_blockwise", "resolved_hparams",
    "scale_by_adam8bit", "scale_by_sophia", "skip_nonfinite",
]
