"""The task contract: a named label set, folds of dialogues, a data manifest and reference figures."""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

from .data import Fold, hash_json, manifest_of
from .registry import Registry


@dataclass(frozen=True)
class TaskReference:
    """Reference figures a task reports beside results; accuracies (WA) as fractions in [0, 1].

    Attributes:
        context_free: the best WA any method can reach from the current utterance alone (e.g. a
            Bayes rule on a generated task); context-free methods above it beyond noise are flagged
            as leakage (:func:`benchbench.analysis.leakage_checks`). ``None``: unknown.
        ceilings: other named accuracies of rules that know how the data were made (e.g. the Bayes
            ``speaker_history`` rule of a generated task, ``chance``): true bounds or fixed points.
        test_ceilings: the same rules scored on the task's own test utterances.
        references: accuracies that are references, not bounds (e.g. ``label_history``: a reference
            method's posteriors plus the speaker's previous gold label): a method may exceed them.

    Raises ``ValueError`` for a value outside [0, 1] (NaN allowed: not computable).
    """

    context_free: float | None = None
    ceilings: dict[str, float] = field(default_factory=dict)
    test_ceilings: dict[str, float] = field(default_factory=dict)
    references: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        values = ([("context_free", self.context_free)] if self.context_free is not None else []) + \
            list(self.ceilings.items()) + list(self.test_ceilings.items()) + list(self.references.items())
        for k, v in values:
            if not (math.isnan(v) or 0.0 <= v <= 1.0):
                raise ValueError(f"task reference {k}={v}: expected a fraction in [0, 1]")

    def all_ceilings(self) -> dict[str, float]:
        """``context_free`` (when known) and the other ceilings, for display."""
        return ({"context_free": self.context_free} if self.context_free is not None else {}) | dict(self.ceilings)

    def to_dict(self) -> dict:
        """The JSON form (``summary.json``'s per-task ``ceilings`` / ``test_ceilings`` / ``references``).

        In version 0.2 the references are repeated under ``ceilings`` too (where ``label_history`` was
        until 0.1; a deprecated alias, dropped in 0.3: CHANGELOG.md)."""
        out = {}
        if self.all_ceilings() or self.references:
            out["ceilings"] = self.all_ceilings() | dict(self.references)
        if self.test_ceilings:
            out["test_ceilings"] = dict(self.test_ceilings)
        if self.references:
            out["references"] = dict(self.references)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TaskReference":
        """Inverse of :meth:`to_dict`; ``ValueError`` naming unknown keys."""
        unknown = set(d) - {"ceilings", "test_ceilings", "references"}
        if unknown:
            raise ValueError(f"task reference: unknown key(s) {sorted(unknown)} "
                             "(known: ceilings, test_ceilings, references)")
        references = dict(d.get("references") or {})
        ceilings = {k: v for k, v in (d.get("ceilings") or {}).items() if k not in references}
        return cls(ceilings.pop("context_free", None), ceilings, dict(d.get("test_ceilings") or {}), references)


