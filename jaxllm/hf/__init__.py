"""Hugging Face `transformers` format: export (Llama, GPT-2, MPT) and import (Llama, GPT-2,
MPT) of jaxllm models. `mapping` holds the tensor layouts, `convert` the files around them."""

from jaxllm.hf.convert import export_hf, import_hf, load_workdir_config, read_hf
from jaxllm.hf.mapping import family, from_hf, to_hf

__all__ = ["export_hf", "family", "from_hf", "import_hf", "load_workdir_config", "read_hf",
           "to_hf"]
