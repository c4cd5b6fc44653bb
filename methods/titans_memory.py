"""Titans memory branches inside a frozen audio LLM: the shared machinery of ``mal``, ``mac`` and ``mag``.

Titans-as-a-Layer (Sec. 3.2-3.4) compares three ways of putting the same Titans NeuralMemory branch
into a frozen, LoRA-tuned LALM. With h ``[T, D]`` the audio-token hidden states of the current
utterance in the residual stream before an LM block, P the persistent tokens and M the memory:

    m = W_out M([P; W_in h])[N_p:]            (Eq. 3, Eq. 6-8)        m: [T, D]
    MAC:  H = [W_out P; m; h]                 (Eq. 4)  sequence grows by N_p + T, positions shift
    MAG:  H = h * sigmoid(W_g m)              (Eq. 5)  sequence length unchanged
    MAL:  H = h + tanh(alpha) m               (Eq. 9)  alpha = 0 at init: the host is untouched

Everything except the injection is shared, so ``mac`` / ``mag`` / ``mal`` differ in that alone: the
branch (:class:`MemoryBranch`: W_in, P, the titans-pytorch NeuralMemory, W_out), the memory-update
schedule (``chunk_size``), the per-dialogue state (carried across the dialogue's utterances, reset at
its start), the placement (``layers``: every block, the quartile blocks, or a list) and the two-stage
training schedule of Sec. 3.4 (Phase 1: the task LoRA with the memory removed, exactly ``lora``;
Phase 2: LoRA and backbone frozen, the branches trained by backpropagation through each training
dialogue, with separate learning rates and clipping for the branch {W_in, W_out, M, P} and for its
gates).

Memory streams: one state per dialogue (the paper; the ``paper`` preset) or, with ``speaker_memory``
(the CPU-sized ``default`` preset), one per speaker of the dialogue, chosen by the utterance's
``speaker`` metadata; both are reset at the dialogue's start.

Our reading where the paper is silent: in MAC, P enters the host sequence through the same W_out
(P lives in the memory's d_m space, as in MAL); MAC has no gate; MAG's W_g starts at zero weight and a
bias ``gate_bias_init`` (sigmoid(3) = 0.95), so an untrained MAG nearly passes h through.

Memory updates (``chunk_size``):

* ``"utterance"`` (default): one memory update per utterance, and every token of utterance i reads
  the memory as it was after utterance i-1, i.e. exactly Eq. 1 (y_i = f(x_i, S_{i-1}),
  S_i = U(S_{i-1}, x_i)). Each call stores one titans-pytorch chunk of ``N_p + T_max + 1`` tokens
  (T_max: the backbone's audio tokens per encoder window): z padded with zeros, padding excluded from
  the surprise gradients by ``store_mask`` (its learning rate is 0). The padding still enters the
  mean-pooled chunk summary from which the decay and momentum gates are computed, so those gates
  depend on the utterance's length (a deterministic function of the utterance alone). The last slot
  is always padding: titans-pytorch lets the chunk's last retrieval position read the updated memory.
* an integer: titans-pytorch's own chunking inside the utterance (later tokens read memory that
  already holds the utterance's earlier tokens). titans-pytorch 0.5.5 chains state exactly only when
  every call's length is a multiple of ``chunk_size`` (see ../shared/reference/titans-pytorch.md);
  :class:`MemoryBranch` refuses other lengths with a clear error instead of silently computing
  something else. ``chunk_size=1`` chains exactly for any length (one update per token: slow).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from einops import repeat
from titans_pytorch import NeuralMemory
from torch import nn

from benchbench.backbone import LMBatch, Segment
from benchbench.data import UNSCORED, UtteranceInput
from benchbench.method import ConfigValueError, ContextMethod, MethodConfig, UtteranceLevelMethod, check_ranges
from benchbench.metrics import METRICS, evaluate
from benchbench.training import (BestCheckpoint, LoRASettings, attach_lora, auxiliary_rng, dev_epoch_score,
                                 fit_task_lora, phase1_presets, two_stage_search_space)


@dataclass
class TitansMemoryConfig(MethodConfig):
    """Config shared by ``mal``, ``mac`` and ``mag`` (paper defaults: Titans-as-a-Layer Sec. 3.3-3.4)."""

    lora: LoRASettings = field(default_factory=LoRASettings)  # Phase 1 (Sec. 3.4)
    layers: str = "all"          # "all" (paper), "quartile" (4 layers at the quartiles), or "0,3,5"
    d_m: int = 128               # memory dimension d_m (paper, every-layer placement)
    n_persistent: int = 8        # N_p persistent tokens P_l
    chunk_size: int | str = "utterance"  # "utterance": one update per utterance (Eq. 1); or tokens per update
    memory_depth: int = 2        # depth-2 MLP memory (Fig. 1)
    memory_heads: int = 1
    memory_max_lr: float = 0.1   # NeuralMemory default_step_transform_max_lr (1.0 can diverge)
    memory_max_grad_norm: float = 1.0  # surprise-gradient clipping inside the memory
    epochs: int = 2              # Phase 2: two epochs
    lr: float = 1e-4             # {W_in, W_out, M, P}: lr 1e-4 ...
    grad_clip: float = 1.0       # ... clipping 1.0
    gate_lr: float = 2e-4        # gates ({alpha} in MAL, W_g in MAG; MAC has none): lr 2e-4 ...
    gate_grad_clip: float = 2.0  # ... clipping 2.0
    batch_dialogues: int = 1     # memory streams (dialogues; speakers with speaker_memory) per Phase-2 step, equal shapes only
    selection_metric: str = "ua"
    # One memory state per speaker of the dialogue instead of one per dialogue: each utterance reads
    # and writes only its speaker's state (a speaker-baseline variant; the paper keeps one state).
    speaker_memory: bool = False

    def check(self) -> None:
        check_ranges(self, at_least=dict(d_m=1, n_persistent=0, memory_depth=1, memory_heads=1, epochs=0,
                                         batch_dialogues=1),
                     positive=("memory_max_lr", "memory_max_grad_norm", "lr", "grad_clip", "gate_lr", "gate_grad_clip"),
                     choices=dict(selection_metric=METRICS))
        if self.layers not in ("all", "quartile"):
            try:
                [int(x) for x in str(self.layers).split(",")]
            except ValueError:
                raise ConfigValueError("layers", self.layers, "expected all, quartile or comma-separated block "
                                       "indices") from None
        if self.chunk_size != "utterance" and not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ConfigValueError("chunk_size", self.chunk_size, "expected utterance or a positive integer")


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """Block indices for a placement spec. ``quartile`` maps the paper's {7, 15, 23, 31} of a
    32-block LM proportionally: ``round((q + 1) * n / 4) - 1`` for q = 0..3 (deduplicated).
    ``ValueError`` for an unknown spec or an index outside ``[0, n_layers)``."""
    if spec == "all":
        return list(range(n_layers))
    if spec == "quartile":
        return sorted({max(0, round((q + 1) * n_layers / 4) - 1) for q in range(4)})
    try:
        idx = sorted({int(x) for x in str(spec).split(",")})
    except ValueError:
        raise ValueError(f"memory layers {spec!r}: expected 'all', 'quartile' or comma-separated ints") from None
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"memory layers {bad} out of range for a {n_layers}-block language model")
    return idx


@dataclass
class MemoryPass:
    """One LM forward with the memory on: what the block hooks read and update.

    Attributes:
        states: layer key -> titans-pytorch ``NeuralMemState`` of this memory stream: ``S_{i-1}``
            before the forward, ``S_i`` after it (a missing key is ``S_0``, a fresh memory).
        batch: the :class:`LMBatch` being run (B equal-shape turns).
        span: ``(start, end)`` positions of the current utterance's audio tokens in the residual
            stream ``[B, L, D]``; moved by :meth:`insert_tokens`.
        block_kwargs: keyword overrides for every later block (MAC: the lengthened sequence's
            ``position_ids`` and ``position_embeddings``).
    """

    states: dict[str, Any]
    batch: LMBatch | None = None
    span: tuple[int, int] | None = None
    block_kwargs: dict = field(default_factory=dict)

    def start(self, batch: LMBatch) -> None:
        """A new forward over ``batch`` (same-shape items; ``ValueError`` otherwise)."""
        self.batch, self.span, self.block_kwargs = batch, batch.uniform_current_span, {}

    def insert_tokens(self, n: int, block_kwargs: dict) -> None:
        """``n`` tokens were inserted right before the current span (MAC, Eq. 4): the span and the
        answer position move by ``n`` (``EmotionLM.forward`` reads the answer after the LM has run)
        and every later block gets ``block_kwargs``."""
        s, e = self.span
        self.span = (s + n, e + n)
        self.batch.answer_index = self.batch.answer_index + n
        self.block_kwargs = block_kwargs


class MemoryBranch(nn.Module):
    """The Titans memory read-out shared by MAL, MAC and MAG (Eq. 3 / Eq. 6-8).

    ``retrieve(h [B, T, D], state) -> (m [B, T, D], state)``; subclasses add the injection as
    ``forward``. ``max_tokens``: the most audio tokens one utterance can have (needed for
    ``chunk_size="utterance"``). Raises ``ValueError`` for an unknown ``chunk_size`` and, in
    ``retrieve``, for a length it cannot chain exactly.
    """

    def __init__(self, hidden_size: int, c: TitansMemoryConfig, max_tokens: int):
        super().__init__()
        self.n_p, self.max_tokens = c.n_persistent, max_tokens
        if c.chunk_size == "utterance":
            self.store_len = c.n_persistent + max_tokens + 1
            self.chunk_size = self.store_len
        else:  # a positive int (TitansMemoryConfig.check)
            self.store_len, self.chunk_size = None, c.chunk_size
        self.W_in = nn.Linear(hidden_size, c.d_m, bias=False)
        self.W_out = nn.Linear(c.d_m, hidden_size, bias=False)
        self.P = nn.Parameter(torch.randn(c.n_persistent, c.d_m) * 0.02)
        self.memory = NeuralMemory(
            dim=c.d_m, chunk_size=self.chunk_size, heads=c.memory_heads,
            default_model_kwargs=dict(depth=c.memory_depth, expansion_factor=4.0),
            default_step_transform_max_lr=c.memory_max_lr, max_grad_norm=c.memory_max_grad_norm)

    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the gate learning rate and clipping (Sec. 3.4)."""
        return []

    def retrieve(self, h: torch.Tensor, state=None):
        """Eq. 6-8: ``(m [B, T, D], S_i)`` for hidden states ``h [B, T, D]`` and state ``S_{i-1}``."""
        B, T, _ = h.shape
        h_dtype, h = h.dtype, h.to(self.W_in.weight.dtype)  # the branch runs in float32 over a bf16 host
        z = torch.cat([repeat(self.P, "n d -> b n d", b=B), self.W_in(h)], dim=1)  # Eq. 6: [P; W_in h]
        n = self.n_p + T
        if self.store_len is not None:  # one update per utterance; every token reads S_{i-1}
            if T > self.max_tokens:
                raise ValueError(f"memory branch: utterance of {T} audio tokens is longer than the "
                                 f"{self.max_tokens} the memory's chunk was sized for")
            z = nn.functional.pad(z, (0, 0, 0, self.store_len - n))
            mask = (torch.arange(self.store_len, device=h.device) < n).expand(B, -1)
            r, state = self.memory(z, state=state, store_mask=mask)                # Eq. 7
        else:
            if n % self.chunk_size:
                raise ValueError(f"memory branch: N_p + T = {self.n_p} + {T} is not a multiple of chunk_size "
                                 f"{self.chunk_size}; titans-pytorch would not chain the dialogue state "
                                 "exactly (use chunk_size=1 or a divisor of N_p + T)")
            r, state = self.memory(z, state=state)                                # Eq. 7
        return self.W_out(r[:, self.n_p:n]).to(h_dtype), state                     # Eq. 8 / Eq. 3


