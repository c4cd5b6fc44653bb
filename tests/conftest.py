import os
from pathlib import Path

import pytest

# Local corpora for the tests: BENCHBENCH_TEST_DATA names a folder holding emodb/ (Emo-DB's wav/
# folder) and meld/ (MELD's CSVs); default ../shared/data beside the repository. Tests that need a
# missing corpus are skipped, and their reason names the variable.
DATA_ENV = "BENCHBENCH_TEST_DATA"
DATA = Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data")
EMODB_DIR = DATA / "emodb"
MELD_DIR = DATA / "meld"


def missing(what: str, path: Path) -> str:
    """A skip reason naming the corpus, where it was looked for and how to point the tests at it."""
    return f"{what} not found at {path} (set {DATA_ENV} to a folder holding emodb/ and meld/; see the README)"


def pytest_configure(config):
    """Under pytest-xdist (``-n logical``, the default in pyproject.toml) each worker computes on its share
    of the CPUs' threads: on a 2-core machine two workers of one torch thread each finish the default run
    in about half the time of one process on two threads (tiny models gain nothing from a second
    thread; measured in CHANGELOG.md). A run without workers keeps torch's default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never touch the user's feature cache; a Phase-1 training is replayed from disk only where
    a test asks for it (BENCHBENCH_PHASE1_CACHE=1), so each test trains what it checks."""
    os.environ["BENCHBENCH_CACHE"] = str(tmp_path_factory.mktemp("bbcache"))
    os.environ["BENCHBENCH_PHASE1_CACHE"] = "0"


@pytest.fixture(scope="session")
def backbone(_isolated_cache):
    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio

    return tiny_qwen2_audio(seed=0)


@pytest.fixture(scope="session")
def tiny_task():
    """4 train / 2 dev / 3 test dialogues of 4 turns, 0.64 s utterances (16 audio tokens)."""
    from benchbench.tasks.synthetic import SyntheticProsodyTask

    return SyntheticProsodyTask(preset="smoke", n_train=6, n_dev=2, n_test=3, n_turns=4, duration_s=0.64)


def same_emotion_rate(dialogues) -> float:
    """Fraction of a speaker's utterances (after their first in a dialogue) that repeat their previous emotion."""
    same = total = 0
    for d in dialogues:
        last = {}
        for u in d.utterances:
            if u.speaker in last:
                same += last[u.speaker] == u.label
                total += 1
            last[u.speaker] = u.label
    return same / total
