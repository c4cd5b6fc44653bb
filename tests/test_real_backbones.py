"""Ultravox composed from transformers parts, and the real backbones' loading path (tiny checkpoints
saved to disk and loaded through exactly the code a 7B checkpoint takes; nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch

from benchbench.backbone import Segment, make_backbone
from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
from benchbench.weights import BackboneWeightsMissing
from benchbench.data import UtteranceInput

LABELS = ["anger", "happiness", "neutral", "sadness"]


def load_pretrained(name, cache_dir=None, **options):
    """A real backbone through the registry, exactly as `bench run --backbone NAME --weights ...` builds it."""
    return make_backbone(name, options, **({"cache_dir": cache_dir} if cache_dir is not None else {}))


def speech(seconds, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 140 * t * (1 + 0.1 * np.sin(3 * t))) + 0.01 * rng.standard_normal(len(t))
    return UtteranceInput(f"u{seconds}", "d", 0, "s", wav.astype(np.float32), sr)


@pytest.fixture(scope="module")
def ultravox():
    from benchbench.backbones.ultravox import tiny_ultravox

    return tiny_ultravox(seed=0)


def test_ultravox_rate_and_stacking(ultravox):
    emb = ultravox.audio_embeddings(speech(1.28))  # 128 mel frames -> 64 encoder frames -> 8 tokens
    assert emb.shape == (8, ultravox.hidden_size)
    assert ultravox.audio_embeddings(speech(1.0)).shape[0] == 7  # 50 frames -> ceil(50 / 8)
    assert ultravox.max_audio_tokens == 25  # a 4 s window at 6.25 tokens per second


def test_ultravox_encoder_equals_whisper_on_a_full_window(ultravox):
    """Over a full window (no padding) our variable-length encoder is transformers' WhisperEncoder."""
    u = speech(4.0)
    feats = ultravox.feature_extractor(u.waveform, sampling_rate=16000, padding="max_length", return_tensors="pt")
    tower = ultravox.model.model.audio_tower
    with torch.no_grad():
        ours = tower(feats.input_features)
        native = tower.whisper(feats.input_features).last_hidden_state
    torch.testing.assert_close(ours, native)


def test_ultravox_projector_is_stack_rmsnorm_swiglu(ultravox):
    proj = ultravox.model.model.multi_modal_projector
    frames = torch.randn(1, 10, 64)
    stacked = torch.cat([frames, torch.zeros(1, 6, 64)], 1).reshape(1, 2, 512)
    x = proj.linear_1(proj.ln_pre(stacked))
    a, gate = x.chunk(2, -1)
    expected = proj.ln_post(proj.linear_2(torch.nn.functional.silu(gate) * a))
    torch.testing.assert_close(proj(frames), expected)


def _save_tiny(bb, path):
    bb.model.save_pretrained(path)
    bb.tokenizer.save_pretrained(path)
    bb.feature_extractor.save_pretrained(path)
    return path


@pytest.mark.parametrize("name,tiny", [("qwen2-audio-7b", "tiny-qwen2-audio"),
                                       ("audio-flamingo-3", "tiny-audio-flamingo-3")])
def test_real_backbone_loads_a_local_checkpoint(name, tiny, tmp_path):
    ref = make_backbone(tiny, seed=3, cache_dir=tmp_path / "c1")
    ckpt = _save_tiny(ref, tmp_path / "ckpt")
    bb = load_pretrained(name, weights=str(ckpt), cache_dir=tmp_path / "c2")
    assert bb.name == name and bb.key == ref.key  # same config and encoder weights -> same cache key
    u = speech(1.2)
    torch.testing.assert_close(bb.audio_embeddings(u), ref.audio_embeddings(u))
    lm = bb.new_lm(LABELS)
    seq, spans = lm.build_sequence([Segment(bb.audio_embeddings(u))])
    assert spans == [(len(lm.text_embeddings(bb.prompt.prefix))
                      + (1 if bb.prompt.audio_bos else 0), spans[0][0] + 30)]
    assert "anger, happiness, neutral, sadness" in lm.instruction
    with torch.no_grad():
        assert lm(lm.collate([(seq, spans)])).shape == (1, 4)
    half = load_pretrained(name, weights=str(ckpt), dtype="bf16", cache_dir=tmp_path / "c3")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.audio_embeddings(u).dtype == torch.float32  # the cache holds float32 on the CPU


