"""FLOPs, MFU and the metrics sinks (metrics.jsonl, TensorBoard, optional W&B).

MFU uses one formula everywhere (as PaLM, Chowdhery et al. 2022, app. B, and llm-foundry
count it): model FLOPs per token = 6*N + 12*L*d_model*T,
N the parameter count excluding position-embedding tables, attention counted in full.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxllm.runfiles import open_metrics

PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12,
             "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
             "tpu v6 lite": 918e12, "tpu v6e": 918e12}


def param_count(params, exclude_positions: bool = False) -> int:
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(k, "key", k)) for k in path]
        if exclude_positions and "pos_embed" in keys:
            continue
        total += int(np.prod(x.shape))
    return total


def flops_per_token(n_params_no_pos: int, n_layers: int, d_model: int, seq_len: int) -> float:
    return 6.0 * n_params_no_pos + 12.0 * n_layers * d_model * seq_len


def attention_flops_share(n_params_no_pos, n_layers, d_model, seq_len) -> float:
    attn = 12.0 * n_layers * d_model * seq_len
    return attn / flops_per_token(n_params_no_pos, n_layers, d_model, seq_len)


def peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_BF16.items():
        if name in kind:
            return peak
    return None


def mfu(tokens_per_s_per_device: float, fpt: float, peak: float | None):
    return None if peak is None else tokens_per_s_per_device * fpt / peak


class MetricsWriter:
    """Appends rows to WORKDIR/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, cfg, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.file = open_metrics(os.path.join(workdir, "metrics.jsonl"))
        if cfg.log.tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            self.tb.add_text("config", "```\n" + cfg.to_json_best_effort(indent=2) + "\n```")
        if cfg.log.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.log.wandb_project, config=cfg.to_dict(),
                                    dir=workdir, resume="allow")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row.get("step", 0)
        prefix = row.get("split") or row.get("event")
        scalars = {f"{prefix}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None and "split" in row:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and "split" in row:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
