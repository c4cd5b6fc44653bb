"""``lora``: peft LoRA on the LM's linear layers, one utterance at a time (no dialogue context).

The task-adaptation baseline of both papers (Titans-as-a-Layer Sec. 3.4, Phase 1: r=32,
alpha=64, AdamW, lr 2e-5, 3 epochs). Its settings, presets and ``fit`` are
:mod:`benchbench.training`'s (:class:`~benchbench.training.LoRASettings`,
:data:`~benchbench.training.LORA_PRESETS`, :func:`~benchbench.training.fit_task_lora`), the same
objects every two-stage method's Phase 1 uses.
"""

from __future__ import annotations

from benchbench.method import UtteranceLevelMethod
from benchbench.training import LORA_PRESETS, LoRASettings, attach_lora, fit_task_lora, lora_search_space


class LoRAMethod(UtteranceLevelMethod):
    """Static task LoRA (Titans-as-a-Layer's "+ LoRA" rows); one utterance at a time."""

    name = "lora"
    config_cls = LoRASettings
    presets = LORA_PRESETS

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config)

    @classmethod
    def search_space(cls, trial):
        return lora_search_space(trial, prefix="")

    def fit(self, train, dev, progress=None):
        return fit_task_lora(self, self.lora_params, self.config, train, dev, progress)

    def trained_parameters(self):
        return self.lora_params
