"""``mac``: Memory as Context (Titans-as-a-Layer Sec. 3.2, Eq. 4), the injection ablation of MAL.

With h ``[T, D]`` the current utterance's audio-token hidden states before a chosen LM block (block 0:
the language-model input) and m = W_out M([P; W_in h])[N_p:] the memory read-out of the previous
utterances (Eq. 3, the same branch and state as ``mal``), the memory is put into the sequence as
tokens right before the audio tokens:

    H_MAC = [W_out P; m; h]                                    (Eq. 4)   [N_p + 2T, D]

This lengthens the sequence by N_p + T and shifts the positions of the utterance's audio tokens and of
everything after them (the instruction, the answer position) by as much: the point of the ablation
("it shifts the positional indices of the original tokens"). From the branch's block on, the blocks
get position ids ``0..L'-1`` of the lengthened sequence and their rotary embeddings; the answer is
read at its shifted position. MAC has no gate (all its parameters take the memory learning rate), and
it needs unpadded batches (one utterance, or equal-shape dialogues in Phase 2: ``ValueError``
otherwise). Default placement: one branch at the LM input, as Eq. 4 states; ``layers`` takes a list
like for ``mal`` (each branch inserts its own tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import repeat

from benchbench.methods.titans_memory import MemoryBranch, TitansMemoryConfig, TitansMemoryMethod


@dataclass
class MACConfig(TitansMemoryConfig):
    layers: str = "0"   # Eq. 4: at the language-model input (block 0)


class MACBranch(MemoryBranch):
    """``forward(h [B, T, D], state) -> ([W_out P; m] [B, N_p + T, D], state)``: the tokens to insert."""

    def forward(self, h: torch.Tensor, state=None):
        m, state = self.retrieve(h, state)
        p = repeat(self.W_out(self.P), "n d -> b n d", b=h.shape[0])
        return torch.cat([p, m], dim=1), state


class MemoryAsContext(TitansMemoryMethod):
    """Titans memory read-out prepended to the audio tokens as extra context tokens (Eq. 4)."""

    name = "mac"
    config_cls = MACConfig
    branch_cls = MACBranch

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self._rotary = self.lm.language_model.get_base_model().rotary_emb

    def _inject(self, key, h, kwargs, ctx):
        if kwargs.get("attention_mask") is not None:
            raise ValueError("mac: memory tokens can only be inserted into unpadded batches "
                             "(one utterance, or dialogues of identical shapes)")
        s, e = ctx.span
        tokens, ctx.states[key] = self.branches[key](h[:, s:e], ctx.states.get(key))
        n = tokens.shape[1]
        h = torch.cat([h[:, :s], tokens, h[:, s:]], dim=1)                          # Eq. 4: [.., P, m, h, ..]
        pos = torch.arange(h.shape[1], device=h.device)[None]
        ctx.insert_tokens(n, {"position_ids": pos, "position_embeddings": self._rotary(h, pos)})
        kwargs.update(ctx.block_kwargs)
        return h, kwargs
