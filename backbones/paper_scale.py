"""The papers' backbones as architectures with random weights (``--random-init``): cost without a download.

What a method costs at the papers' width (trained parameters, GPU memory, seconds per epoch, milliseconds
per utterance) depends on the architecture, not on the weights. ``bench run --backbone qwen2-audio-7b
--random-init`` builds the real model class at its published sizes, random init under the seed, directly on
``--device`` in ``--dtype`` (no float32 copy on the CPU first), with the suite's word-level tokenizer (the
model keeps the real vocabulary size, so the embedding and the LM head cost what they cost). Its
accuracy means nothing; its cells are labelled ``qwen2-audio-7b+random_init`` (and every size override,
e.g. ``+lm_layers=2``) so they never pool with a real checkpoint's. A user can smoke-test a cluster with it
before downloading 17 GB; ``python -m benchbench.tools.paper_scale`` measures every method with it.

The published values (:data:`ARCHITECTURES`), each checked against the checkpoint's own files:

* ``qwen2-audio-7b`` - ``Qwen/Qwen2-Audio-7B-Instruct`` ``config.json``: audio tower d_model 1280, 32
  layers, 20 heads, FFN 5120, 128 mel bins, 1500 positions (30 s); ``text_config`` sets only
  intermediate_size 11008, max_position_embeddings 8192, vocab_size 156032, rope_theta 10000,
  rms_norm_eps 1e-5, so the rest are ``Qwen2Config``'s defaults: 4096 wide, 32 blocks, 32 heads, 32 KV
  heads (a Qwen-7B-shaped LM, *not* Qwen2-7B's 3584 x 28 with 4 KV heads); ``preprocessor_config.json``:
  128 mel bins, a 30 s window.
* ``audio-flamingo-3`` - ``nvidia/audio-flamingo-3-hf`` (transformers' ``convert_audioflamingo3_to_hf.py``
  writes its text config; the encoder is ``AudioFlamingo3EncoderConfig``'s defaults): Qwen2.5-7B LM 3584
  wide, 28 blocks, 28 heads / 4 KV heads, FFN 18944, vocabulary 151672, rope_theta 1e6; Whisper
  large-v3-sized encoder 1280 wide, 32 layers, 20 heads, FFN 5120, 128 mel bins; 2-layer GELU projector.
* ``ultravox-v0.4`` - ``fixie-ai/ultravox-v0_4`` ``config.json`` names ``openai/whisper-medium`` (encoder
  1024 wide, 24 layers, 16 heads, FFN 4096, 80 mel bins) and ``meta-llama/Meta-Llama-3.1-8B-Instruct``
  (4096 wide, 32 blocks, 32 heads / 8 KV heads, FFN 14336, vocabulary 128256, rope_theta 5e5 with
  Llama-3 rope scaling); stack factor 8, projector hidden 4096 (SwiGLU).

Size overrides (:data:`SIZE_OPTIONS`, ``--backbone-set lm_layers=2``) exist for CPU tests at reduced
depth and width; every one is part of the backbone's label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchbench.backbone import AudioLLMBackbone

SIZE_OPTIONS = ("lm_layers", "lm_width", "lm_heads", "lm_kv_heads", "lm_ffn", "vocab_size",
                "audio_layers", "audio_width", "audio_heads", "audio_ffn")
"""``--backbone-set`` keys that shrink a ``--random-init`` architecture (the LM's blocks, width, heads, KV
heads, FFN width and vocabulary; the audio encoder's layers, width, heads and FFN width)."""

RANDOM_INIT_OPTIONS = ("random_init",) + SIZE_OPTIONS
"""The options a real backbone takes beyond :data:`benchbench.weights.PRETRAINED_OPTIONS`."""


@dataclass(frozen=True)
class Architecture:
    """A paper backbone's published sizes (the values its checkpoint's config files give).

    ``lm`` holds the text config's values under the transformers key names; ``audio`` the encoder's
    (layers, width, heads, ffn, mel_bins, positions: ``positions / 50`` seconds of audio); ``source``
    names the files the values come from."""

    name: str
    lm: dict
    audio: dict
    source: str
    extra: dict = field(default_factory=dict)

    def sizes(self, overrides: dict) -> tuple[dict, dict]:
        """``(lm, audio)`` with ``overrides`` (:data:`SIZE_OPTIONS` keys) applied."""
        lm, audio = dict(self.lm), dict(self.audio)
        for key, target, name in (("lm_layers", lm, "num_hidden_layers"), ("lm_width", lm, "hidden_size"),
                                  ("lm_heads", lm, "num_attention_heads"), ("lm_kv_heads", lm, "num_key_value_heads"),
                                  ("lm_ffn", lm, "intermediate_size"), ("vocab_size", lm, "vocab_size"),
                                  ("audio_layers", audio, "layers"), ("audio_width", audio, "width"),
                                  ("audio_heads", audio, "heads"), ("audio_ffn", audio, "ffn")):
            if key in overrides:
                target[name] = overrides[key]
        return lm, audio


QWEN2_AUDIO_7B = Architecture(
    "qwen2-audio-7b",
    lm=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008, vocab_size=156032, max_position_embeddings=8192, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False),
    audio=dict(width=1280, layers=32, heads=20, ffn=5120, mel_bins=128, positions=1500),
    source="Qwen/Qwen2-Audio-7B-Instruct config.json (text_config: intermediate_size, max_position_embeddings, "
           "vocab_size, rope_theta, rms_norm_eps; the rest Qwen2Config's defaults) and preprocessor_config.json")
