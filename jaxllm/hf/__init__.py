"""Hugging Face `transformers` format: export (Llama, GPT-2, MPT) and import (Llama, GPT-2,
MPT) of jaxllm models. `mapping` holds the layouts and export, `reverse` the import,
`convert` the files around them (checkpoints, safetensors, tokenizers, workdirs)."""

from jaxllm.hf.convert import export_hf, import_hf, read_hf
from jaxllm.hf.mapping import family, to_hf
from jaxllm.hf.reverse import from_hf

__all__ = ["export_hf", "family", "from_hf", "import_hf", "read_hf", "to_hf"]
