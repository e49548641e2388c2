"""The benchmark's tables: one line per configuration while it runs, the markdown table of a
report (the shape of MosaicML llm-foundry's throughput table), and the anchor figures a
GPT-2 124M run is printed beside."""

from __future__ import annotations

import json
import os

# GPT-2 124M, T=1024, batch 16 per device, bf16, both measured side by side on one H200
# (nanoGPT with torch.compile, and plain JAX with cuDNN attention, untuned).
NANOGPT_ANCHOR = [
    {"system": "nanoGPT, torch.compile", "tokens_per_s_per_device": 488170, "mfu": 0.424},
    {"system": "plain JAX, cuDNN attention, no tuning", "tokens_per_s_per_device": 355248,
     "mfu": 0.309},
]
COLUMNS = ("model", "params", "seq len", "pos", "attn", "global batch", "tokens/s/device",
           "MFU", "step ms", "peak mem", "XLA mem est", "attn FLOPs")


def _gib(x):
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def _cells(r: dict) -> list[str]:
    head = [r["model"], f"{r['params'] / 1e6:.1f}M",
            str(r["seq_len"]), r["pos_encoding"], r["attention_impl"], str(r["global_batch"])]
    share = f"{100 * r['attention_flops_share']:.1f}%"
    if r["status"] != "ok":
        return head + [f"{r['status']}: {r.get('error', '')}"[:60]] + [""] * 4 + [share]
    return head + [f"{r['tokens_per_s_per_device']:,.0f}",
                   "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                   f"{r['step_ms']:.1f}", _gib(r["peak_memory_bytes"]),
                   _gib(r["compiled_memory_bytes"]), share]


def format_row(r: dict) -> str:
    return "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, _cells(r), strict=True) if v)


def markdown(report: dict) -> str:
    """The llm-foundry-shaped table (one row per configuration) plus the run's facts."""
    meta = report["meta"]
    head = (f"Throughput on {meta['devices']} x {meta['device_kind']} ({meta['platform']}), "
            f"jax {meta['jax']}, median of {meta['steps']} steps after {meta['warmup']} "
            f"warm-up steps, {meta['date']}. MFU: {meta['mfu_formula']}; n/a where the "
            "device's peak is unknown. Peak memory: device.memory_stats(), n/a where the "
            "platform reports none.")
    lines = [head, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def anchor_lines() -> list[str]:
    """The anchor figures, for printing beside a GPT-2 124M (nanogpt preset) run."""
    return ["Anchor (measured side by side): GPT-2 124M, T=1024, batch 16, bf16, one H200:",
            *(f"  {a['system']}: {a['tokens_per_s_per_device']:,} tokens/s, "
              f"MFU {100 * a['mfu']:.1f}%" for a in NANOGPT_ANCHOR)]


def write_report(report: dict, md: str, out_dir: str, name: str) -> None:
    """DIR/NAME.json (the report) and DIR/NAME.md (its table)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
