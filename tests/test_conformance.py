"""The shared conformance suite, on every registered method."""

import pytest

from benchbench.method import METHODS
from benchbench.testing import run_conformance


@pytest.mark.parametrize("name", METHODS.names())
def test_method_conforms(name, backbone, tiny_task):
    run_conformance(name, backbone, tiny_task)


def test_every_registry_entry_resolves():
    from benchbench.backbone import BACKBONES
    from benchbench.task import TASKS

    for reg in (METHODS, TASKS):  # a registry name resolves to the class that carries that name
        for n in reg.names():
            assert reg.get(n).name == n
    from benchbench.backbone import backbone_spec

    assert BACKBONES.names() and all(backbone_spec(n).name == n and callable(backbone_spec(n).build)
                                     for n in BACKBONES.names())


def test_unknown_name_suggests():
    with pytest.raises(KeyError, match="Did you mean 'lora'"):
        METHODS.get("lroa")
