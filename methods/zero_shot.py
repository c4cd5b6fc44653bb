"""``zero_shot``: the backbone as it is, scored over the label verbalizers (nothing trained)."""

from __future__ import annotations

from dataclasses import dataclass

from benchbench.method import FitReport, MethodConfig, UtteranceLevelMethod


@dataclass
class ZeroShotConfig(MethodConfig):
    """No hyperparameters: the prompt and verbalizers are the backbone's."""


class ZeroShot(UtteranceLevelMethod):
    """Constrained label logits of the frozen backbone (Titans-as-a-Layer Table 1, backbone rows)."""

    name = "zero_shot"
    config_cls = ZeroShotConfig
    presets = {"smoke": {}, "default": {}}

    def fit(self, train, dev, progress=None) -> FitReport:
        """Nothing to train: an empty report (no curves, nothing selected)."""
        return FitReport()
