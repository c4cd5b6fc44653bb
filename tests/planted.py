"""Small memory methods with planted bugs, for the conformance kit's own tests (tests/test_conformance.py).

:class:`DialogueMean` is a correct memory written the way CONTRIBUTING.md says: Phase 1 is the task
LoRA (``fit_task_lora``), and the memory is a residual read-out of the mean of the dialogue's earlier
utterances' pooled audio embeddings e_{<i},

    h~_i = h_i + tanh(alpha) W e_{<i},        alpha = 0 at init,

with no Phase 2, so alpha stays at 0 after fitting: the memory does nothing until the kit opens it
(:meth:`ContextMethod.activate_context`). Each subclass plants one bug that a gate at 0 hides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from benchbench.backbone import Segment
from benchbench.method import ContextMethod, FitReport, MethodConfig
from benchbench.training import LoRASettings, attach_lora, auxiliary_rng, fit_task_lora, phase1_presets


@dataclass
class DialogueMeanConfig(MethodConfig):
    lora: LoRASettings = field(default_factory=LoRASettings)


class DialogueMean(ContextMethod):
    name = "planted_correct"
    config_cls = DialogueMeanConfig
    uses_context = True
    phases = 2
    phase1_of = "lora"
    presets = phase1_presets({"smoke": {}, "default": {}})

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        with auxiliary_rng(seed):
            self.proj = nn.Linear(self.lm.hidden_size, self.lm.hidden_size, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.reset()

    def fit(self, train, dev, progress=None) -> FitReport:
        report = fit_task_lora(self, self.lora_params, self.config.lora, train, dev, progress)
        for p in self.lora_params.values():
            p.requires_grad_(False)
        return report  # no Phase 2: the gate stays at 0

    def trained_parameters(self):
        return {**self.lora_params, "planted.proj.weight": self.proj.weight, "planted.alpha": self.alpha}

    # the memory
    def _read(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        if e is None:
            return h
        return h + torch.tanh(self.alpha).expand(h.shape[0], 1) * self.proj(e).expand_as(h)

    def _baselines(self, embs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """e_{<i} for each turn of one dialogue (None at its first turn)."""
        return [torch.stack([x.mean(0) for x in embs[:i]]).mean(0) if i else None for i in range(len(embs))]

    def _forward(self, embs, baselines) -> np.ndarray:
        self.lm.eval()
        logits = self.lm(self.lm.batch([[Segment(self._read(h, e))] for h, e in zip(embs, baselines)]))
        return torch.softmax(logits.float(), -1).numpy()

    def reset(self) -> None:
        self.state: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, utterance):
        h = self.audio_embeddings(utterance)
        e = torch.stack(self.state).mean(0) if self.state else None
        probs = self._forward([h], [e])[0]
        self.state.append(h.mean(0))
        return probs

    @torch.no_grad()
    def predict_dialogue(self, utterances):
        return self.predict_dialogues([utterances])[0]

    @torch.no_grad()
    def predict_dialogues(self, dialogues):
        embs = [[self.audio_embeddings(u) for u in d] for d in dialogues]
        flat = [h for d in embs for h in d]
        if not flat:
            return [np.zeros((0, len(self.labels)), dtype=np.float32) for _ in dialogues]
        probs = self._forward(flat, self._batch_baselines(embs))
        return np.split(probs, np.cumsum([len(d) for d in dialogues])[:-1])

    def _batch_baselines(self, embs: list[list[torch.Tensor]]) -> list:
        return [e for d in embs for e in self._baselines(d)]


class SharedBatchState(DialogueMean):
    """Bug: one state for every dialogue of a batch (the running mean goes on across dialogues)."""

    name = "planted_shared_batch_state"

    def _batch_baselines(self, embs):
        return self._baselines([h for d in embs for h in d])


class FutureReadout(DialogueMean):
    """Bug: the batched read-out averages the whole dialogue, later turns included (step is causal)."""

    name = "planted_future_readout"

    def _baselines(self, embs):
        pooled = torch.stack([x.mean(0) for x in embs])
        return [torch.cat([pooled[:i], pooled[i + 1:]]).mean(0) if len(embs) > 1 else None for i in range(len(embs))]


class NoopReset(DialogueMean):
    """Bug: ``reset()`` keeps the previous dialogue's state (the streaming path never restores S_0)."""

    name = "planted_noop_reset"

    def reset(self) -> None:
        if not hasattr(self, "state"):
            self.state = []

    def predict_dialogue(self, utterances):
        return ContextMethod.predict_dialogue(self, utterances)

    def predict_dialogues(self, dialogues):
        return ContextMethod.predict_dialogues(self, dialogues)


class NoContext(DialogueMean):
    """Bug: declares ``uses_context`` but its read-out ignores the state (a memory that does nothing)."""

    name = "planted_no_context"

    def _read(self, h, e):
        return h


PLANTED = {SharedBatchState: "check_dialogue_isolation", FutureReadout: "check_future_turns",
           NoopReset: "check_dialogue_isolation", NoContext: "check_context_dependence"}
"""Each planted bug and the check that must name it."""
