"""The conformance kit: on every registered method and its variants, one pytest test per check; and
on planted-bug memories whose gate starts at 0, which it must fail, naming the check."""

import pytest

from benchbench.method import METHODS, ContextMethod
from benchbench.testing import CHECKS, conformance_checks, run_conformance
from tests.planted import PLANTED, DialogueMean

# every method at its smoke preset, and the variants the presets or the README use
CONFIGS = [(name, None) for name in METHODS.names()] + [
    ("mal", {"speaker_memory": True}), ("mac", {"speaker_memory": True}), ("mag", {"speaker_memory": True}),
    ("full_context", {"context": "speaker"}), ("dpm", {"order": "update_first"}),
    ("dpm", {"emotion_prefix": "history"}), ("dpm", {"order": "update_first", "emotion_prefix": "history"}),
    ("mal", {"phase1": "none", "layers": "0"}), ("mac", {"phase1": "none"}), ("mag", {"phase1": "none"}),
    ("mal", {"surprise": "initial"}), ("mac", {"surprise": "initial"}), ("mag", {"surprise": "initial"}),
    ("mal", {"surprise": "initial", "speaker_memory": True}),
    ("ttt", {"speaker_memory": True}), ("ttt", {"model": "mlp"}), ("rmt", {"speaker_memory": True}),
    ("rmt", {"bptt": 1}), ("retrieval", {"speaker_memory": True}), ("retrieval", {"top_k": 1}),
]
ALL_CHECKS = [c for name, overrides in CONFIGS for c in conformance_checks(name, overrides)]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=str)
def test_method_conforms(check, backbone, tiny_task):
    check(backbone, tiny_task)


def test_checks_apply_by_declaration():
    names = lambda m: [c.name for c in conformance_checks(m)]
    assert "check_context_free_independence" in names("lora") and "check_context_dependence" not in names("lora")
    assert "check_context_dependence" in names("mal") and "check_phase1_is_lora" in names("mal")
    assert "check_phase1_is_lora" not in names("dpm")  # its Phase 1 is its own (L_a + L_e), not lora's
    assert set(names("mal")) | {"check_context_free_independence"} == set(CHECKS)
    assert str(conformance_checks("mal", {"speaker_memory": True})[0]) == "mal{speaker_memory=True}-check_output_shape"


def test_a_correct_memory_with_a_closed_gate_passes(backbone, tiny_task):
    """The control: the planted methods' correct parent passes every check (its Phase 1 is lora's)."""
    run_conformance(DialogueMean, backbone, tiny_task)


@pytest.mark.parametrize("bug", list(PLANTED), ids=lambda c: c.name)
def test_a_planted_bug_fails_the_kit_naming_the_check(bug, backbone, tiny_task):
    (check,) = [c for c in conformance_checks(bug) if c.name == PLANTED[bug]]
    with pytest.raises(AssertionError, match=f"^{bug.name}: {PLANTED[bug]}: "):
        check(backbone, tiny_task)
    with pytest.raises(AssertionError) as e:  # and the one call fails too, every failing check reported,
        run_conformance(bug, backbone, tiny_task)  # the most specific cause (the planted one) on the first line
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"{bug.name}: {PLANTED[bug]}: "), lines
    assert all(ln.startswith(f"{bug.name}: check_") for ln in lines if ln.startswith(bug.name))


def test_the_report_order_covers_every_check():
    from benchbench.testing import REPORT_ORDER

    assert sorted(REPORT_ORDER) == sorted(CHECKS)
    assert REPORT_ORDER.index("check_dialogue_isolation") < REPORT_ORDER.index("check_future_turns")


def test_without_activation_the_gate_hides_the_bugs(backbone, tiny_task, monkeypatch):
    """Why the kit activates: with the gate left at 0 the memory does nothing, so every planted bug
    but the missing context would pass the isolation and causality checks."""
    monkeypatch.setattr(ContextMethod, "activate_context", lambda self, seed=0: None)
    for bug, name in PLANTED.items():
        (check,) = [c for c in conformance_checks(bug) if c.name == name]
        if name == "check_context_dependence":
            with pytest.raises(AssertionError):
                check(backbone, tiny_task)
        else:
            check(backbone, tiny_task)


def test_every_registry_entry_resolves():
    from benchbench.backbone import BACKBONES
    from benchbench.task import TASKS

    for reg in (METHODS, TASKS):  # a registry name resolves to the class that carries that name
        for n in reg.names():
            assert reg.get(n).name == n
    from benchbench.backbone import backbone_spec

    assert BACKBONES.names() and all(backbone_spec(n).name == n and callable(backbone_spec(n).build)
                                     for n in BACKBONES.names())


def test_unknown_name_suggests():
    with pytest.raises(KeyError, match="Did you mean 'lora'"):
        METHODS.get("lroa")
