"""Safetensors weights of a Hugging Face directory: read (any float dtype, one file or a
sharded index) and write (one file, or shards of at most `max_shard_size` bytes with a
`model.safetensors.index.json`, as transformers' `save_pretrained` writes them).

Reading parses the file format (an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the raw little-endian data, the byte order of
every host jaxllm runs on) into numpy arrays memory-mapped from the file. It is done here
rather than with `safetensors.safe_open(..., framework="np")` because that reader finds
bfloat16 only when `ml_dtypes` happens to have registered it with numpy (and older
safetensors releases refuse it outright), and bfloat16 is how most checkpoints (and
`tools/export_hf.py --dtype bfloat16`) are stored.
Writing uses `safetensors.numpy.save_file`, which writes ml_dtypes' bfloat16 arrays.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxllm.config import ConfigError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def read_safetensors(path) -> dict:
    """{name: np.ndarray} of one .safetensors file (memory-mapped, read-only)."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        raw = np.memmap(path, np.uint8, mode="r") if path.stat().st_size > 8 + n else None
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}; readable: "
                                 + ", ".join(DTYPES))
            a, b = info["data_offsets"]
            data = raw[8 + n + a:8 + n + b] if raw is not None else np.zeros(0, np.uint8)
            out[name] = data.view(DTYPES[info["dtype"]]).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable safetensors file ({e})") from None


def read_weights(d: pathlib.Path) -> dict:
    """All tensors of directory `d`: model.safetensors or the shards its index names."""
    index = d / INDEX
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"{index}: unreadable index ({e})") from None
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{d}: no model.safetensors (or {INDEX}); only safetensors "
                          "weights are read (convert .bin files first)")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(d / name))
    return tensors


def parse_size(text) -> int:
    """Bytes of a size such as 5GB, 500MB, 2GiB or 1000000 (decimal units as in
    transformers' `max_shard_size`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--max_shard_size: got {text!r}; use a positive size such as "
                          "5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def write_weights(tensors: dict, out: pathlib.Path, max_shard_size=None) -> list[str]:
    """Write `tensors` into `out`; returns the file names written. Shards fill in the
    tensors' order up to `max_shard_size` bytes each (a larger tensor gets its own)."""
    limit = math.inf if max_shard_size is None else parse_size(max_shard_size)
    shards, size = [[]], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += x.nbytes
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, keys in zip(names, shards, strict=True):
        save_file({k: tensors[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(int(x.nbytes) for x in tensors.values())},
             "weight_map": {k: f for f, keys in zip(names, shards, strict=True) for k in keys}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]
