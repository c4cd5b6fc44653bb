"""The papers' backbones as random-init architectures (``--random-init``) and the paper-scale script.

The full sizes are checked on the meta device (shapes only: the parameter counts against the published
ones); every method runs on each architecture at reduced depth and width on the CPU, through the same
script the GPU run uses (``python -m benchbench.tools.paper_scale``)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from benchbench.backbone import backbone_factory, backbone_label, make_backbone
from benchbench.backbones.paper_scale import ARCHITECTURES, parameter_count
from benchbench.data import UtteranceInput

from .conftest import EMODB_DIR

REDUCED = dict(lm_layers=2, lm_width=128, lm_heads=2, lm_kv_heads=2, lm_ffn=256, vocab_size=1024, audio_layers=1,
               audio_width=64, audio_heads=2, audio_ffn=128)
"""A CPU-sized architecture of each family: every code path, a fraction of the arithmetic."""


def test_full_size_parameter_counts_match_the_published_models():
    """Built on the meta device at the published sizes: Qwen2-Audio-7B-Instruct is 8.40B parameters (its
    model card: 8.4B), its audio tower a Whisper large-v3 encoder (0.64B); Ultravox v0.4's LM is exactly
    Llama-3.1-8B's 8,030,261,248 and its encoder Whisper medium's (0.31B); AF3's LM is Qwen2.5-7B's width."""
    qwen = parameter_count("qwen2-audio-7b")
    assert round(qwen["total"] / 1e9, 1) == 8.4
    assert round(qwen["audio_tower"] / 1e9, 2) == 0.64
    uv = parameter_count("ultravox-v0.4")
    assert uv["language_model"] == 8_030_261_248
    assert round(uv["audio_tower"] / 1e9, 2) == 0.31
    af3 = parameter_count("audio-flamingo-3")
    assert round(af3["total"] / 1e9, 2) == 8.27
    assert af3["audio_tower"] == qwen["audio_tower"]  # the same Whisper large-v3-sized encoder


def test_the_qwen2_audio_lm_is_the_checkpoints_not_qwen2_7b():
    """Qwen2-Audio-7B's text_config names only a few values; the rest are Qwen2Config's defaults
    (4096 wide, 32 blocks, 32 heads and 32 KV heads), not Qwen2-7B's 3584 x 28 with 4 KV heads."""
    from transformers import Qwen2Config

    d = Qwen2Config()
    lm = ARCHITECTURES["qwen2-audio-7b"].lm
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"], lm["num_key_value_heads"]) == \
        (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads) == (4096, 32, 32, 32)


@pytest.mark.parametrize("name,mel,width", [("qwen2-audio-7b", 128, 128), ("audio-flamingo-3", 128, 128),
                                            ("ultravox-v0.4", 80, 128)])
def test_random_init_builds_the_real_class_at_reduced_size(name, mel, width, tmp_path):
    bb = make_backbone(name, {"random_init": True, **REDUCED}, cache_dir=tmp_path)
    assert bb.hidden_size == width and bb.feature_extractor.feature_size == mel
    assert bb.model.config.text_config.vocab_size == 1024  # the real size unless overridden, never the tokenizer's
    t = np.arange(16000) / 16000
    utt = UtteranceInput("u", "d", 0, "s", (0.3 * np.sin(2 * np.pi * 140 * t)).astype(np.float32), 16000)
    feats = bb.audio_features(utt)
    assert feats.shape[1] == width and feats.shape[0] == (25 if name != "ultravox-v0.4" else 7)  # 1 s of audio
    # the same seed gives the same weights; another seed others
    again = make_backbone(name, {"random_init": True, **REDUCED}, cache_dir=tmp_path)
    other = make_backbone(name, {"random_init": True, **REDUCED}, cache_dir=tmp_path, seed=1)
    assert bb.key == again.key != other.key


def test_random_init_label_and_option_errors():
    assert backbone_label("qwen2-audio-7b", {"random_init": True, "dtype": "bf16", "device": "cuda"}) == \
        "qwen2-audio-7b+random_init"
    assert backbone_label("qwen2-audio-7b", {"random_init": True, "lm_layers": 2}) == "qwen2-audio-7b+lm_layers=2+random_init"
    with pytest.raises(ValueError, match="apply to --random-init only"):
        backbone_factory("qwen2-audio-7b", {"lm_layers": 2})
    with pytest.raises(ValueError, match="--weights does not apply"):
        backbone_factory("ultravox-v0.4", {"random_init": True, "weights": "/models/x"})
    with pytest.raises(ValueError, match="heads must divide"):
        backbone_factory("audio-flamingo-3", {"random_init": True, "lm_heads": 5})
    with pytest.raises(ValueError, match="positive integer"):
        backbone_factory("qwen2-audio-7b", {"random_init": True, "lm_layers": 0})
    with pytest.raises(ValueError, match="below the tokenizer"):
        make_backbone("qwen2-audio-7b", {"random_init": True, **REDUCED, "vocab_size": 8})


