"""Context headroom probe: how much can the dialogue history add on a backbone's audio embeddings?

Before blaming a memory method for not beating LoRA, check what its inputs allow. Trains one small
classifier per *context feature* on the frozen audio-token embeddings (no LM, no LoRA) and reports
test accuracy overall and by the number of the speaker's earlier utterances in the dialogue:

* ``none``: the current utterance only (mean-pooled embeddings ``[D]``);
* ``speaker_mean``: plus the mean of the same speaker's earlier utterances (an oracle feature: it
  uses the speaker labels, which MAL never sees);
* ``dialogue_mean``: plus the mean of all earlier utterances of the dialogue (speaker-agnostic);
* ``memory``: plus a titans-pytorch NeuralMemory read-out trained end to end: MAL's branch
  (Titans-as-a-Layer Eq. 6-8, one memory update per utterance; here a depth-1 memory of width
  ``d_m``) with a trainable head instead of the frozen host LM.

Run: ``python -m benchbench.tools.headroom [--n-train 160]`` (default: the preset's 480 training
dialogues). Dev unused, test scored.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from benchbench.analysis import HISTORY_BINS, history_bin
from benchbench.backbone import make_backbone
from benchbench.data import speaker_history_counts
from benchbench.task import TASKS

FEATURES = ("none", "speaker_mean", "dialogue_mean", "memory")


def _tensors(backbone, dialogues):
    """Equal-shape dialogues -> embeddings ``[N, turns, T, D]``, labels, speaker-history counts,
    speaker-mean and dialogue-mean features ``[N, turns, D]``."""
    E = torch.stack([torch.stack([backbone.audio_features(u.input) for u in d.utterances]) for d in dialogues])
    pooled = E.mean(2)
    spk, dlg = torch.zeros_like(pooled), torch.zeros_like(pooled)
    for n, d in enumerate(dialogues):
        for i, u in enumerate(d.utterances):
            same = [j for j in range(i) if d.utterances[j].input.speaker == u.input.speaker]
            if same:
                spk[n, i] = pooled[n, same].mean(0)
            if i:
                dlg[n, i] = pooled[n, :i].mean(0)
    Y = torch.tensor([list(d.labels) for d in dialogues])
    K = torch.tensor([speaker_history_counts(d.inputs()) for d in dialogues])
    return E, Y, K, spk, dlg


class _Probe(nn.Module):
    def __init__(self, feature: str, dim: int, n_labels: int, max_tokens: int, d_m: int):
        super().__init__()
        from benchbench.methods.mal import MALBranch, MALConfig

        self.feature = feature
        if feature == "memory":
            self.branch = MALBranch(dim, MALConfig(d_m=d_m, memory_depth=1), max_tokens)
        self.head = nn.Sequential(nn.Linear(2 * dim, 64), nn.GELU(), nn.Linear(64, n_labels))

    def forward(self, E, spk, dlg):  # -> logits [N, turns, C]
        out, state = [], None
        for t in range(E.shape[1]):
            h = E[:, t]
            if self.feature == "memory":
                delta, state = self.branch.retrieve(h, state)
                ctx = delta.mean(1)
            else:
                ctx = {"none": torch.zeros_like(spk[:, t]), "speaker_mean": spk[:, t], "dialogue_mean": dlg[:, t]}[self.feature]
            out.append(self.head(torch.cat([h.mean(1), ctx], -1)))
        return torch.stack(out, 1)


def probe(task_name: str = "synthetic", backbone_name: str = "tiny-qwen2-audio", preset: str = "default",
          task_overrides: dict | None = None, epochs: int = 20, features=FEATURES, seed: int = 0,
          d_m: int = 32) -> dict:
    """Test accuracy (fraction) per context feature, overall and by speaker history (0, 1, 2, 3+).

    Raises ``ValueError`` if the task's dialogues do not all have the same shape (the probe batches
    whole dialogues; the ``synthetic`` task's do).
    """
    task = TASKS.get(task_name)(preset=preset, **(task_overrides or {}))
    fold = task.folds()[0]
    backbone = make_backbone(backbone_name)
    tr, te = _tensors(backbone, fold.train), _tensors(backbone, fold.test)
    results = {}
    for feature in features:
        torch.manual_seed(seed)
        model = _Probe(feature, tr[0].shape[-1], len(task.labels), backbone.max_audio_tokens, d_m)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(tr[0]))
            for i in range(0, len(perm), 16):
                b = perm[i:i + 16]
                logits = model(tr[0][b], tr[3][b], tr[4][b])
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), tr[1][b].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            ok = (model(te[0], te[3], te[4]).argmax(-1) == te[1]).float()
        k = te[2].clamp(max=HISTORY_BINS[-1])
        results[feature] = {"wa": float(ok.mean()),
                            "by_speaker_history": {history_bin(i): float(ok[k == i].mean())
                                                   for i in HISTORY_BINS if (k == i).any()}}
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="synthetic")
    ap.add_argument("--backbone", default="tiny-qwen2-audio")
    ap.add_argument("--n-train", type=int, default=None, help="synthetic: training dialogues")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args(argv)
    overrides = {"n_train": args.n_train} if args.n_train else {}
    print(json.dumps(probe(args.task, args.backbone, task_overrides=overrides, epochs=args.epochs), indent=2))


if __name__ == "__main__":
    main()
