"""Methods from other installed packages: the `ema` example installed as a real plugin, and a broken one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMA = ROOT / "examples" / "benchbench-ema"


def _env(*paths) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    return env


def _run(args, env, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ema_site(tmp_path_factory):
    """`pip install` the example package (wheel built by pip, no dependencies) into its own folder."""
    site = tmp_path_factory.mktemp("ema-site")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(EMA)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert list(site.glob("benchbench_ema-*.dist-info"))
    return site


def test_installed_plugin_is_listed_with_its_origin(ema_site):
    out = _run(["bench", "list", "methods"], _env(ema_site)).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ema "))
    assert "plugin benchbench-ema (benchbench_ema:SpeakerEMA)" in line and "BROKEN" not in line
    assert any(ln.startswith("lora ") and "built-in" in ln for ln in out.splitlines())


CHECK = """
import numpy as np, torch
from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
from benchbench.method import METHODS
from benchbench.tasks.synthetic import SyntheticProsodyTask
from benchbench.testing import fitted, run_conformance

task = SyntheticProsodyTask(preset="smoke", n_train=6, n_dev=2, n_test=3, n_turns=4, duration_s=0.64)
backbone = tiny_qwen2_audio(seed=0)
run_conformance("ema", backbone, task)                        # the suite, as a plugin's CI runs it

m = fitted("ema", backbone, task)
d = task.folds()[0].test[0]
with torch.no_grad():
    m.alpha.fill_(0.7)                                          # an open gate changes predictions ...
open_ = m.predict_dialogue(d.inputs())
m._gate_open = False
closed = m.predict_dialogue(d.inputs())
m._gate_open = True
first = {}
for i, u in enumerate(d.inputs()):
    first.setdefault(u.speaker, i)
firsts = sorted(first.values())
assert np.array_equal(open_[firsts], closed[firsts]), "a speaker's first utterance must see no memory"
later = [i for i in range(len(d)) if i not in firsts]
assert later and not np.allclose(open_[later], closed[later]), "the memory must act on later utterances"
with torch.no_grad():
    m.alpha.zero_()                                             # ... a zero gate is exactly the task LoRA
assert np.array_equal(m.predict_dialogue(d.inputs()), closed)
print("EMA-OK")
"""


def test_ema_plugin_passes_conformance_and_pins_its_mechanism(ema_site):
    res = _run([sys.executable, "-c", CHECK], _env(ema_site))
    assert res.returncode == 0 and "EMA-OK" in res.stdout, res.stderr[-3000:]


def test_ema_plugin_appears_in_a_bench_run_table(ema_site, tmp_path):
    env = _env(ema_site)
    res = _run(["bench", "run", "--methods", "lora,ema", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0",
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--output", str(tmp_path / "out"),
                "--no-progress"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stdout.split("Bayes ceilings")[0]
    assert any(ln.split()[2:3] == ["ema"] for ln in table.splitlines()), table
    assert "ema - lora WA" in res.stdout


def test_a_broken_plugin_is_named_and_breaks_nothing_else(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[benchbench.methods]\nbroken = broken_plugin:Missing\n")
    (site / "broken_plugin.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    env = _env(site)
    res = _run(["bench", "list", "methods"], env)
    assert res.returncode == 0
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("broken "))
    assert "BROKEN" in line and "broken-plugin" in line and "broken on purpose" in line
    assert {"lora", "mal", "zero_shot", "full_context"} <= {ln.split()[0] for ln in res.stdout.splitlines()}
    res = _run(["bench", "run", "--methods", "broken", "--tasks", "synthetic", "--preset", "smoke",
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--output", str(tmp_path / "o")], env)
    assert res.returncode == 2 and "broken-plugin" in res.stderr and "broken on purpose" in res.stderr
