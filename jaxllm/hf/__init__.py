"""Hugging Face `transformers` format: export and import (Llama, Mistral, Qwen2, GPT-2,
MPT) of jaxllm models. `mapping` holds the layouts and export, `reverse` the import,
`convert` the workdir side, `weights` the safetensors files, `tokenizer` the tokenizer
files and `card` the generation config and model card."""

from jaxllm.hf.convert import export_hf, import_hf, load_workdir_config, read_hf
from jaxllm.hf.mapping import family, to_hf
from jaxllm.hf.reverse import from_hf

__all__ = ["export_hf", "family", "from_hf", "import_hf", "load_workdir_config", "read_hf",
           "to_hf"]
