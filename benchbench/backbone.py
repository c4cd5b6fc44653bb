"""Backbone wrapper over transformers' audio LLM classes.

Three things every method needs from an audio LLM, and nothing more:

(a) :meth:`AudioLLMBackbone.audio_embeddings`: the frozen audio encoder + projector turning one
    utterance into audio-token embeddings ``[T, D]`` (T audio tokens, D the LM hidden size), cached
    on disk keyed by backbone config, audio-encoder weights and audio content, so the audio encoder
    runs once per utterance per backbone across a whole benchmark (every method and seed reuses it).
(b) :class:`EmotionLM`: a private copy of the language-model blocks (``.layers``), with each input's
    audio-token positions known (:class:`LMBatch.audio_spans`), for methods that act inside the LM.
(c) :meth:`EmotionLM.forward`: emotion scoring restricted to the label set, i.e. the LM-head logits
    of the label verbalizer tokens at the answer position (the DPM paper's constrained logits,
    Eq. 5-7), never free-text generation and parsing.

The embedded default backbone ``tiny-qwen2-audio`` is ``Qwen2AudioForConditionalGeneration`` built
from a tiny config, seeded, random init: the code path the real Qwen2-Audio-7B takes, no download.
``tests/test_backbone.py`` checks that our cached path (a) + (c) gives the same logits as the
model's own ``forward(input_ids, input_features, feature_attention_mask)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.signal import resample_poly
from torch import nn

from .data import UtteranceInput
from .registry import Registry

log = logging.getLogger(__name__)

AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"

# Prompt templates (whitespace separated so the tiny word-level tokenizer covers them).
INSTRUCTION = "what is the emotion of the current utterance ? answer :"
CONTEXT_HEADER = "previous utterances :"
CURRENT_HEADER = "current utterance :"


def default_cache_dir() -> Path:
    """``$BENCHBENCH_CACHE`` or ``~/.cache/benchbench``."""
    return Path(os.environ.get("BENCHBENCH_CACHE", Path.home() / ".cache" / "benchbench"))


@dataclass(frozen=True)
class PromptFormat:
    """How a backbone's LM input is laid out around the audio segments (text pieces; ``""`` = none).

    ``prefix`` (a chat preamble), then per segment ``context_header`` before the first of several,
    ``current_header`` before the last, ``speaker`` (``{tag}`` filled) when a segment has a speaker
    tag, ``audio_bos`` AUDIO*T ``audio_eos``; then ``instruction`` (``{labels}`` filled with the
    task's labels, comma separated) which ends where the answer starts. A label's verbalizer token is
    the first token of ``verbalizer_prefix + label``.
    """

    audio_bos: str = AUDIO_BOS
    audio_eos: str = AUDIO_EOS
    prefix: str = ""
    instruction: str = INSTRUCTION
    context_header: str = CONTEXT_HEADER
    current_header: str = CURRENT_HEADER
    speaker: str = "{tag} :"
    verbalizer_prefix: str = " "


TINY_PROMPT = PromptFormat()  # the tiny backbones' word-level tokenizer
_CHAT_INSTRUCTION = ("Which emotion does the current utterance express? Answer with one word from: {labels}.")
QWEN_CHAT_PROMPT = PromptFormat(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    instruction="\n" + _CHAT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n",
    context_header="Previous utterances:\n", current_header="\nCurrent utterance:\n", speaker="{tag}: ",
    verbalizer_prefix="")
"""Qwen2-Audio-7B-Instruct's chat format (audio between ``<|audio_bos|>`` / ``<|audio_eos|>``)."""
AF3_PROMPT = replace(QWEN_CHAT_PROMPT, audio_bos="", audio_eos="")
"""Audio Flamingo 3 (a Qwen2.5 LM): the same chat format; its audio tokens have no bos/eos markers."""
LLAMA3_PROMPT = replace(
    AF3_PROMPT, prefix="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    instruction="\n" + _CHAT_INSTRUCTION + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
"""Ultravox v0.4's Llama-3.1-Instruct chat format."""


@dataclass
class Segment:
    """One audio segment of an LM input: audio-token embeddings ``[T, D]`` and an optional speaker tag."""

    audio: torch.Tensor
    speaker_tag: str | None = None


@dataclass
class LMBatch:
    """A right-padded batch for :class:`EmotionLM`.

    Attributes:
        inputs_embeds: ``[B, L, D]`` input embeddings (text tokens + audio-token embeddings).
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for right padding.
        answer_index: ``[B]`` position whose next-token logits score the labels (last real token).
        audio_spans: per item, the ``(start, end)`` token positions of each audio segment in order;
            the last span is the current utterance.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    answer_index: torch.Tensor
    audio_spans: list[list[tuple[int, int]]]

    @property
    def uniform_current_span(self) -> tuple[int, int]:
        """The current utterance's span when it is the same for every item, else ``ValueError``."""
        spans = {s[-1] for s in self.audio_spans}
        if len(spans) != 1:
            raise ValueError(f"batch items have different current-utterance spans: {sorted(spans)}")
        return spans.pop()


class EmotionLM(nn.Module):
    """A copy of the backbone's language model with the label-restricted scoring head.

    ``forward(batch) -> [B, C]`` logits of the C label verbalizer tokens at ``batch.answer_index``.
    All parameters start frozen; methods add and unfreeze their own (LoRA, memory branches).
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, tokenizer, verbalizer_ids: list[int],
                 prompt: PromptFormat = TINY_PROMPT, labels: Sequence[str] = ()):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.instruction = prompt.instruction.format(labels=", ".join(labels))
        self.register_buffer("verbalizer_ids", torch.tensor(verbalizer_ids, dtype=torch.long), persistent=False)
        self.requires_grad_(False)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order (block l's input is the residual stream h before block l)."""
        return self.language_model.layers

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    def text_embeddings(self, text: str) -> torch.Tensor:
        """Token embeddings ``[n_tokens, D]`` of a text piece (cached; the embedding table is frozen)."""
        if text not in self._text_cache:
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            ids = ids.to(self.lm_head.weight.device)
            with torch.no_grad():
                self._text_cache[text] = self.language_model.embed_tokens(ids)
        return self._text_cache[text]

    def build_sequence(self, segments: Sequence[Segment]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Lay out one LM input: ``[L, D]`` embeddings and the ``(start, end)`` span of each segment.

        The backbone's :class:`PromptFormat`; for the tiny backbones, with one segment:
        ``<|audio_bos|> AUDIO*T <|audio_eos|> INSTRUCTION``, and with context segments the earlier
        ones under ``CONTEXT_HEADER`` and the last under ``CURRENT_HEADER``; a segment's speaker tag,
        when given, precedes it.
        """
        fmt = self.prompt
        w = self.lm_head.weight
        pieces: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        pos = 0

        def add(t: torch.Tensor):
            nonlocal pos
            pieces.append(t)
            pos += t.shape[0]

        def text(t: str):
            if t:
                add(self.text_embeddings(t))

        text(fmt.prefix)
        for i, seg in enumerate(segments):
            if len(segments) > 1 and i == 0:
                text(fmt.context_header)
            if len(segments) > 1 and i == len(segments) - 1:
                text(fmt.current_header)
            if seg.speaker_tag is not None:
                text(fmt.speaker.format(tag=seg.speaker_tag))
            text(fmt.audio_bos)
            start = pos
            add(seg.audio.to(device=w.device, dtype=w.dtype))
            spans.append((start, pos))
            text(fmt.audio_eos)
        text(self.instruction)
        return torch.cat(pieces, dim=0), spans

    def collate(self, sequences: Sequence[tuple[torch.Tensor, list[tuple[int, int]]]]) -> LMBatch:
        """Right-pad ``[L_b, D]`` sequences into an :class:`LMBatch`."""
        lengths = [s.shape[0] for s, _ in sequences]
        L, D = max(lengths), sequences[0][0].shape[1]
        embeds = sequences[0][0].new_zeros(len(sequences), L, D)
        mask = torch.zeros(len(sequences), L, dtype=torch.long, device=embeds.device)
        for b, (s, _) in enumerate(sequences):
            embeds[b, : s.shape[0]] = s
            mask[b, : s.shape[0]] = 1
        return LMBatch(embeds, mask, torch.tensor(lengths, device=embeds.device) - 1, [sp for _, sp in sequences])

    def batch(self, segment_lists: Sequence[Sequence[Segment]]) -> LMBatch:
        return self.collate([self.build_sequence(s) for s in segment_lists])

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) hidden states ``[B, L, D]`` of input embeddings ``[B, L, D]`` (mask ``[B, L]``, 1 = real
        token), for methods with their own output heads (e.g. ``dpm``'s unit head). An all-ones mask is
        passed as None so that unpadded batches take the same kernel as a single sequence
        (bit-identical results whatever the batch composition)."""
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).last_hidden_state

    def forward(self, batch: LMBatch) -> torch.Tensor:
        """Label logits ``[B, C]`` (C = number of labels), in verbalizer order."""
        h = self.hidden_states(batch.inputs_embeds, batch.attention_mask)
        # read after the LM has run: a method may move the answer position during the forward (mac)
        h = h[torch.arange(len(batch.answer_index)), batch.answer_index]  # [B, D]
        return nn.functional.linear(h, self.lm_head.weight[self.verbalizer_ids])


class AudioLLMBackbone:
    """A frozen transformers audio LLM, its feature extractor and tokenizer, and the feature cache.

    Args:
        name: registry name (e.g. ``"tiny-qwen2-audio"``).
        model: a ``Qwen2AudioForConditionalGeneration`` (or a class with the same layout:
            ``model.model.audio_tower``, ``.multi_modal_projector``, ``.language_model``, ``model.lm_head``).
        feature_extractor: a ``WhisperFeatureExtractor`` matching the audio tower.
        tokenizer: the LM's tokenizer, with the audio special tokens.
        cache_dir: root of the on-disk feature cache (``None``: :func:`default_cache_dir`).
    """

    def __init__(self, name: str, model: nn.Module, feature_extractor, tokenizer, cache_dir: Path | None = None,
                 prompt: PromptFormat = TINY_PROMPT):
        self.name = name
        self.prompt = prompt
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.key = self._compute_key()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._memory_cache: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0  # audio-encoder forward passes actually run (cache misses)

    # ---------------------------------------------------------------- identity
    def _compute_key(self) -> str:
        """sha256 over the model config, the audio-encoder + projector weights and the feature extractor."""
        h = hashlib.sha256()
        h.update(_config_identity(self.model.config).encode())
        h.update(self.feature_extractor.to_json_string().encode())
        for module in (self.model.model.audio_tower, self.model.model.multi_modal_projector):
            for k, v in sorted(module.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().to(torch.float32).cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def max_audio_seconds(self) -> float:
        return float(self.feature_extractor.chunk_length)

    @property
    def max_audio_tokens(self) -> int:
        """Audio tokens of one full encoder window (``max_audio_seconds``): the most one utterance gets."""
        tower = self.model.model.audio_tower
        _, n = tower._get_feat_extract_output_lengths(torch.tensor([self.feature_extractor.nb_max_frames]))
        return int(n[0])

    # ---------------------------------------------------------------- (a) audio encoding
    def _waveform_16k(self, utt: UtteranceInput) -> np.ndarray:
        wav = np.asarray(utt.waveform, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"utterance {utt.utterance_id}: waveform must be mono [n_samples], got {wav.shape}")
        if utt.sample_rate != self.sample_rate:
            g = np.gcd(int(utt.sample_rate), self.sample_rate)
            wav = resample_poly(wav, self.sample_rate // g, int(utt.sample_rate) // g).astype(np.float32)
        return wav

    def _encode(self, utt: UtteranceInput) -> torch.Tensor:
        """Run the audio tower + projector on one utterance, as the model's own forward does."""
        wav = self._waveform_16k(utt)
        if len(wav) > self.feature_extractor.n_samples:
            log.warning("%s: %.1f s is longer than the backbone's %.0f s window; truncated",
                        utt.utterance_id, utt.duration_s, self.max_audio_seconds)
        feats = self.feature_extractor(wav, sampling_rate=self.sample_rate, return_attention_mask=True,
                                       padding="max_length", return_tensors="pt")
        w = next(self.model.model.audio_tower.parameters())
        features, feat_mask = feats.input_features.to(device=w.device, dtype=w.dtype), feats.attention_mask.to(w.device)
        if hasattr(self.model, "get_audio_features"):  # e.g. Audio Flamingo 3: the model's own audio path
            with torch.no_grad():
                emb = self.model.get_audio_features(features, feat_mask).pooler_output
            self.encoder_calls += 1
            # cached as float32 on the CPU; EmotionLM moves them to its own device and dtype
            return emb.reshape(-1, self.hidden_size).float().cpu().contiguous()
        tower = self.model.model.audio_tower
        feat_len = feats.attention_mask.sum(-1)
        conv_len, n_tokens = tower._get_feat_extract_output_lengths(feat_len)
        max_len = (feats.input_features.shape[-1] - 2) // 2 + 1
        # Padding frames are masked in the encoder's self-attention exactly as
        # Qwen2AudioModel.forward does it (additive -inf bias on padded key positions).
        key_pad = (torch.arange(max_len)[None, :] >= conv_len[:, None]).to(w.device)  # [1, max_len]
        bias = torch.zeros(1, 1, max_len, max_len, dtype=w.dtype, device=w.device)
        bias = bias.masked_fill(key_pad[:, None, None, :], torch.finfo(bias.dtype).min)
        with torch.no_grad():
            hidden = tower(features, attention_mask=bias).last_hidden_state
            emb = self.model.model.multi_modal_projector(hidden)[0, : int(n_tokens[0])]
        self.encoder_calls += 1
        return emb.float().cpu().contiguous()

    def audio_embeddings(self, utt: UtteranceInput) -> torch.Tensor:
        """Audio-token embeddings ``[T, D]`` of one utterance (T = 25 tokens per second of audio).

        Cached in memory and on disk under ``cache_dir/features/<backbone key>/<audio sha256>``.
        Raises ``ValueError`` (naming the utterance) on a non-mono or empty waveform.
        """
        if len(utt.waveform) == 0:
            raise ValueError(f"utterance {utt.utterance_id}: empty waveform")
        key = utt.audio_sha256
        hit = self._memory_cache.get(key)
        if hit is not None:
            return hit
        path = self.cache_dir / "features" / self.key[:16] / key[:2] / f"{key}.safetensors"
        if path.exists():
            try:
                emb = load_file(str(path))["audio_embeddings"]
            except Exception as e:  # a truncated file from a killed run: recompute, don't fail
                log.warning("feature cache file %s unreadable (%s); recomputing", path, e)
                emb = None
        else:
            emb = None
        if emb is None:
            emb = self._encode(utt)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"audio_embeddings": emb}, str(tmp), metadata={"backbone": self.name})
            os.replace(tmp, path)
        self._memory_cache[key] = emb
        return emb

    # ---------------------------------------------------------------- (b) + (c)
    def verbalizer_ids(self, labels: Sequence[str]) -> list[int]:
        """First token id of each label word; ``ValueError`` if two labels share it or one is unknown."""
        ids = []
        for lab in labels:
            toks = self.tokenizer(self.prompt.verbalizer_prefix + lab, add_special_tokens=False).input_ids
            if not toks or toks[0] == self.tokenizer.unk_token_id:
                raise ValueError(f"backbone {self.name}: label {lab!r} has no verbalizer token")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"backbone {self.name}: labels {list(labels)} share verbalizer tokens {ids}")
        return ids

    def new_lm(self, labels: Sequence[str]) -> EmotionLM:
        """A private, frozen copy of the language model + LM head scoring ``labels``."""
        lm = EmotionLM(copy.deepcopy(self.model.model.language_model), copy.deepcopy(self.model.lm_head),
                       self.tokenizer, self.verbalizer_ids(labels), self.prompt, labels)
        return lm.eval()


def _config_identity(config) -> str:
    """The config as JSON without what does not change the network: where it was loaded from, the
    transformers version, the class list save_pretrained adds, and dtype fields (the weights, hashed
    beside it, carry the precision)."""
    skip = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in skip}

    return json.dumps(clean(json.loads(config.to_json_string(use_diff=False))), sort_keys=True)


