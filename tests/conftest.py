import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EMODB_DIR = SHARED / "data" / "emodb"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never touch the user's feature cache."""
    os.environ["BENCHBENCH_CACHE"] = str(tmp_path_factory.mktemp("bbcache"))


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
