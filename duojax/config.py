"""Frozen configs: the Llama architecture (read from an HF ``config.json`` dict) and the duo attention layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from duojax.kernels.validation import check_sink_window

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as in HF ``rope_scaling`` (``default``, ``linear`` or ``llama3``)."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope scaling type {self.rope_type!r}; supported: {ROPE_TYPES}")
    if self.factor <= 0:
      raise ValueError(f"rope scaling factor must be > 0; got {self.factor}")

  @classmethod
  def from_hf(cls, d: Mapping[str, Any] | None) -> "RopeScaling":
    if not d:
      return cls()
    rope_type = d.get("rope_type", d.get("type", "default"))
    kw = dict(rope_type=rope_type)
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      if d.get(name) is not None:
        kw[name] = float(d[name])
    if d.get("original_max_position_embeddings") is not None:
      kw["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
    return cls(**kw)

  def to_hf(self) -> dict[str, Any] | None:
    if self.rope_type == "default":
      return None
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-family architecture (Llama 2/3, SmolLM2, Mistral without sliding window)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name} must be a positive int; got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
          f"({self.num_key_value_heads})")

  @property
  def num_groups(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    """Builds the config from an HF ``config.json`` dict (llama / mistral model types)."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
      raise ValueError(f"HF config lacks required keys {missing}")
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
      raise ValueError(f"unsupported model_type {model_type!r}; duojax supports 'llama' and 'mistral'")
    if model_type == "mistral" and d.get("sliding_window"):
      raise ValueError(
          f"Mistral sliding_window={d['sliding_window']} is not supported; use a config with sliding_window null")
    heads = int(d["num_attention_heads"])
    kv = int(d.get("num_key_value_heads") or heads)
    head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
    eos = d.get("eos_token_id")
    eos = () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, Sequence) else (int(eos),))
    return cls(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling.from_hf(d.get("rope_scaling")),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos,
    )

  def to_hf(self) -> dict[str, Any]:
    """An HF-style ``config.json`` dict (``model_type: llama``)."""
    d = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=self.vocab_size,
        hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta, rope_scaling=self.rope_scaling.to_hf(),
        max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
        attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        hidden_act="silu")
    return d


@dataclasses.dataclass(frozen=True)
class DuoSpec:
  """Duo attention layout: which KV heads of each layer are retrieval heads, plus ``sink`` and ``window``.

  ``full[l][h]`` is True when KV head ``h`` of layer ``l`` attends to every previous token (retrieval head);
  the others are streaming heads that see the first ``sink`` tokens and the last ``window`` tokens (their own
  included). After head reordering the retrieval heads come first (``full[l] = (True,)*n + (False,)*rest``);
  a tensor-parallel layout is retrieval-first inside each shard instead. Build with :meth:`from_num_full`.
  """

  full: tuple[tuple[bool, ...], ...]
  sink: int = 128
  window: int = 256

  def __post_init__(self):
    check_sink_window(self.sink, self.window)
    object.__setattr__(self, "full", tuple(tuple(bool(x) for x in row) for row in self.full))

  @classmethod
  def from_num_full(cls, num_full, num_kv_heads: int, sink: int = 128, window: int = 256) -> "DuoSpec":
    """Retrieval-first layout: layer ``l`` has ``num_full[l]`` leading retrieval KV heads."""
    bad = [(l, n) for l, n in enumerate(num_full) if not 0 <= int(n) <= num_kv_heads]
    if bad:
      raise ValueError(
          f"retrieval head counts must lie in [0, {num_kv_heads}] (KV heads per layer); got (layer, count) "
          f"{bad[:4]}")
    return cls(tuple((True,) * int(n) + (False,) * (num_kv_heads - int(n)) for n in num_full), sink, window)

  @classmethod
  def all_full(cls, config: LlamaConfig, sink: int = 128, window: int = 256) -> "DuoSpec":
    return cls.from_num_full((config.num_key_value_heads,) * config.num_hidden_layers,
                             config.num_key_value_heads, sink, window)

  @property
  def num_full(self) -> tuple[int, ...]:
    """Retrieval KV heads per layer."""
    return tuple(sum(row) for row in self.full)

  def validate(self, config: LlamaConfig) -> None:
    """Raises ValueError if this layout does not fit ``config``."""
    shape = (len(self.full), len(self.full[0]) if self.full else 0)
    want = (config.num_hidden_layers, config.num_key_value_heads)
    if shape != want or any(len(row) != want[1] for row in self.full):
      raise ValueError(
          f"duo pattern has shape {shape} (layers, KV heads) but the model has {want}")

  def sparsity_for(self, config: LlamaConfig) -> float:
    """Fraction of streaming KV heads."""
    total = config.num_key_value_heads * config.num_hidden_layers
    return 1.0 - sum(self.num_full) / total