class Task(ABC):
    """A conversational SER task.

    Subclasses set ``name`` and ``labels`` and build their folds in ``__init__``. The constructor
    takes ``data_dir`` (``None`` for tasks without files), ``preset`` (the run's ``--preset``:
    ``"smoke"``, ``"default"`` or ``"paper"``; a task without a paper protocol of its own treats
    ``"paper"`` as ``"default"``) and ``seed`` (the data-composition seed, fixed across method seeds so that every method and seed
    sees the same items).
    """

    name: ClassVar[str]
    labels: ClassVar[tuple[str, ...]]
    needs_data_dir: ClassVar[bool] = False
    needs: ClassVar[str] = "nothing (generated)"   # what --data-dir must hold, for `bench list tasks`
    source: ClassVar[str] = ""                     # where the corpus is obtained (and its licence)
    # the backbone a run puts this task on when --backbone is not given (`bench list tasks` shows it):
    # a pretrained audio encoder for real speech, the random tiny one for generated audio that is not
    # speech; --backbone overrides it for every task of a run
    default_backbone: ClassVar[str] = "tiny-qwen2-audio"

    def __init__(self, data_dir: str | Path | None = None, preset: str = "default", seed: int = 0):
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.preset = preset
        self.seed = seed
        # things a user must read about the data (count mismatches, ...): printed by `bench run`,
        # written to the manifest
        self.notices: list[str] = []

    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options of the constructor beyond ``data_dir`` and ``preset`` (``bench run
        --task-set TASK.KEY=VALUE``)."""
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if n not in ("self", "data_dir", "preset")
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @abstractmethod
    def folds(self) -> list[Fold]:
        """All folds, in index order."""

    def reference(self) -> TaskReference:
        """Reference figures reported beside results (:class:`TaskReference`; none by default)."""
        return TaskReference()

    def params(self) -> dict:
        """The task's resolved configuration (logged as run params)."""
        return {"name": self.name, "preset": self.preset, "seed": self.seed,
                "data_dir": str(self.data_dir) if self.data_dir else None, "labels": list(self.labels)}

    def manifest(self) -> dict:
        """Counts and content hashes per fold and split, plus one overall ``sha256``."""
        folds = {}
        for f in self.folds():
            folds[str(f.index)] = {s: manifest_of(getattr(f, s), self.labels) for s in ("train", "dev", "test")}
            folds[str(f.index)]["speaker_independent"] = f.speaker_independent
        # the data_dir path is not content: leave it out so the hash identifies the data itself
        m = {"task": {k: v for k, v in self.params().items() if k != "data_dir"}, "folds": folds,
             "notices": list(self.notices)}
        m["sha256"] = hash_json(m)
        return m


TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("synthetic", "benchbench.tasks.synthetic:SyntheticProsodyTask")
TASKS.register("emodb", "benchbench.tasks.emodb:EmoDBDialogueTask")
TASKS.register("iemocap", "benchbench.tasks.iemocap:IEMOCAPTask")
TASKS.register("meld", "benchbench.tasks.meld:MELDTask")
TASKS.register("multidialog", "benchbench.tasks.multidialog:MultiDialogTask")


def skipped_notice(skipped: Sequence[dict], shown: int = 3) -> str:
    """The notice for files a loader skipped (``{"file", "reason"}`` each): how many, the first
    ``shown`` with their reasons, and where the full list is (the manifest's ``skipped``)."""
    head = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{len(skipped)} file(s) skipped: {head}{more} (all in the manifest's 'skipped')"


def data_dir_for(data_dir: str | dict | None, task: str) -> str | None:
    """The data folder of ``task`` from ``--data-dir``: one folder for every task (a string), or
    ``{task: folder}`` with an optional ``"*"`` for the others (``--data-dir emodb=PATH``)."""
    if isinstance(data_dir, dict):
        return data_dir.get(task, data_dir.get("*"))
    return data_dir


def parse_data_dirs(values: list[str] | None) -> str | dict | None:
    """``--data-dir`` values (repeatable) as :func:`data_dir_for` reads them: ``PATH`` (every task)
    and ``TASK=PATH`` (a registered task's own; a ``=`` after anything else is part of a path).
    ``ValueError`` for two folders given to the same task."""
    if not values:
        return None
    out: dict[str, str] = {}
    for v in values:
        task, sep, path = v.partition("=")
        key, folder = (task, path) if sep and task in TASKS.names() else ("*", v)
        if key in out:
            raise ValueError(f"--data-dir {v}: a second folder for {'every task' if key == '*' else key} "
                             f"(already {out[key]})")
        out[key] = folder
    return out["*"] if list(out) == ["*"] else out


def preset_label(preset: str, options: dict | None) -> str:
    """A cell's ``preset`` param: the preset, plus the task options when any were set
    (``default+n_train=160``), so that the leaderboard never pools cells of different data."""
    return preset + "".join(f"+{k}={v}" for k, v in sorted((options or {}).items()))


def check_task_options(name: str, options: dict) -> None:
    """``ValueError`` naming task ``name`` and the option for any its constructor does not take."""
    known = TASKS.get(name).option_names()
    bad = sorted(set(options) - set(known))
    if bad:
        raise ValueError(f"task {name}: unknown option(s) {bad} (known: {known})")
