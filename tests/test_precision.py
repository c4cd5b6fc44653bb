"""Every method on a backbone in bfloat16 (``--dtype bf16``, as the real backbones run on a GPU): the
tiny backbones take the real ones' dtype and device options; cast on this CPU, every method trains
and predicts finite probabilities, and the memory branches and temporary LoRAs keep float32."""

import numpy as np
import pytest
import torch

from benchbench.backbone import backbone_label, make_backbone
from benchbench.method import METHODS
from benchbench.training import seed_everything


@pytest.fixture(scope="module")
def bf16_backbone(_isolated_cache):
    return make_backbone("tiny-qwen2-audio", {"dtype": "bf16"})


def test_tiny_backbone_dtype_is_a_load_option(bf16_backbone, backbone):
    assert {p.dtype for p in bf16_backbone.model.parameters()} == {torch.bfloat16}
    assert backbone_label("tiny-qwen2-audio", {"dtype": "bf16", "device": "cpu"}) == "tiny-qwen2-audio"
    # the same init, cast: the identity (features, Phase-1 cache) changes with the dtype
    w32 = backbone.model.model.language_model.layers[0].mlp.up_proj.weight
    w16 = bf16_backbone.model.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(w32.to(torch.bfloat16), w16)
    assert bf16_backbone.key != backbone.key and bf16_backbone.lm_key != backbone.lm_key
    with pytest.raises(ValueError, match="tiny-qwen2-audio: dtype 'int8'"):
        make_backbone("tiny-qwen2-audio", {"dtype": "int8"})


@pytest.mark.parametrize("name", ["zero_shot", "lora", "full_context", "mal", "mac", "mag", "dpm"])
def test_every_method_trains_and_predicts_in_bf16(name, bf16_backbone, tiny_task):
    fold = tiny_task.folds()[0]
    cls = METHODS.get(name)
    with bf16_backbone.lend_lm():
        seed_everything(0)
        m = cls(bf16_backbone, tiny_task.labels, cls.make_config("smoke"), seed=0)
        m.fit(fold.train, fold.dev)
        probs = m.predict_dialogues([d.inputs() for d in fold.test])
        trained = m.trained_parameters()
    p = np.concatenate(probs)
    assert p.shape == (sum(len(d) for d in fold.test), len(tiny_task.labels))
    assert np.isfinite(p).all() and np.allclose(p.sum(-1), 1, atol=1e-3)
    for k, v in trained.items():
        assert torch.isfinite(v).all(), k