AUDIO_FLAMINGO_3 = Architecture(
    "audio-flamingo-3",
    lm=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
            intermediate_size=18944, vocab_size=151672, max_position_embeddings=32768, rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False),
    audio=dict(width=1280, layers=32, heads=20, ffn=5120, mel_bins=128, positions=1500),
    source="nvidia/audio-flamingo-3-hf: text config as transformers' convert_audioflamingo3_to_hf.py writes it "
           "(Qwen2.5-7B), encoder AudioFlamingo3EncoderConfig's defaults (Whisper large-v3 sized)")
ULTRAVOX_V0_4 = Architecture(
    "ultravox-v0.4",
    lm=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)),
    audio=dict(width=1024, layers=24, heads=16, ffn=4096, mel_bins=80, positions=1500),
    source="fixie-ai/ultravox-v0_4 config.json (stack_factor 8, projector hidden 4096) and the checkpoints it "
           "names: openai/whisper-medium (encoder) and meta-llama/Meta-Llama-3.1-8B-Instruct (LM)",
    extra=dict(stack_factor=8, projector_hidden=4096))

ARCHITECTURES = {a.name: a for a in (QWEN2_AUDIO_7B, AUDIO_FLAMINGO_3, ULTRAVOX_V0_4)}


def check_random_init_options(name: str, options: dict) -> None:
    """``ValueError`` naming the backbone and the option for: a size override without ``random_init``;
    ``random_init`` with ``weights``, ``device_map`` or ``allow_download`` (nothing is loaded); a size
    that is not a positive integer, or heads that do not divide the width (or KV heads the heads)."""
    sizes = {k: options[k] for k in SIZE_OPTIONS if k in options}
    if not options.get("random_init"):
        if sizes:
            raise ValueError(f"backbone {name}: --backbone-set {', '.join(sorted(sizes))} apply to --random-init only "
                             "(a checkpoint's sizes are its own)")
        return
    for k in ("weights", "device_map", "allow_download"):
        if options.get(k):
            raise ValueError(f"backbone {name}: --random-init builds the architecture with random weights; "
                             f"--{k.replace('_', '-')} does not apply")
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"backbone {name}: --backbone-set {k}={v!r}: expected a positive integer")
    lm, audio = ARCHITECTURES[name].sizes(sizes)
    if lm["hidden_size"] % lm["num_attention_heads"] or lm["num_attention_heads"] % lm["num_key_value_heads"]:
        raise ValueError(f"backbone {name}: LM width {lm['hidden_size']}, {lm['num_attention_heads']} heads, "
                         f"{lm['num_key_value_heads']} KV heads: the heads must divide the width and the KV heads "
                         "the heads")
    if audio["width"] % audio["heads"]:
        raise ValueError(f"backbone {name}: audio width {audio['width']} is not a multiple of its {audio['heads']} heads")


