"""Duo attention kernels: pure-JAX references and Pallas Mosaic-GPU kernels for Hopper."""

from duojax.kernels.hardware import hopper_device_kind, resolve_impl
from duojax.kernels.reference import duo_attention_reference, visible_mask
from duojax.kernels.decode import duo_decode_attention
from duojax.kernels.attention import duo_attention