# ---------------------------------------------------------------------------- registry
BACKBONES: Registry[Callable[..., AudioLLMBackbone]] = Registry("backbone")

LABEL_WORDS = ["anger", "happiness", "neutral", "sadness", "joy", "surprise", "disgust", "fear",
               "boredom", "frustration", "excited", "other"]
PROMPT_WORDS = sorted({w for t in (INSTRUCTION, CONTEXT_HEADER, CURRENT_HEADER) for w in t.split()})
SPEAKER_TAGS = [f"S{i}" for i in range(8)]


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the suite's prompt words, labels and speaker tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]
    words = specials + PROMPT_WORDS + LABEL_WORDS + SPEAKER_TAGS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]})
    return fast


def _tiny_text_config(tokenizer) -> dict:
    """Qwen2, 2 blocks, hidden 64, 4 heads (2 KV): the LM of every tiny backbone."""
    return dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=False)


def _tiny_backbone(name: str, build_model: Callable, seed: int, cache_dir: Path | None) -> AudioLLMBackbone:
    """A tiny backbone: ``build_model(tokenizer)`` under ``seed`` (the caller's RNG untouched), the
    tiny tokenizer and feature extractor."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(tokenizer)
    return AudioLLMBackbone(name, model, _tiny_feature_extractor(), tokenizer, cache_dir=cache_dir)


def _tiny_feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=4, n_fft=400)


@BACKBONES.register("tiny-audio-flamingo-3")
def tiny_audio_flamingo_3(seed: int = 0, cache_dir: Path | None = None) -> AudioLLMBackbone:
    """``AudioFlamingo3ForConditionalGeneration`` from a tiny config, random init under ``seed``.

    Audio tower: AF3's Whisper-style encoder (conv stride 2, then average pooling by 2), 80 mel bins,
    2 layers, d_model 64, a 4 s window, so 25 audio tokens per second as in the real model; its
    2-layer projector; the same tiny Qwen2 LM as ``tiny-qwen2-audio``. Audio features come from the
    model's own ``get_audio_features``.
    """
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    def build(tokenizer):
        config = AudioFlamingo3Config(
            audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=80, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128, hidden_size=64, max_source_positions=200),
            text_config=_tiny_text_config(tokenizer),
            audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        )
        config.text_config._attn_implementation = "sdpa"
        config.audio_config._attn_implementation = "eager"
        return AudioFlamingo3ForConditionalGeneration(config)

    return _tiny_backbone("tiny-audio-flamingo-3", build, seed, cache_dir)


@BACKBONES.register("tiny-qwen2-audio")
def tiny_qwen2_audio(seed: int = 0, cache_dir: Path | None = None) -> AudioLLMBackbone:
    """``Qwen2AudioForConditionalGeneration`` from a tiny config, random init under ``seed``.

    Audio tower: 80 mel bins, 2 layers, d_model 64, a 4 s window (``max_source_positions`` 200,
    i.e. 25 audio tokens per second). Language model: Qwen2, 2 blocks, hidden 64, 4 heads (2 KV).
    """
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    def build(tokenizer):
        config = Qwen2AudioConfig(
            audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=80, encoder_layers=2,
                              encoder_attention_heads=4, encoder_ffn_dim=128, d_model=64,
                              max_source_positions=200),
            text_config=_tiny_text_config(tokenizer),
            audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        )
        config._attn_implementation = "eager"
        config.text_config._attn_implementation = "sdpa"
        config.audio_config._attn_implementation = "eager"
        return Qwen2AudioForConditionalGeneration(config)

    return _tiny_backbone("tiny-qwen2-audio", build, seed, cache_dir)


@BACKBONES.register("tiny-ultravox")
def tiny_ultravox(seed: int = 0, cache_dir: Path | None = None) -> AudioLLMBackbone:
    """Ultravox composed from transformers parts (:mod:`benchbench.ultravox`) at tiny size, random init.

    Whisper encoder (80 mel bins, 2 layers, d_model 64, a 4 s window), the stacking projector
    (stack factor 8: 6.25 audio tokens per second, as the real model), and a 2-block Llama LM
    (hidden 64) over the suite's tiny tokenizer.
    """
    from transformers import LlamaConfig, WhisperConfig

    from .ultravox import UltravoxComposite

    def build(tokenizer):
        wcfg = WhisperConfig(num_mel_bins=80, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                             d_model=64, max_source_positions=200)
        lcfg = LlamaConfig(**{k: v for k, v in _tiny_text_config(tokenizer).items() if k != "model_type"})
        lcfg._attn_implementation = "sdpa"
        return UltravoxComposite(wcfg, lcfg, stack_factor=8)

    return _tiny_backbone("tiny-ultravox", build, seed, cache_dir)


# ---------------------------------------------------------------------------- real backbones
class BackboneWeightsMissing(FileNotFoundError):
    """A real backbone's weights are not on disk (the message says what to download and where)."""