ModelFn = Callable[[Architecture, dict, dict, object], "torch.nn.Module"]
"""``model_fn(arch, lm, audio, tokenizer)``: a family's model class at the sizes ``lm`` / ``audio``
(:meth:`Architecture.sizes`), random init (each family module's ``random_init_model``, also
:attr:`benchbench.backbone.BackboneSpec.random_init_model`)."""


def build_model(name: str, model_fn: ModelFn, tokenizer, overrides: dict | None = None, seed: int = 0,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """``model_fn``'s model of backbone ``name`` at :data:`ARCHITECTURES`' sizes (with ``overrides``),
    random init under ``seed``, allocated and initialised on ``device`` (default CPU; ``"meta"``: shapes
    only) in ``dtype`` (default float32); the caller's RNG untouched. The same seed gives the same
    weights on the same kind of device and dtype.

    Raises:
        KeyError: ``name`` has no published architecture here.
    """
    arch = ARCHITECTURES[name]
    lm, audio = arch.sizes(overrides or {})
    from benchbench.training import seeded_rng

    dev = torch.device(device or "cpu")
    old = torch.get_default_dtype()
    with seeded_rng(seed):
        torch.set_default_dtype(dtype or torch.float32)
        try:
            with dev:
                model = model_fn(arch, lm, audio, tokenizer)
        finally:
            torch.set_default_dtype(old)
    return model


def random_init_backbone(name: str, model_fn: ModelFn, seed: int = 0, cache_dir: Path | None = None,
                         dtype: str | None = None, device: str | None = None, **overrides) -> AudioLLMBackbone:
    """Backbone ``name`` (``qwen2-audio-7b``, ``audio-flamingo-3``, ``ultravox-v0.4``) as its architecture with
    random weights (:func:`build_model` with its family's ``model_fn``), the tiny word-level tokenizer with the spare label words, the
    prompt layout of the tiny backbones (a word-level vocabulary has no chat tokens: the real chat
    template's ~20 extra text tokens are not counted), and a Whisper feature extractor with the model's
    mel bins over a 30 s window (Qwen2-Audio and AF3 pad every utterance to it, as the real processors do;
    Ultravox's encoder runs over the utterance's own frames).

    Raises:
        ValueError: a bad dtype or size override (:func:`check_random_init_options`).
    """
    from transformers import WhisperFeatureExtractor

    from benchbench.weights import check_load_options

    from .tiny import LABEL_WORDS, tiny_tokenizer

    check_random_init_options(name, {"random_init": True, **overrides})
    torch_dtype = check_load_options(name, dtype, device, None)
    tokenizer = tiny_tokenizer()
    vocab = ARCHITECTURES[name].sizes(overrides)[0]["vocab_size"]
    if vocab < len(tokenizer):
        raise ValueError(f"backbone {name}: --backbone-set vocab_size={vocab} is below the tokenizer's {len(tokenizer)} "
                         "tokens")
    model = build_model(name, model_fn, tokenizer, overrides, seed=seed, dtype=torch_dtype, device=device)
    mel = ARCHITECTURES[name].sizes(overrides)[1]["mel_bins"]
    fe = WhisperFeatureExtractor(feature_size=mel, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    return AudioLLMBackbone(name, model, fe, tokenizer, cache_dir=cache_dir, spare_label_words=LABEL_WORDS)


def parameter_count(name: str, overrides: dict | None = None) -> dict[str, int]:
    """Parameters of the architecture by part (``audio_tower``, ``projector``, ``language_model`` with its
    LM head, ``total``), counted on the meta device (nothing allocated): the figure to compare with the
    checkpoint's published size."""
    from benchbench.backbone import backbone_spec

    from .tiny import tiny_tokenizer

    model = build_model(name, backbone_spec(name).random_init_model, tiny_tokenizer(), overrides, device="meta")
    parts = {"audio_tower": model.model.audio_tower, "projector": model.model.multi_modal_projector}
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    out["total"] = sum(p.numel() for p in model.parameters())
    out["language_model"] = out["total"] - out["audio_tower"] - out["projector"]
    return out
