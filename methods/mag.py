"""``mag``: Memory as Gating (Titans-as-a-Layer Sec. 3.2, Eq. 5), the injection ablation of MAL.

With h ``[T, D]`` the current utterance's audio-token hidden states before a chosen LM block and
m = W_out M([P; W_in h])[N_p:] the memory read-out of the previous utterances (Eq. 3, the same branch
and state as ``mal``):

    H_MAG = h * sigmoid(W_g m)                                 (Eq. 5)   [T, D], length unchanged

W_g (``[D, D]`` with bias) is the gate: it trains with the gate learning rate and clipping of
Sec. 3.4. The paper does not give its initialisation; ours is zero weight and bias
``gate_bias_init`` (sigmoid(3) = 0.95), so an untrained MAG multiplies h by a constant 0.95.
Default placement: one branch before block 0 (the ablation attaches a single branch); ``layers``
takes ``all``, ``quartile`` or a list like for ``mal``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchbench.methods.titans_memory import MemoryBranch, TitansMemoryConfig, TitansMemoryMethod


@dataclass
class MAGConfig(TitansMemoryConfig):
    layers: str = "0"              # the ablation's single branch
    gate_bias_init: float = 3.0    # sigmoid(W_g m) starts at sigmoid(3) = 0.95 (our choice)


class MAGBranch(MemoryBranch):
    """``forward(h [B, T, D], state) -> (h * sigmoid(W_g m) [B, T, D], state)`` (Eq. 5)."""

    def __init__(self, hidden_size: int, c: MAGConfig, max_tokens: int):
        super().__init__(hidden_size, c, max_tokens)
        self.W_g = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.W_g.weight)
        nn.init.constant_(self.W_g.bias, c.gate_bias_init)

    def gate_parameters(self):
        return [self.W_g.weight, self.W_g.bias]

    def inject(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # the gate in the branch's float32 over a bf16/fp16 host; the product in the host's dtype
        return h * torch.sigmoid(self.W_g(m.to(self.W_g.weight.dtype))).to(h.dtype)  # Eq. 5


class MemoryAsGating(TitansMemoryMethod):
    """Titans memory gating the audio-token hidden states multiplicatively (Eq. 5)."""

    name = "mag"
    config_cls = MAGConfig
    branch_cls = MAGBranch

    def mean_gate(self) -> float:
        """Mean sigmoid(W_g m) at m = 0, i.e. sigmoid(bias), over branches and channels."""
        return float(torch.cat([torch.sigmoid(b.W_g.bias.detach()) for b in self.branches.values()]).mean())
