"""Tokenizers without transformers: from GGUF metadata (byte-level BPE) or an HF ``tokenizer.json``.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` and behaves like HF's ``tok(text).input_ids``: special tokens
written in the text (``<|im_start|>``) become their ids, and a BOS id is prepended only when the model asks for it
(GGUF ``tokenizer.ggml.add_bos_token``; the post-processor of a ``tokenizer.json``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Byte-level BPE pre-tokenizer flavours (``tokenizer.ggml.pre``) that match the GPT-2 regex of HF ByteLevel.
_GPT2_STYLE_PRE = {"default", "gpt2", "smollm", "starcoder", "refact", "gpt-2", "jina-es", "jina-de", "olmo"}


class Tokenizer:
  """Encodes text to ids and back; knows the model's BOS/EOS ids and a minimal ChatML chat template."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
               eos_token_ids: Sequence[int] = (), chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.bos_token_id = bos_token_id
    self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
    self.chat_template = chat_template

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_token_id(self) -> int | None:
    return self.eos_token_ids[0] if self.eos_token_ids else None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of ``text`` as HF's ``tok(text).input_ids``."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                          tokenize: bool = False):
    """Renders ``messages`` (``{"role", "content"}``) in ChatML (``<|im_start|>role\\n...<|im_end|>\\n``).

    Only ChatML templates are supported (SmolLM2's); a default system prompt in the template is honoured.
    """
    template = self.chat_template or ""
    if "<|im_start|>" not in template:
      raise ValueError("apply_chat_template supports ChatML templates (<|im_start|>) only; this tokenizer has "
                       + ("none" if not template else "another format"))
    default_system = _default_system_prompt(template)
    parts = []
    if messages and default_system is not None and messages[0]["role"] != "system":
      parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
      parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
      parts.append("<|im_start|>assistant\n")
    text = "".join(parts)
    return self.encode(text) if tokenize else text

  def __call__(self, text: str) -> list[int]:
    return self.encode(text)


def _default_system_prompt(template: str) -> str | None:
  m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
  if m and "messages[0]['role'] != 'system'" in template.replace('"', "'"):
    return m.group(1)
  return None


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def tokenizer_from_gguf(reader, path: str = "<gguf>") -> Tokenizer:
  """A :class:`Tokenizer` from the ``tokenizer.ggml.*`` metadata of an open ``gguf.GGUFReader``."""
  model = _field(reader, "tokenizer.ggml.model")
  if model is None:
    raise ValueError(f"GGUF file {path} has no tokenizer (tokenizer.ggml.model missing)")
  if model != "gpt2":
    raise ValueError(f"GGUF file {path}: tokenizer model {model!r} is not supported; supported: 'gpt2' "
                     "(byte-level BPE)")
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _GPT2_STYLE_PRE:
    raise ValueError(f"GGUF file {path}: pre-tokenizer {pre!r} is not supported; supported: "
                     f"{sorted(_GPT2_STYLE_PRE)}")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
  vocab = {t: i for i, t in enumerate(tokens)}
  bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  specials = [AddedToken(tokens[i], special=True, normalized=False)
              for i, t in enumerate(types) if t == _CONTROL]
  user = [AddedToken(tokens[i], special=False, normalized=False)
          for i, t in enumerate(types) if t == _USER_DEFINED]
  if specials:
    tok.add_special_tokens(specials)
  if user:
    tok.add_tokens(user)
  bos = _field(reader, "tokenizer.ggml.bos_token_id")
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  eot = _field(reader, "tokenizer.ggml.eot_token_id")
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
  if add_bos and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], int(bos))])
  eos_ids = [int(i) for i in (eos, eot) if i is not None]
  return Tokenizer(tok, bos_token_id=None if bos is None else int(bos), eos_token_ids=list(dict.fromkeys(eos_ids)),
                   chat_template=_field(reader, "tokenizer.chat_template"))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A :class:`Tokenizer` from an HF tokenizer directory (``tokenizer.json`` + optional config files)."""
  path = os.fspath(path)
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no tokenizer.json in {path!r}")
  tok = tokenizers.Tokenizer.from_file(file)
  cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
  model_cfg = _read_json(os.path.join(path, "config.json"))
  gen_cfg = _read_json(os.path.join(path, "generation_config.json"))

  def token_id(value: Any) -> int | None:
    if isinstance(value, dict):
      value = value.get("content")
    return None if value is None else tok.token_to_id(value)

  bos = model_cfg.get("bos_token_id", token_id(cfg.get("bos_token")))
  eos: Any = gen_cfg.get("eos_token_id", model_cfg.get("eos_token_id"))
  if eos is None:
    eos = token_id(cfg.get("eos_token"))
  eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
  template = cfg.get("chat_template")
  jinja = os.path.join(path, "chat_template.jinja")
  if template is None and os.path.isfile(jinja):
    with open(jinja) as f:
      template = f.read()
  return Tokenizer(tok, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template)


def _read_json(file: str) -> dict:
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    return json.load(f)