@dataclass(frozen=True)
class PretrainedSpec:
    """A real backbone: its default Hugging Face id, transformers class and prompt format."""

    hub_id: str
    model_class: str | None        # None: composed by benchbench.ultravox
    prompt: PromptFormat
    size: str


PRETRAINED = {
    "qwen2-audio-7b": PretrainedSpec("Qwen/Qwen2-Audio-7B-Instruct", "Qwen2AudioForConditionalGeneration",
                                     QWEN_CHAT_PROMPT, "about 8B parameters, about 17 GB in bf16"),
    "audio-flamingo-3": PretrainedSpec("nvidia/audio-flamingo-3-hf", "AudioFlamingo3ForConditionalGeneration",
                                       AF3_PROMPT, "about 8B parameters, about 17 GB in bf16"),
    "ultravox-v0.4": PretrainedSpec("fixie-ai/ultravox-v0_4", None, LLAMA3_PROMPT,
                                    "Whisper encoder + Llama-3.1-8B-Instruct, about 17 GB in bf16; "
                                    "its config.json names both base checkpoints, which must be on disk too"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_weights(name: str, weights: str | None, allow_download: bool = False) -> Path:
    """A local folder with the backbone's checkpoint: ``weights`` when it is a folder, else the
    Hugging Face cache entry of ``weights`` (a hub id) or of the backbone's default id.

    Raises:
        BackboneWeightsMissing: nothing on disk and downloads not allowed (names the command to run).
    """
    spec = PRETRAINED[name]
    if weights and Path(weights).expanduser().is_dir():
        path = Path(weights).expanduser()
        if not (path / "config.json").is_file():
            raise BackboneWeightsMissing(f"backbone {name}: {path} has no config.json (is it a checkpoint folder "
                                         f"of {spec.hub_id}?)")
        return path
    repo = weights or spec.hub_id
    if weights and ("/" not in weights or weights.startswith((".", "/", "~"))):
        raise BackboneWeightsMissing(f"backbone {name}: --weights {weights} is not a folder. Download the "
                                     f"checkpoint: `huggingface-cli download {spec.hub_id} --local-dir {weights}`")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=not allow_download))
    except Exception as e:
        raise BackboneWeightsMissing(
            f"backbone {name}: weights for {repo} are not on this machine ({type(e).__name__}). Download them "
            f"({spec.size}): `huggingface-cli download {repo} --local-dir DIR` and pass `--weights DIR`, "
            f"or allow the download with `--allow-download`") from None


