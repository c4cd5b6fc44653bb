"""`--preset paper` is the papers' hyperparameters (Titans-as-a-Layer Sec. 3.4, DPM Sec. 4)."""

from benchbench.method import METHODS


def test_paper_preset_is_the_papers_hyperparameters():
    lora = METHODS.get("lora").make_config("paper").flat()
    assert (lora["r"], lora["alpha"], lora["lr"], lora["epochs"]) == (32, 64, 2e-5, 3)
    for name in ("mal", "mac", "mag"):
        c = METHODS.get(name).make_config("paper").flat()
        assert (c["lora.r"], c["lora.alpha"], c["lora.lr"], c["lora.epochs"]) == (32, 64, 2e-5, 3)
        assert (c["lr"], c["grad_clip"], c["gate_lr"], c["gate_grad_clip"], c["epochs"]) == (1e-4, 1.0, 2e-4, 2.0, 2)
        assert (c["d_m"], c["n_persistent"]) == (128, 8)
    assert METHODS.get("mal").make_config("paper").flat()["layers"] == "all"  # every layer
    dpm = METHODS.get("dpm").make_config("paper").flat()
    assert (dpm["lora.r"], dpm["lora.alpha"], dpm["lora.lr"]) == (64, 64, 5e-5)
    assert (dpm["temp_r"], dpm["temp_alpha"], dpm["temp_lr"]) == (64, 64, 5e-5)


def test_presets_differ_and_overrides_apply():
    paper = METHODS.get("mal").make_config("paper", {"d_m": 256, "lora": {"lr": 1e-4}}).flat()
    assert paper["d_m"] == 256 and paper["lora.lr"] == 1e-4
    assert METHODS.get("mal").make_config("default").flat() != METHODS.get("mal").make_config("paper").flat()


def test_default_preset_keeps_speaker_context_and_paper_preset_the_dialogue():
    """The CPU-sized default gives the memories one state per speaker and full_context the current
    speaker's utterances; the paper preset keeps the papers' one state / context per dialogue."""
    for name in ("mal", "mac", "mag"):
        assert METHODS.get(name).make_config("default").speaker_memory is True
        assert METHODS.get(name).make_config("paper").speaker_memory is False
    assert METHODS.get("full_context").make_config("default").context == "speaker"
    assert METHODS.get("full_context").make_config("paper").context == "dialogue"
