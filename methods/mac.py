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
read at its shifted position. MAC has no gate (all its parameters take the memory learning rate). In a
right-padded batch of utterances each item gets its own N_p + T_b tokens, and the lengthened
sequences their own attention mask. Default placement: one branch at the LM input, as Eq. 4 states; ``layers`` takes a list
like for ``mal`` (each branch inserts its own tokens).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from einops import repeat
from transformers.masking_utils import create_causal_mask

from benchbench.methods.titans_memory import MemoryBranch, TitansMemoryConfig, TitansMemoryMethod

# create_causal_mask's KV-cache argument: ``cache`` in newer transformers 5.x, where ``past_key_values``
# is deprecated (removed in 5.40); ``past_key_values`` before. MAC builds its mask without a cache.
_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}


@dataclass
class MACConfig(TitansMemoryConfig):
    layers: str = "0"   # Eq. 4: at the language-model input (block 0)


class MACBranch(MemoryBranch):
    """``forward(h [B, T, D], state) -> ([W_out P; m] [B, N_p + T, D], state)``: the tokens to insert."""

    def forward(self, h: torch.Tensor, state=None):
        m, state = self.retrieve(h, state)
        p = repeat(self.W_out(self.P), "n d -> b n d", b=h.shape[0]).to(m.dtype)
        return torch.cat([p, m], dim=1), state


class MemoryAsContext(TitansMemoryMethod):
    """Titans memory read-out prepended to the audio tokens as extra context tokens (Eq. 4)."""

    name = "mac"
    config_cls = MACConfig
    branch_cls = MACBranch

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        base = self.lm.language_model.get_base_model()
        self._rotary, self._lm_config = base.rotary_emb, base.config

    def _inject(self, key, h, kwargs, ctx):
        """Insert ``[W_out P; m_b]`` (N_p + T_b tokens) before item b's audio tokens, for every item of
        the right-padded batch ``h [B, L, D]``; the sequence becomes ``[B, L + max_b(N_p + T_b), D]``
        with its own attention mask, position ids ``0..L'-1`` and rotary embeddings from here on."""
        lay, branch, n_p = ctx.layout, self.branches[key], self.config.n_persistent
        B, L, D = h.shape
        x = h[lay.b_idx, lay.pos_idx]                                            # [n_tok, D]
        m, ctx.states[key] = branch.read(x, lay, ctx.states.get(key))
        T = torch.bincount(lay.b_idx, minlength=B)                               # audio tokens per item
        start = torch.full((B,), L, device=h.device).scatter_reduce(0, lay.b_idx, lay.pos_idx, "amin")
        n = n_p + T                                                              # tokens inserted per item
        rows = torch.arange(B, device=h.device)[:, None]
        pos = torch.arange(L, device=h.device)[None].expand(B, L)
        dst = pos + (pos >= start[:, None]) * n[:, None]                         # where the old tokens go
        L2 = L + int(n.max())
        out = h.new_zeros(B, L2, D).index_put((rows.expand(B, L), dst), h)
        if n_p:
            p_pos = start[:, None] + torch.arange(n_p, device=h.device)[None]    # [B, N_p]
            p = branch.W_out(branch.P).to(h.dtype)
            out = out.index_put((rows.expand(B, n_p), p_pos), p[None].expand(B, n_p, D))
        out = out.index_put((lay.b_idx, lay.pos_idx + n_p), m)                   # Eq. 4: [.., P, m, h, ..]
        mask = ctx.batch.attention_mask
        mask2 = mask.new_zeros(B, L2).index_put((rows.expand(B, L), dst), mask)
        inserted = (torch.arange(L2, device=h.device)[None] >= start[:, None]) & \
            (torch.arange(L2, device=h.device)[None] < (start + n)[:, None])
        mask2 = mask2.masked_fill(inserted, 1)
        ctx.batch.attention_mask = mask2
        position_ids = torch.arange(L2, device=h.device)[None]
        attention = create_causal_mask(config=self._lm_config, inputs_embeds=out,
                                       attention_mask=None if bool(mask2.all()) else mask2,
                                       position_ids=position_ids, **_NO_CACHE)
        ctx.insert_tokens(n, {"position_ids": position_ids, "position_embeddings": self._rotary(out, position_ids),
                              "attention_mask": attention})
        kwargs.update(ctx.block_kwargs)
        return out, kwargs