def load_pretrained(name: str, weights: str | None = None, dtype: str | None = None, device: str | None = None,
                    device_map: str | None = None, allow_download: bool = False, seed: int = 0,
                    cache_dir: Path | None = None) -> AudioLLMBackbone:
    """A real backbone (:data:`PRETRAINED`) from a local checkpoint folder or the Hugging Face cache.

    Args:
        weights: a checkpoint folder or a hub id (default: the backbone's ``hub_id``).
        dtype: ``bf16``, ``fp16`` or ``fp32`` (default: the checkpoint's own).
        device: e.g. ``cuda`` or ``cuda:1``; ``device_map``: passed to ``from_pretrained`` (e.g.
            ``auto`` to spread a model over GPUs). At most one of the two.
        allow_download: let ``huggingface_hub`` download missing files (off by default: runs never
            download silently).
        seed: unused (the weights are fixed); kept so every factory takes the same arguments.

    Raises:
        BackboneWeightsMissing: the checkpoint is not on disk; ``ValueError``: bad dtype or both
        ``device`` and ``device_map``.
    """
    import transformers

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"backbone {name}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if device and device_map:
        raise ValueError(f"backbone {name}: pass --device or --device-map, not both")
    spec = PRETRAINED[name]
    path = resolve_weights(name, weights, allow_download)
    torch_dtype = DTYPES[dtype] if dtype else None
    if spec.model_class is None:  # ultravox-v0.4: composed, never remote code
        from .ultravox import load_ultravox

        model = load_ultravox(path, dtype=torch_dtype, local_files_only=not allow_download)
        cfg = json.loads((path / "config.json").read_text())
        feature_extractor = transformers.WhisperFeatureExtractor.from_pretrained(
            cfg.get("audio_model_id", "openai/whisper-medium"), local_files_only=not allow_download)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    else:
        cls = getattr(transformers, spec.model_class)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        if device_map:
            kwargs["device_map"] = device_map
        model = cls.from_pretrained(path, **kwargs)
        feature_extractor = transformers.AutoFeatureExtractor.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    return AudioLLMBackbone(name, model, feature_extractor, tokenizer, cache_dir=cache_dir, prompt=spec.prompt)