def test_ultravox_loads_from_checkpoint_and_its_base_models(ultravox, tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM, WhisperConfig, WhisperModel

    m = ultravox.model  # the UltravoxComposite
    wcfg = WhisperConfig(**{**m.model.audio_tower.whisper.config.to_dict(), "decoder_layers": 1,
                            "decoder_attention_heads": 4, "decoder_ffn_dim": 64})
    whisper = WhisperModel(wcfg)
    whisper.encoder.load_state_dict(m.model.audio_tower.whisper.state_dict())
    whisper.save_pretrained(tmp_path / "whisper")
    ultravox.feature_extractor.save_pretrained(tmp_path / "whisper")
    llama = LlamaForCausalLM(m.config.text_config)
    llama.model.load_state_dict(m.model.language_model.state_dict())
    llama.lm_head.load_state_dict(m.lm_head.state_dict())
    llama.save_pretrained(tmp_path / "llama")
    ckpt = tmp_path / "ultravox"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"stack_factor": 8, "audio_model_id": str(tmp_path / "whisper"),
                                                  "text_model_id": str(tmp_path / "llama")}))
    save_file({f"multi_modal_projector.{k}": v.contiguous()
               for k, v in m.model.multi_modal_projector.state_dict().items()}, str(ckpt / "model.safetensors"))
    ultravox.tokenizer.save_pretrained(ckpt)
    bb = load_pretrained("ultravox-v0.4", weights=str(ckpt), cache_dir=tmp_path / "c")
    u = speech(2.0)
    torch.testing.assert_close(bb.audio_embeddings(u), ultravox.audio_embeddings(u))
    assert bb.prompt.prefix.startswith("<|begin_of_text|>")
    (ckpt / "model.safetensors").unlink()
    save_file({"multi_modal_projector.linear_1.weight": torch.zeros(2, 2)}, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="multi_modal_projector tensors"):
        load_pretrained("ultravox-v0.4", weights=str(ckpt))


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsMissing, match=r"huggingface-cli download Qwen/Qwen2-Audio-7B-Instruct"):
        load_pretrained("qwen2-audio-7b")
    with pytest.raises(BackboneWeightsMissing, match=r"--weights /no/such/dir is not a folder.*"
                                                      r"huggingface-cli download nvidia/audio-flamingo-3-hf"):
        load_pretrained("audio-flamingo-3", weights="/no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneWeightsMissing, match="has no config.json"):
        load_pretrained("ultravox-v0.4", weights=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_pretrained("qwen2-audio-7b", dtype="int8")


def test_cli_reports_missing_weights_and_misplaced_options(tmp_path, capsys):
    from benchbench.cli import main

    common = ["run", "--methods", "lora", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--no-progress"]
    assert main(common + ["--backbone", "qwen2-audio-7b", "--weights", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "a")]) == 2
    assert "huggingface-cli download Qwen/Qwen2-Audio-7B-Instruct" in capsys.readouterr().err
    assert main(common + ["--backbone", "tiny-qwen2-audio", "--weights", "Qwen/x", "--output", str(tmp_path / "b")]) == 2
    assert "apply to the real backbones only" in capsys.readouterr().err


def test_tiny_backbones_keep_their_word_level_prompt():
    bb = tiny_qwen2_audio(seed=0)
    lm = bb.new_lm(LABELS)
    seq, spans = lm.build_sequence([Segment(torch.zeros(3, bb.hidden_size))])
    assert spans == [(1, 4)] and seq.shape[0] == 1 + 3 + 1 + len(lm.text_embeddings(lm.instruction))
