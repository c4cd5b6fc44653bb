"""The backbone contract: what every method needs from an audio LLM, and nothing more.

(a) :meth:`AudioLLMBackbone.audio_embeddings`: the frozen audio encoder + projector turning one
    utterance into audio-token embeddings ``[T, D]`` (T audio tokens, D the LM hidden size), cached
    on disk keyed by backbone config, audio-encoder weights and audio content, so the audio encoder
    runs once per utterance per backbone across a whole benchmark (every method and seed reuses it).
(b) :class:`EmotionLM`: a private copy of the language-model blocks (``.layers``), with each input's
    audio-token positions known (:class:`LMBatch.audio_spans`), for methods that act inside the LM.
(c) :meth:`EmotionLM.forward`: emotion scoring restricted to the label set, i.e. the LM-head logits
    of the label verbalizer tokens at the answer position (the DPM paper's constrained logits,
    Eq. 5-7), never free-text generation and parsing.

The backbone families (Qwen2-Audio, Audio Flamingo 3, Ultravox), each with its real loader, its tiny
builder and its chat prompt, live in the ``backbones/`` folder (installed as
``benchbench.backbones``) and register here as :class:`BackboneSpec` entries of :data:`BACKBONES`
(by ``"module:attr"`` string, so the core never imports them; plugins use the entry-point group
``benchbench.backbones``). ``tests/test_backbone.py`` checks that the cached path (a) + (c) gives the
same logits as each model's own forward.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.signal import resample_poly
from torch import nn

from .data import UtteranceInput, default_cache_dir, hash_json
from .names import BACKBONES

log = logging.getLogger(__name__)

AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"

# Prompt templates (whitespace separated so the tiny word-level tokenizer covers them).
INSTRUCTION = "what is the emotion of the current utterance ? answer :"
CONTEXT_HEADER = "previous utterances :"
CURRENT_HEADER = "current utterance :"


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
CHAT_INSTRUCTION = "Which emotion does the current utterance express? Answer with one word from: {labels}."
"""The instruction of the chat backbones' prompts (each family's module builds its PromptFormat)."""


@dataclass
class Segment:
    """One audio segment of an LM input: audio-token embeddings ``[T, D]`` and an optional speaker tag.

    ``features=True``: ``audio`` is the backbone's cached audio features ``[T, F]``
    (:meth:`AudioLLMBackbone.audio_features`) and :meth:`EmotionLM.build_sequence` projects them
    (:meth:`EmotionLM.embed_audio`) when it lays out the input, i.e. inside the training loss, so that
    a projector that trains with the task (``trainable_projector``) gets its gradient. Where the
    projector is frozen the two are the same tensor.
    """

    audio: torch.Tensor
    speaker_tag: str | None = None
    features: bool = False


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


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16}
"""A backbone's mixed-precision modes (``autocast=``): ``off`` computes in the weights' dtype, ``bf16``
runs the LM under ``torch.autocast(dtype=torch.bfloat16)``; ``auto`` (an option value, resolved by
:func:`resolve_autocast` before the backbone is built) picks ``bf16`` where the device computes it natively."""


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as Linux names them (``/proc/cpuinfo``); empty where it cannot
    be read (another OS, a sandbox)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def bf16_kernels(device: str | torch.device = "cpu") -> str:
    """Which bf16 matrix kernels ``device`` runs, as far as they change the bits a bf16 cell computes:
    ``amx`` (a CPU with AMX-BF16: oneDNN's AMX kernels), ``avx512_bf16`` (a CPU with AVX512-BF16 and no
    AMX), ``emulated`` (any other CPU), or ``cuda-sm<major><minor>`` (the GPU's compute capability). Two
    CPUs of different kinds round bf16 products differently, so the same bf16 cell scores differently on
    them (measured: an Intel Xeon with AMX against an AMD EPYC with AVX512-BF16, docs/backbones.md);
    :attr:`AudioLLMBackbone.run_key` holds it for bf16 backbones."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    flags = cpu_flags()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "emulated"


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX-BF16 (oneDNN's own check; elsewhere bf16 on a CPU is emulated and
    slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags()  # Linux names the instruction sets; oneDNN's own check also passes where bf16 is emulated
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_autocast(mode: str, device: str | torch.device | None = None) -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_native` holds for ``device`` (default CPU), else ``off``;
    ``off`` / ``bf16`` as given (``bf16`` forced on any device). ``ValueError`` for another value."""
    if mode == "auto":
        return "bf16" if bf16_native(device or "cpu") else "off"
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast {mode!r}: expected auto, {', '.join(AUTOCAST_DTYPES)}")
    return mode


class EmotionLM(nn.Module):
    """A copy of the backbone's language model with the label-restricted scoring head.

    ``forward(batch) -> [B, C]`` logits of the C label verbalizer tokens at ``batch.answer_index``.
    All parameters start frozen; methods add and unfreeze their own (LoRA, memory branches).
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, tokenizer, verbalizer_ids: list[int],
                 prompt: PromptFormat = TINY_PROMPT, labels: Sequence[str] = (),
                 audio_projector: nn.Module | None = None, autocast: torch.dtype | None = None):
        super().__init__()
        # the backbone's mixed precision (AudioLLMBackbone.autocast): the LM's forward and backward run
        # under torch.autocast in this dtype; None: in the weights' own dtype
        self.autocast = autocast
        self.language_model = language_model
        self.lm_head = lm_head
        # a backbone whose projector trains with the task (AudioLLMBackbone.trainable_projector): this
        # LM's own copy, from the backbone's initial values; frozen until a method's task LoRA takes it
        # (benchbench.training.attach_lora). None: the projector is frozen inside the feature cache.
        self.audio_projector = audio_projector
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

    def embed_audio(self, features: torch.Tensor) -> torch.Tensor:
        """Audio-token embeddings ``[T, D]`` of an utterance's audio features ``[T, F]``
        (:meth:`AudioLLMBackbone.audio_features`): this LM's audio projector applied (with its
        gradient while it trains), or, where the backbone's projector is frozen (inside the feature
        cache, F = D), ``features`` itself, the same tensor.

        Raises:
            ValueError: ``features`` is not ``[T, F]`` with the projector's input width F.
        """
        if self.audio_projector is None:
            return features
        w = self.lm_head.weight
        if features.dim() != 2 or features.shape[-1] != self.audio_projector.in_features:
            raise ValueError(f"audio features of shape {tuple(features.shape)}: the audio projector takes "
                             f"[T, {self.audio_projector.in_features}] (AudioLLMBackbone.audio_features)")
        return self.audio_projector.project(features.to(device=w.device, dtype=w.dtype)[None])[0]

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
            audio = self.embed_audio(seg.audio) if seg.features else seg.audio
            if audio.dim() != 2 or audio.shape[-1] != w.shape[-1]:
                raise ValueError(f"segment {i}: audio of shape {tuple(audio.shape)}, the LM takes [T, {w.shape[-1]}]"
                                 + (" (audio features of a backbone whose projector trains: pass Segment(..., "
                                    "features=True), or ContextMethod.audio_embeddings)"
                                    if self.audio_projector is not None and not seg.features else ""))
            add(audio.to(device=w.device, dtype=w.dtype))
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
        if self.autocast is None:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask,
                                       use_cache=False).last_hidden_state
        with torch.autocast(inputs_embeds.device.type, dtype=self.autocast):
            h = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return h.to(inputs_embeds.dtype)  # [B, L, D] in the weights' dtype, for heads outside the autocast

    def forward(self, batch: LMBatch) -> torch.Tensor:
        """Label logits ``[B, C]`` (C = number of labels), in verbalizer order."""
        h = self.hidden_states(batch.inputs_embeds, batch.attention_mask)
        # read after the LM has run: a method may move the answer position during the forward (mac)
        return self.label_logits(h, batch.answer_index)

    def label_logits(self, h: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
        """Label logits ``[B, C]`` from final hidden states ``h [B, L, D]`` at positions ``answer_index [B]``."""
        h = h[torch.arange(len(answer_index)), answer_index]  # [B, D]
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
        prompt: the LM input layout (:class:`PromptFormat`).
        spare_label_words: for closed word-level vocabularies, words that score labels the
            vocabulary lacks (:meth:`verbalizer_ids`); empty for real tokenizers.
        own_frames: run a Qwen2-Audio / Audio Flamingo 3 tower (Whisper encoder + average pooling) over the
            utterance's own mel frames, positions 0..n-1, instead of the padded window with the
            padding masked (Qwen2-Audio's own forward). The two agree up to the convolutions' view of
            the padding at the clip's end (``tests/test_whisper_weights.py`` states the tolerance);
            the own-frames path costs the clip's length instead of the window's (30 s for a real
            Whisper). Part of the backbone key.
        trainable_projector: the projector is not a frozen part of the audio path but trains with
            each method's task LoRA (a composition whose projector has no trained checkpoint,
            ``ultravox-whisper-tiny-smollm2-135m``): the cache then holds what goes into the projector
            (:meth:`audio_features`, ``[T, F]``, from the model's ``get_projector_inputs``), and every
            :class:`EmotionLM` gets its own copy of the projector (``model.model.multi_modal_projector``,
            which must have ``project(x [B, T, F]) -> [B, T, D]`` and ``in_features``) at its initial
            values. Part of the backbone key.
    """

    def __init__(self, name: str, model: nn.Module, feature_extractor, tokenizer, cache_dir: Path | None = None,
                 prompt: PromptFormat = TINY_PROMPT, spare_label_words: Sequence[str] = (), own_frames: bool = False,
                 trainable_projector: bool = False, autocast: str = "off"):
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"backbone {name}: autocast {autocast!r} (known: {', '.join(AUTOCAST_DTYPES)}; "
                             "resolve 'auto' with resolve_autocast)")
        self.name = name
        self.autocast = autocast
        self.own_frames = own_frames
        self.trainable_projector = trainable_projector
        self.prompt = prompt
        self.spare_label_words = tuple(spare_label_words)
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.key = self._compute_key()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._memory_cache: dict[str, torch.Tensor] = {}
        # outcomes of deterministic trainings on this backbone, reused within the process
        # (benchbench.training.fit_task_lora: a two-stage method's Phase 1 is the lora cell's training)
        self.fit_cache: dict[str, dict] = {}
        self._lm_key: str | None = None  # lm_key, hashed on the first new_lm() (the LM is clean then)
        self._lending: bool = False  # inside lend_lm(): the next new_lm() gets the backbone's own LM
        self._lent: bool = False     # ... and has got it
        self.encoder_calls = 0  # audio-encoder forward passes actually run (cache misses)

    # ---------------------------------------------------------------- identity
    def _compute_key(self) -> str:
        """sha256 over the model config, the audio-encoder + projector weights and the feature extractor."""
        h = hashlib.sha256()
        h.update(_config_identity(self.model.config).encode())
        h.update(self.feature_extractor.to_json_string().encode())
        if self.own_frames:
            h.update(b"own_frames")
        if self.trainable_projector:
            h.update(b"trainable_projector")
        for module in (self.model.model.audio_tower, self.model.model.multi_modal_projector):
            for k, v in sorted(module.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().to(torch.float32).cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def run_key(self) -> str:
        """What a cell computed on this backbone depends on beyond :attr:`key` (the audio features'
        identity, which names the feature cache): the LM's weight dtype and autocast mode (bf16 and
        float32 cells never share a key) and the prompt it reads (a chat template's system prompt is in
        every input). Under bf16 autocast, also the machine's bf16 kernels (:func:`bf16_kernels`): two CPU
        kinds compute other bits for one bf16 cell, so a run resumed on another kind, or Ray over mixed
        machines, recomputes such cells instead of pooling them; float32 cells keep one key everywhere.
        Part of every cell key and Phase-1 training key."""
        parts = {"features": self.key, "lm_dtype": str(self.model.lm_head.weight.dtype),
                 "autocast": self.autocast, "prompt": repr(self.prompt)}
        if self.autocast == "bf16":
            parts["bf16_kernels"] = bf16_kernels(self.model.lm_head.weight.device)
        return hash_json(parts)

    @property
    def lm_key(self) -> str:
        """sha256 over the language model's and LM head's own weights, raw bytes in their dtype (so
        ``--dtype`` counts): with :attr:`key`, the identity a training on this backbone depends on
        (the on-disk Phase-1 cache, :func:`benchbench.training.fit_task_lora`). Hashed once, before the
        first method gets the LM (:meth:`new_lm`), so no adapter is ever part of it; a 7B LM in bf16
        takes seconds."""
        if self._lm_key is None:
            h = hashlib.sha256()
            for module in (self.model.model.language_model, self.model.lm_head):
                for k, v in sorted(module.state_dict().items()):
                    h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
                    h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._lm_key = h.hexdigest()
        return self._lm_key

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
        if self.trainable_projector:  # the projector's input: the projector trains with each method
            with torch.no_grad():
                x = self.model.get_projector_inputs(features, feat_mask).pooler_output
            self.encoder_calls += 1
            return x.reshape(x.shape[-2], x.shape[-1]).float().cpu().contiguous()
        if self.own_frames:
            with torch.no_grad():
                hidden = encode_own_frames(self.model.model.audio_tower, features[:, :, : int(feat_mask.sum())])
                emb = self.model.model.multi_modal_projector(hidden)[0]
            self.encoder_calls += 1
            return emb.float().cpu().contiguous()
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
        """Audio-token embeddings ``[T, D]`` of one utterance (T = 25 tokens per second of audio; 6.25
        for the Ultravox compositions), the frozen audio encoder + projector: :meth:`audio_features`.

        Raises:
            ValueError: a non-mono or empty waveform (naming the utterance).
            TypeError: the backbone's projector trains with each method (:attr:`trainable_projector`):
                there are no fixed embeddings; a method reads them through its own LM
                (:meth:`benchbench.method.ContextMethod.audio_embeddings`).
        """
        if self.trainable_projector:
            raise TypeError(f"backbone {self.name}: its projector trains with each method's task LoRA, so it has "
                            "no fixed audio embeddings: use ContextMethod.audio_embeddings(utterance) (the "
                            "method's LM projects backbone.audio_features(utterance))")
        return self.audio_features(utt)

    def audio_features(self, utt: UtteranceInput) -> torch.Tensor:
        """What the frozen audio path gives for one utterance, ``[T, F]`` float32 on the CPU: the
        audio-token embeddings (F = D, the LM width) for every backbone whose projector is frozen; the
        projector's input (Ultravox: 8 stacked Whisper frames, F = 8 x 384) where it trains with the
        method (:attr:`trainable_projector`; :meth:`EmotionLM.embed_audio` projects them).

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
        """The token id scoring each label: the first token of ``prompt.verbalizer_prefix + label``.

        A backbone with a closed word-level vocabulary (the tiny backbones: random init, no language
        knowledge, so a token's identity carries no meaning) sets ``spare_label_words``: a label
        outside its vocabulary is then scored through the first of those words that is neither in
        the label set nor already taken, in label order. Adding a task with new label words
        therefore never changes the tokenizer, the backbone key, the feature cache or any earlier
        result; the mapping is logged.

        Raises:
            ValueError: a label has no token (and no spare word is left), or two labels share one.
        """
        ids: list[int | None] = []
        for lab in labels:
            toks = self.tokenizer(self.prompt.verbalizer_prefix + lab, add_special_tokens=False).input_ids
            ids.append(None if not toks or toks[0] == self.tokenizer.unk_token_id else toks[0])
        if any(i is None for i in ids) and self.spare_label_words:
            spare = [w for w in self.spare_label_words if w not in labels]
            for k, lab in enumerate(labels):
                while ids[k] is None and spare:
                    word = spare.pop(0)
                    tok = self.tokenizer(self.prompt.verbalizer_prefix + word, add_special_tokens=False).input_ids[0]
                    if tok not in ids:
                        ids[k] = tok
                        log.info("backbone %s: label %r is not in its vocabulary; scored through the spare "
                                 "word %r", self.name, lab, word)
        missing = [lab for lab, i in zip(labels, ids) if i is None]
        if missing:
            spare = f" (its {len(self.spare_label_words)} spare label words are used up)" \
                if self.spare_label_words else ""
            raise ValueError(f"backbone {self.name}: label(s) {missing} have no verbalizer token{spare}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"backbone {self.name}: labels {list(labels)} share verbalizer tokens {ids}")
        return ids

    def new_lm(self, labels: Sequence[str]) -> EmotionLM:
        """The frozen language model + LM head scoring ``labels``, for one method.

        Inside :meth:`lend_lm` (the harness, for every cell) this is the backbone's own LM: the
        method's adapters and hooks go onto the shared frozen modules and are removed when the cell
        ends, so a cell holds the LM once (a 7B LM in bf16: 15 GB instead of 30). Outside it, a
        private deep copy (the same numbers; tests and scripts that keep several methods alive).

        Raises:
            RuntimeError: a second method asks for the LM while it is lent (one method per lease).
        """
        language_model, lm_head = self.model.model.language_model, self.model.lm_head
        _ = self.lm_key  # hashed while no method has touched the LM
        if self._lending:
            if self._lent:
                raise RuntimeError(f"backbone {self.name}: its language model is already lent to a method "
                                   "in this lend_lm() block (one method per lease)")
            self._lent = True
        else:
            language_model, lm_head = copy.deepcopy(language_model), copy.deepcopy(lm_head)
        projector = None
        if self.trainable_projector:  # a private copy at its initial values: trained by the method's task LoRA
            projector = copy.deepcopy(self.model.model.multi_modal_projector).requires_grad_(False)
        lm = EmotionLM(language_model, lm_head, self.tokenizer, self.verbalizer_ids(labels), self.prompt, labels,
                       audio_projector=projector, autocast=AUTOCAST_DTYPES[self.autocast])
        return lm.eval()

    @contextmanager
    def lend_lm(self):
        """Within the block, :meth:`new_lm` hands out the backbone's own (frozen) LM instead of a copy;
        at its end, whatever the method did to the modules is undone (:class:`ModuleRestorer`:
        modules it replaced, e.g. peft's LoRA layers, put back; hooks it registered removed;
        ``requires_grad`` and train/eval flags restored), also when the block raises."""
        restorer = ModuleRestorer(self.model.model.language_model, self.model.lm_head)
        self._lending, self._lent = True, False
        try:
            yield
        finally:
            self._lending = self._lent = False
            restorer.restore()


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class ModuleRestorer:
    """A record of module trees (every submodule's children, hooks, attribute names, ``training`` flag
    and every parameter's ``requires_grad``) that :meth:`restore` puts back: children replaced since
    (peft wraps each target ``nn.Linear`` in a LoRA layer in place) get their original module again,
    hooks registered and attributes added since (peft's ``peft_config``) are removed, flags are reset. Parameter values are not recorded: adapters live
    in the modules they add, and the backbone's own weights are frozen."""

    def __init__(self, *roots: nn.Module):
        self._modules = [(m, dict(m._modules), {a: set(getattr(m, a, {})) for a in _HOOK_DICTS}, m.training,
                          set(vars(m))) for root in roots for m in root.modules()]
        self._params = [(p, p.requires_grad) for root in roots for p in root.parameters()]

    def restore(self) -> None:
        for m, children, hooks, training, attributes in self._modules:
            for k in set(vars(m)) - attributes:  # e.g. the peft_config peft copies onto the model
                delattr(m, k)
            if dict(m._modules) != children:
                m._modules.clear()
                m._modules.update(children)
            for attr, keys in hooks.items():
                d = getattr(m, attr, None)
                for k in [k for k in (d or {}) if k not in keys]:
                    del d[k]
            m.training = training
        for p, requires_grad in self._params:
            p.requires_grad_(requires_grad)


def encode_own_frames(tower: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A Qwen2-Audio-style audio tower (``Qwen2AudioEncoder``, ``AudioFlamingo3Encoder``: Whisper conv1/conv2 with GELU, sinusoid-
    trained positions, encoder layers, then ``AvgPool1d(2)`` and the final LayerNorm) over one
    utterance's own mel frames ``[1, n_mels, F]`` (F frames of 10 ms), with positions ``0..F/2-1``:
    hidden states ``[1, T, d_model]``, T = ``tower._get_feat_extract_output_lengths(F)[1]`` (25 per
    second). ``ValueError`` when the clip needs more positions than the tower has."""
    x = nn.functional.gelu(tower.conv1(features))
    x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)                       # [1, F/2, d]
    if x.shape[1] > tower.embed_positions.weight.shape[0]:
        raise ValueError(f"audio of {x.shape[1]} encoder positions is longer than the tower's "
                         f"{tower.embed_positions.weight.shape[0]}")
    x = x + tower.embed_positions.weight[: x.shape[1]]
    for layer in tower.layers:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
    return tower.layer_norm(x)


def _config_identity(config) -> str:
    """The config as JSON without what does not change the network: where it was loaded from, the
    transformers version, the class list save_pretrained adds, and dtype fields (the weights, hashed
    beside it, carry the precision)."""
    skip = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in skip}

    return json.dumps(clean(json.loads(config.to_json_string(use_diff=False))), sort_keys=True)




# ---------------------------------------------------------------------------- registry
SPEAKER_TAGS = tuple(f"S{i}" for i in range(8))
"""Speaker tags of multi-segment inputs (``full_context``): S0, S1, ... in order of appearance."""


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it and what it needs (``bench list backbones``).

    Attributes:
        name: the name users type (``--backbone``).
        build: ``build(seed=0, cache_dir=None, **options) -> AudioLLMBackbone``.
        needs: what must be on disk, in words.
        options: the keyword options ``build`` accepts beyond seed and cache_dir (the real
            backbones: :data:`benchbench.weights.PRETRAINED_OPTIONS`); any other is refused up front.
        hub_id: the default Hugging Face checkpoint of a real backbone (``None``: built from a config).
        size: parameters and memory, in words (real backbones).
        check_options: ``check_options(options)`` raises ``ValueError`` for a bad option value before
            anything is built (e.g. the tiny LM sizes, :func:`benchbench.backbones.tiny.check_lm_size`).
        note: what every result on this backbone must carry (a departure from how the family is
            trained, ...): printed when a run starts, shown by ``bench list backbones`` and under the
            backbone's sections of the leaderboard (:func:`backbone_note`).
        random_init_model: a real backbone's ``model_fn(arch, lm, audio, tokenizer)``: its model class
            at given sizes with random weights (``--random-init``,
            :mod:`benchbench.backbones.paper_scale`); ``None`` where the backbone has none.
        lora_presets: preset -> task-LoRA values (:class:`~benchbench.training.LoRASettings` keys) that
            this backbone takes where the methods' presets, set on the random tiny LMs, do not fit (a
            pretrained LM's lower rate); every method's task LoRA takes them alike (``lora`` and every
            Phase 1: :attr:`benchbench.cells.Cell.backbone_overrides`), so the comparison keeps one
            budget; the backbone in the results names them, a user's ``--set`` still wins.
    """

    name: str
    build: Callable[..., AudioLLMBackbone]
    needs: str
    options: tuple[str, ...] = ()
    hub_id: str | None = None
    size: str = ""
    check_options: Callable[[dict], None] | None = None
    note: str = ""
    random_init_model: Callable | None = None
    lora_presets: dict = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        """Whether the backbone loads a checkpoint (``False``: a tiny backbone built from its config)."""
        return self.hub_id is not None




def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` registered as ``name`` (``KeyError`` listing known names; ``TypeError``
    naming where it comes from when a plugin registered something else)."""
    spec = BACKBONES.get(name)
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"backbone {name!r} from {BACKBONES.origin(name)} is a {type(spec).__name__}, "
                        "not a benchbench.backbone.BackboneSpec")
    return spec


def backbone_factory(name: str, options: dict | None = None) -> tuple[BackboneSpec, dict]:
    """The spec of ``name`` and the ``options`` actually given (unset ones dropped), checked
    without building anything.

    Raises:
        KeyError: unknown backbone; ValueError: an option the backbone does not take (e.g.
        ``--weights`` for a tiny backbone, built from a config with no weights to load).
    """
    spec = backbone_spec(name)
    options = {k: v for k, v in (options or {}).items() if v is not None and v is not False}
    bad = sorted(set(options) - set(spec.options))
    if bad:
        from .weights import PRETRAINED_OPTIONS

        if not spec.pretrained and set(bad) <= set(PRETRAINED_OPTIONS):
            raise ValueError(f"backbone {name} is built from a config (random init); options {bad} apply to "
                             f"the real backbones only "
                             f"({', '.join(n for n in BACKBONES.names() if _is_pretrained(n))})")
        raise ValueError(f"backbone {name}: unknown option(s) {bad} (known: {list(spec.options)})")
    if spec.check_options is not None:
        spec.check_options(options)
    return spec, options


def backbone_label(name: str, options: dict | None = None, autocast: str | None = None) -> str:
    """What results call a backbone: its name, plus the options that change the network itself
    (``tiny-qwen2-audio+hidden_size=1024``; a flag set to True by its name alone:
    ``qwen2-audio-7b+lm_layers=2+random_init``), so the leaderboard never pools different networks. Load
    options (:data:`benchbench.weights.PRETRAINED_OPTIONS`: weights, dtype, device, ...) are not part of
    it; the *resolved* mixed precision of the built backbone (``autocast``: :attr:`AudioLLMBackbone.autocast`)
    is, when it is not ``off`` (``ultravox-whisper-tiny-smollm2-135m+autocast=bf16``), whatever option chose it,
    so bf16 and float32 cells never share a label."""
    from .weights import PRETRAINED_OPTIONS

    load = PRETRAINED_OPTIONS + ("autocast",)  # the autocast mode is in the backbone key and the results' lm_autocast
    shape = {k: v for k, v in (options or {}).items() if k not in load and v is not None and v is not False}
    if autocast not in (None, "off"):
        shape["autocast"] = autocast
    return name + "".join(f"+{k}" if v is True else f"+{k}={v}" for k, v in sorted(shape.items()))


def _is_pretrained(name: str) -> bool:
    try:
        return backbone_spec(name).pretrained
    except Exception:  # noqa: BLE001 - a broken plugin is not listed here
        return False


def make_backbone(name: str, options: dict | None = None, **kwargs) -> AudioLLMBackbone:
    """Build a registered backbone (:func:`backbone_factory` checks ``options``); ``kwargs``:
    ``seed`` and ``cache_dir``."""
    spec, options = backbone_factory(name, options)
    return spec.build(**kwargs, **options)