class TitansMemoryMethod(ContextMethod):
    """Base of ``mal`` / ``mac`` / ``mag``: branches hooked into LM blocks, state carried across the
    dialogue, the two-stage schedule. Subclasses set ``branch_cls`` and, if the injection changes the
    sequence, override :meth:`_inject`."""

    config_cls = TitansMemoryConfig
    uses_context = True
    branch_cls: ClassVar[type[MemoryBranch]]
    # Phase 1 at each preset is `lora`'s (LORA_PRESETS), by construction
    presets = phase1_presets({
        "smoke": dict(d_m=16, epochs=1, lr=3e-3, gate_lr=1e-2, batch_dialogues=8),
        # CPU-sized: d_m scaled to the tiny LM (D=64), larger steps than the 7B paper setting, and one
        # memory state per speaker (the paper keeps one per dialogue: `--preset paper`, or
        # `--set mal.speaker_memory=false`); see the README's "Memory per speaker"
        "default": dict(d_m=16, epochs=3, lr=3e-3, gate_lr=5e-2, batch_dialogues=8, speaker_memory=True),
    })

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA, then the memory: width d_m, N_p, placement, Phase-2 epochs and the two
        learning rates (memory and gates), after the paper's ablation axes (Sec. 3.2-3.4)."""
        return {**two_stage_search_space(trial),
                "d_m": trial.suggest_categorical("d_m", [16, 32, 64, 128]),
                "n_persistent": trial.suggest_categorical("n_persistent", [0, 4, 8]),
                "layers": trial.suggest_categorical("layers", ["all", "quartile", "0"])}

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        self.layer_ids = resolve_layers(self.config.layers, len(self.lm.layers))
        # Branches draw from their own RNG stream so that Phase 1 (init, data order, dropout) is
        # bit-identical to the `lora` method under the same seed: memory vs LoRA isolates the memory.
        with auxiliary_rng(seed):
            self.branches = nn.ModuleDict({str(l): self.branch_cls(self.lm.hidden_size, self.config,
                                                                   backbone.max_audio_tokens)
                                           for l in self.layer_ids}).to(self.lm.lm_head.weight.device)
        self._memory_removed = False
        for l, block in enumerate(self.lm.layers):
            block.register_forward_pre_hook(self._make_hook(l), with_kwargs=True)
        self._active: MemoryPass | None = None  # None: memory removed (Phase 1); else the current forward
        self.reset()

    # ------------------------------------------------------------------ the hooks
    def _make_hook(self, layer: int):
        key = str(layer)

        def hook(module, args, kwargs):
            if self._active is None:
                return None
            ctx = self._active
            kwargs.update(ctx.block_kwargs)  # after a MAC insertion: the new positions
            h = args[0]  # [B, L, D] residual stream before the block
            if key in self.branches:
                h, kwargs = self._inject(key, h, kwargs, ctx)
            return (h,) + tuple(args[1:]), kwargs
        return hook

    def _inject(self, key: str, h: torch.Tensor, kwargs: dict, ctx: MemoryPass):
        """Apply branch ``key`` to the current utterance's span of ``h [B, L, D]`` in place (MAL, MAG:
        token positions untouched). Returns the new ``(h, block kwargs)``."""
        s, e = ctx.span
        h_tilde, ctx.states[key] = self.branches[key](h[:, s:e], ctx.states.get(key))
        return torch.cat([h[:, :s], h_tilde, h[:, e:]], dim=1), kwargs

    @contextmanager
    def memory_active(self, states: dict) -> Iterator[MemoryPass]:
        """Run LM forwards with the memory on, reading and updating ``states`` (layer key -> NeuralMemState)."""
        self._active = MemoryPass(states)
        try:
            yield self._active
        finally:
            self._active = None

    def _forward_turn(self, ctx: MemoryPass, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """Label logits ``[B, C]`` for one turn of B equal-shape dialogues, memory on."""
        batch = self.lm.batch([[Segment(e)] for e in embeddings])
        ctx.start(batch)
        return self.lm(batch)

    # ------------------------------------------------------------------ training (Sec. 3.4)
    def memory_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the branches' {W_in, W_out, M, P, ...}, their gates)."""
        gates = [p for b in self.branches.values() for p in b.gate_parameters()]
        gate_ids = {id(p) for p in gates}
        rest = [p for b in self.branches.values() for p in b.parameters() if id(p) not in gate_ids]
        return rest, gates

    def fit(self, train, dev, progress=None):
        c = self.config
        # Phase 1: task adaptation with the memory removed, exactly as `lora` (dev scored the same way)
        self._memory_removed = True
        try:
            fit_task_lora(self, self.lora_params, c.lora, train, dev, progress)
        finally:
            self._memory_removed = False
        for p in self.lora_params.values():
            p.requires_grad_(False)
        # Phase 2: memory training, LoRA and backbone frozen
        rest, gates = self.memory_parameters()
        opt_rest = torch.optim.AdamW(rest, lr=c.lr)
        opt_gate = torch.optim.AdamW(gates, lr=c.gate_lr, weight_decay=0.0) if gates else None
        # memory streams with identical shapes share a batched memory (titans-pytorch keeps one
        # sequence index per batched state). A stream is a dialogue, or with speaker memory one
        # speaker's utterances in turn order: each utterance then reads and writes only its own
        # speaker's state and its input is that utterance alone, so the speakers' streams are
        # independent sequences and train as such
        buckets = defaultdict(list)
        device = self.lm.lm_head.weight.device
        for d in train:
            embs = [self.backbone.audio_embeddings(u.input) for u in d.utterances]
            keys = self._stream_keys(d.inputs())
            for k in sorted(set(keys)):
                turns = [t for t, key in enumerate(keys) if key == k]
                buckets[tuple(embs[t].shape[0] for t in turns)].append(
                    ([embs[t] for t in turns], torch.tensor([d.labels[t] for t in turns], device=device)))
        losses = self.curves.setdefault(f"{self.name}_train_loss", [])
        gate_curve = self.curves.setdefault(f"{self.name}_mean_gate", []) if gates else None
        dev_scores = self.curves.setdefault(f"{self.name}_dev_{c.selection_metric}", [])
        # Phase 2 replaces Phase 1 only if it beats it on dev
        best = BestCheckpoint(self._memory_state, self._load_memory_state,
                              score=evaluate(self, dev, self.labels)[c.selection_metric])
        for epoch in range(c.epochs):
            self.branches.train()
            batches = [group[i:i + c.batch_dialogues] for group in buckets.values()
                       for i in range(0, len(group), c.batch_dialogues)]
            for bi in self.rng.permutation(len(batches)):
                group = batches[bi]
                with self.memory_active({}) as ctx:
                    loss, n_scored = 0.0, 0
                    for t in range(len(group[0][0])):
                        logits = self._forward_turn(ctx, [embs[t] for embs, _ in group])
                        y_t = torch.stack([y[t] for _, y in group])
                        # context-only utterances update the memory but are no target
                        loss = loss + nn.functional.cross_entropy(logits, y_t, ignore_index=UNSCORED, reduction="sum")
                        n_scored += int((y_t != UNSCORED).sum())
                    if n_scored == 0:
                        continue
                    loss = loss / n_scored
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.name} phase 2: non-finite training loss at epoch {epoch}")
                opt_rest.zero_grad()
                if opt_gate is not None:
                    opt_gate.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(rest, c.grad_clip)
                opt_rest.step()
                if opt_gate is not None:
                    nn.utils.clip_grad_norm_(gates, c.gate_grad_clip)
                    opt_gate.step()
                losses.append(loss.item())
            self.branches.eval()
            if gate_curve is not None:
                gate_curve.append(self.mean_gate())
            score = dev_epoch_score(self, dev, c.selection_metric, dev_scores,
                                    f"{self.name} epoch {epoch + 1}/{c.epochs}", progress)
            best.offer(score, epoch)
        best.restore()

    def mean_gate(self) -> float:
        """A scalar summary of how open the gates are (logged per Phase-2 epoch)."""
        return float("nan")

    def _memory_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.branches.state_dict().items()}

    def _load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        self.branches.load_state_dict(state)

    # ------------------------------------------------------------------ streaming evaluation (Eq. 1)
    def _stream_keys(self, utterances: Sequence[UtteranceInput]) -> list[int]:
        """Which memory state each turn uses: 0 for all (one per dialogue), or the speaker's index in
        order of first appearance (``speaker_memory``)."""
        if not self.config.speaker_memory:
            return [0] * len(utterances)
        order: dict[str, int] = {}
        return [order.setdefault(u.speaker, len(order)) for u in utterances]

    def reset(self) -> None:
        # S_0: no NeuralMemState (a fresh memory) for every branch, per memory stream
        self.states: dict = {}  # stream key (0, or the speaker) -> layer key -> NeuralMemState

    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        if self._memory_removed:  # Phase 1 dev scoring: the host + LoRA alone, batched like `lora`
            return UtteranceLevelMethod.predict_dialogue(self, utterances)
        return super().predict_dialogue(utterances)

    @torch.no_grad()
    def step(self, utterance: UtteranceInput) -> np.ndarray:
        self.lm.eval()
        self.branches.eval()
        stream = utterance.speaker if self.config.speaker_memory else 0
        with self.memory_active(self.states.setdefault(stream, {})) as ctx:
            logits = self._forward_turn(ctx, [self.backbone.audio_embeddings(utterance)])
        return torch.softmax(logits.float(), -1).numpy()[0]

    def trained_parameters(self):
        params = dict(self.lora_params)
        params.update({f"{self.name}.{n}": p for n, p in self.branches.named_parameters()})
        return params