def _register_pretrained(name: str) -> None:
    def factory(seed: int = 0, cache_dir: Path | None = None, **options) -> AudioLLMBackbone:
        return load_pretrained(name, seed=seed, cache_dir=cache_dir, **options)

    spec = PRETRAINED[name]
    factory.__doc__ = f"{name}: {spec.hub_id} ({spec.size}); see :func:`load_pretrained` for the options."
    factory.needs = f"weights {spec.hub_id} ({spec.size}): --weights DIR or the Hugging Face cache"
    factory.pretrained = True
    factory.__qualname__ = f"load_pretrained[{name}]"
    BACKBONES.register(name, factory)


for _name in PRETRAINED:
    _register_pretrained(_name)

BACKBONE_OPTIONS = ("weights", "dtype", "device", "device_map", "allow_download")


def backbone_factory(name: str, options: dict | None = None) -> tuple[Callable[..., AudioLLMBackbone], dict]:
    """The registered factory of ``name`` and the ``options`` (:data:`BACKBONE_OPTIONS`) actually
    given (unset ones dropped), checked without building anything.

    Raises:
        KeyError: unknown backbone; ValueError: options given for a tiny backbone (built from a
        config, no weights to load).
    """
    factory = BACKBONES.get(name)
    options = {k: v for k, v in (options or {}).items() if v not in (None, False)}
    if options and not getattr(factory, "pretrained", False):
        raise ValueError(f"backbone {name} is built from a config (random init); options {sorted(options)} "
                         f"apply to the real backbones only ({', '.join(PRETRAINED)})")
    return factory, options


def make_backbone(name: str, options: dict | None = None, **kwargs) -> AudioLLMBackbone:
    """Build a registered backbone (:func:`backbone_factory` checks ``options``)."""
    factory, options = backbone_factory(name, options)
    return factory(**kwargs, **options)


for _tiny in (tiny_qwen2_audio, tiny_audio_flamingo_3, tiny_ultravox):
    _tiny.needs = "nothing (built from its config class, random init; for tests and CPU runs)"