def test_bench_run_takes_random_init(tmp_path, monkeypatch):
    """The CLI flag reaches the backbone and the cells' label."""
    from benchbench.cli import _backbone_options, build_parser

    args = build_parser().parse_args(["run", "--methods", "lora", "--tasks", "synthetic", "--backbone",
                                      "qwen2-audio-7b", "--random-init", "--backbone-set", "lm_layers=2"])
    opts = _backbone_options(args)
    assert opts["random_init"] is True and opts["lm_layers"] == 2
    assert backbone_label("qwen2-audio-7b", opts) == "qwen2-audio-7b+lm_layers=2+random_init"


def test_seeded_rng_forks_every_generator_manual_seed_touches(monkeypatch):
    """``torch.manual_seed`` reseeds every CUDA device too: forking the CPU's alone (``devices=[]``) left
    the CUDA generators reseeded after a method's auxiliary init, so on a GPU the Phase-1 key (which holds
    the CUDA RNG state) of ``mal`` differed from ``lora``'s and its Phase 1 was trained again (seen on an
    H200) instead of replayed."""
    import benchbench.training as training

    seen = []

    class Fork:
        def __init__(self, devices):
            seen.append(list(devices))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", Fork)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)
    with training.auxiliary_rng(0):
        pass
    assert seen == [[0, 1]]


@pytest.fixture(scope="module")
def iemocap_dir(tmp_path_factory):
    from benchbench.tools.fixtures import make_iemocap

    return make_iemocap(EMODB_DIR, tmp_path_factory.mktemp("iemocap"), per_speaker=6)


# one architecture in the default run; the other two (their classes are built and run at reduced size by
# test_random_init_builds_the_real_class_at_reduced_size) with the slow tests
@pytest.mark.parametrize("name", ["qwen2-audio-7b", pytest.param("audio-flamingo-3", marks=pytest.mark.slow),
                                  pytest.param("ultravox-v0.4", marks=pytest.mark.slow)])
def test_paper_scale_script_runs_every_method_on_the_cpu(name, iemocap_dir, tmp_path):
    """The GPU script's dry run: every method's paper preset (epochs cut to 1), one cell each, through
    compute_cell; every row ok with its costs; Phase 1 trained once (lora) and replayed by every
    two-stage method; the markdown and the machine facts written."""
    from benchbench.tools.paper_scale import main

    args = ["--backbone", name, "--data-dir", str(iemocap_dir), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache"), "--set", "dpm.n_units=20",
            "--speed-dialogues", "2", "--speed-repeats", "1"]
    for k, v in REDUCED.items():
        args += ["--backbone-set", f"{k}={v}"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "out" / "paper_scale.csv")
    assert list(table["method"]) == ["lora", "mal", "mac", "mag", "dpm", "full_context"]
    assert (table["status"] == "ok").all()
    assert (table["fit_seconds_per_epoch"] > 0).all() and (table["eval_ms_per_utterance"] > 0).all()
    assert (table["epochs"] == 1).all()
    replayed = dict(zip(table["method"], table["phase1_replayed"]))
    assert all(replayed[m] for m in ("mal", "mac", "mag", "full_context")) and not replayed["lora"]
    trained = dict(zip(table["method"], table["trained_parameters"]))
    assert trained["mal"] > trained["mac"] > trained["lora"] == trained["full_context"]  # branches on every block
    info = json.loads((tmp_path / "out" / "machine.json").read_text())
    assert info["backbone"].endswith("+random_init+vocab_size=1024") and info["encoder_ms_per_utterance"] > 0
    speed = pd.read_csv(tmp_path / "out" / "speed.csv")
    assert set(speed["method"]) == {"lora", "zero_shot", "mal", "mac", "mag", "dpm", "full_context"}
    assert "costs per epoch, not accuracy" in (tmp_path / "out" / "paper_scale.md").read_text()
