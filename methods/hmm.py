"""``hmm``: the task LoRA plus causal forward filtering over each speaker's turns (no memory to train).

A strong simple context baseline that every memory method should beat: the emotion-inertia idea
behind ESA-CRF (the DPM paper's Table 2), on top of exactly ``lora``'s utterance model. Phase 1 is
``lora``'s training (replayed from the ``lora`` cell). Then, with the LoRA frozen:

* the speaker-transition matrix A ``[C, C]`` and the class prior p(y) are counted on the training
  dialogues (a speaker's label given their previous scored label; add-``smoothing``);
* for each utterance i of speaker s, the filtered belief (:func:`benchbench.inertia.forward_filter`)

      b_i(y)  proportional to  p(y | x_i) * (pi_i(y) / p(y)) ** lambda,    pi_i = b_{s, prev} A

  is the prediction, and becomes the speaker's belief for their next turn; a speaker's first turn
  is ``lora``'s posterior. Only the model's own posteriors flow from turn to turn, never a label;
* the strength lambda > 0 is chosen on dev from ``strengths`` (the selection metric; a tie keeps the
  smaller): "Phase 2". lambda = 0 is exactly ``lora``, bit for bit ("Phase 1"); with the phase gate
  (``phase_gate``, off by default) Phase 1 is kept unless the filter beats it on dev.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from benchbench.inertia import forward_filter, speaker_transitions
from benchbench.method import (ConfigValueError, ContextMethod, FitReport, MethodConfig, UtteranceLevelMethod,
                               check_ranges)
from benchbench.metrics import METRICS, compute_metrics, scored_only
from benchbench.training import LoRASettings, attach_lora, fit_task_lora, lora_search_space, phase1_presets


@dataclass
class HMMConfig(MethodConfig):
    lora: LoRASettings = field(default_factory=LoRASettings)  # Phase 1: exactly `lora`
    strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # lambda grid searched on dev
    smoothing: float = 1.0       # add-k counts of the transition matrix and the prior
    selection_metric: str = "ua"
    # the phase gate: keep the filter only where its dev-best strength beats lora (strength 0) on dev;
    # off (the default, as every two-stage method): the dev-best strength > 0 is reported
    phase_gate: bool = False

    def check(self) -> None:
        check_ranges(self, at_least=dict(smoothing=0.0), choices=dict(selection_metric=METRICS))
        if not self.strengths or any(not 0 <= s <= 1 for s in self.strengths):
            raise ConfigValueError("strengths", self.strengths, "expected one or more values in [0, 1]")


class HMMFilter(ContextMethod):
    """``lora`` + per-speaker forward filtering with a dev-chosen strength (see the module docstring)."""

    name = "hmm"
    config_cls = HMMConfig
    uses_context = True
    phases = 2          # Phase 1 = lora; "Phase 2" = the filter (lambda > 0 chosen on dev)
    phase1_of = "lora"
    presets = phase1_presets({"smoke": {}, "default": {}})

    @classmethod
    def search_space(cls, trial):
        return {"lora": lora_search_space(trial), "smoothing": trial.suggest_float("smoothing", 0.1, 10.0, log=True)}

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        C = len(self.labels)
        self.transitions = torch.full((C, C), 1.0 / C, dtype=torch.float64)
        self.prior = torch.full((C,), 1.0 / C, dtype=torch.float64)
        self.strength = 0.0  # lambda: 0 until dev chooses (Phase 1's dev scoring is then lora's)
        self.phase2_strength = 0.0  # Phase 2's dev-best strength > 0 (use_phase(2))
        self.reset()

    # ------------------------------------------------------------------ training
    def fit(self, train, dev, progress=None) -> FitReport:
        c = self.config
        self.strength = 0.0
        report = fit_task_lora(self, self.lora_params, c.lora, train, dev, progress)
        for p in self.lora_params.values():
            p.requires_grad_(False)
        A, prior = speaker_transitions(train, len(self.labels), c.smoothing)
        self.transitions, self.prior = torch.from_numpy(A), torch.from_numpy(prior)
        lora_dev = UtteranceLevelMethod.predict_dialogues(self, [d.inputs() for d in dev])
        curve = report.curve(f"hmm_dev_{c.selection_metric}")  # one entry per strength, in grid order
        best, best_score = 0.0, -np.inf  # Phase 2: the dev-best strength > 0 (0 is lora: Phase 1)
        for s in sorted(c.strengths):
            probs = [self._filter(p, [u.speaker for u in d.inputs()], s) for p, d in zip(lora_dev, dev)]
            y, p, _ = scored_only(dev, probs)
            score = compute_metrics(y, p.argmax(-1), self.labels)[c.selection_metric]
            curve.append(score)
            if progress is not None:
                progress(f"hmm strength {s:g} dev_{c.selection_metric}={score:.3f}", {f"dev_{c.selection_metric}": score})
            if s > 0 and score > best_score:
                best, best_score = s, score
        self.phase2_strength = float(best)
        report.phase_dev_scores = {"1": report.dev_score, "2": float(best_score) if best > 0 else None}
        # lambda = 0 is lora itself: Phase 1 (its report stands); else the filter, Phase 2
        keep = best > 0 and (not c.phase_gate or report.dev_score is None or best_score > report.dev_score)
        if keep:
            report.selected, report.dev_score = {"phase": 2, "epoch": None}, best_score
        self.use_phase(2 if keep else 1)
        return report

    def use_phase(self, phase: int) -> None:
        """1: strength 0 (``lora`` itself); 2: the dev-best strength > 0 (kept after :meth:`fit` and
        saved). ``ValueError`` for another phase."""
        if phase not in (1, 2):
            raise ValueError(f"use_phase: expected phase 1 or 2, got {phase!r}")
        self.strength = self.phase2_strength if phase == 2 else 0.0

    # ------------------------------------------------------------------ evaluation
    def _filter(self, probs: np.ndarray, speakers, strength: float) -> np.ndarray:
        if strength == 0:
            return probs
        out = forward_filter(probs.astype(np.float64), speakers, self.transitions.numpy(), self.prior.numpy(), strength)
        return out.astype(probs.dtype)

    def predict_dialogue(self, utterances):
        return self.predict_dialogues([utterances])[0]

    def predict_dialogues(self, dialogues):
        """``lora``'s posteriors (batched like ``lora``), then each dialogue filtered on its own."""
        probs = UtteranceLevelMethod.predict_dialogues(self, dialogues)
        return [self._filter(p, [u.speaker for u in utts], self.strength) for p, utts in zip(probs, dialogues)]

    def reset(self) -> None:
        self.belief: dict[str, np.ndarray] = {}

    def step(self, utterance):
        p = UtteranceLevelMethod.predict_dialogues(self, [[utterance]])[0][0]
        if self.strength == 0:
            return p
        b = forward_filter(p[None].astype(np.float64), [utterance.speaker], self.transitions.numpy(),
                           self.prior.numpy(), self.strength, self.belief)
        return b[0].astype(p.dtype)

    def activate_context(self, seed: int = 0) -> None:
        """The kit's hook: the filter at full strength, whatever dev chose."""
        self.strength = 1.0

    # ------------------------------------------------------------------ parameters and fitted state
    def trained_parameters(self):
        return self.lora_params

    def fitted_state(self):
        return {"transitions": self.transitions, "prior": self.prior,
                "strength": torch.tensor(self.strength, dtype=torch.float64),
                "phase2_strength": torch.tensor(self.phase2_strength, dtype=torch.float64)}

    def load_fitted_state(self, state):
        self.transitions, self.prior = state["transitions"].clone(), state["prior"].clone()
        self.strength = float(state["strength"])
        self.phase2_strength = float(state.get("phase2_strength", self.strength))
