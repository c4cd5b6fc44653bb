"""Loading real backbones' checkpoints: shared by every family in ``backbones/``.

Nothing is downloaded unless ``allow_download`` is given (``bench run --allow-download``); a missing
checkpoint raises :class:`BackboneWeightsMissing`, whose message names the command to run.
"""

from __future__ import annotations

from pathlib import Path

import torch

PRETRAINED_OPTIONS = ("weights", "dtype", "device", "device_map", "allow_download")
"""The options every real backbone's ``build`` takes (``bench run --weights/--dtype/--device/
--device-map/--allow-download``)."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class BackboneWeightsMissing(FileNotFoundError):
    """A real backbone's weights are not on disk (the message says what to download and where)."""


def installed_package_file(name: str, dist: str, version: str, rel: str, pip_install: str) -> Path:
    """The file ``rel`` inside the installed distribution ``dist`` (weights shipped as package data),
    found through its metadata (``importlib.metadata``: the package is never imported).

    Raises:
        BackboneWeightsMissing: ``dist`` is not installed, or has no ``rel`` (expected ``version``);
            the message starts with ``name`` and ends with the ``pip_install`` command.
    """
    from importlib import metadata

    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise BackboneWeightsMissing(f"{name}: the weights package {dist} is not installed: `{pip_install}`") from None
    path = Path(d.locate_file(rel))
    if not path.is_file():
        raise BackboneWeightsMissing(f"{name}: {dist} {d.version} has no {rel} (expected {dist}=={version}): "
                                     f"`{pip_install}`")
    return path


def check_load_options(name: str, dtype: str | None, device: str | None, device_map: str | None):
    """``torch.dtype`` (or ``None``: the checkpoint's own) for ``dtype``; ``ValueError`` for an unknown
    dtype or for both ``device`` and ``device_map``."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"backbone {name}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if device and device_map:
        raise ValueError(f"backbone {name}: pass --device or --device-map, not both")
    return DTYPES[dtype] if dtype else None


def resolve_weights(name: str, hub_id: str, size: str, weights: str | None, allow_download: bool = False) -> Path:
    """A local folder with the backbone's checkpoint: ``weights`` when it is a folder, else the
    Hugging Face cache entry of ``weights`` (a hub id) or of ``hub_id``.

    Raises:
        BackboneWeightsMissing: nothing on disk and downloads not allowed (names the command to run
        and the size, ``size``).
    """
    if weights and Path(weights).expanduser().is_dir():
        path = Path(weights).expanduser()
        if not (path / "config.json").is_file():
            raise BackboneWeightsMissing(f"backbone {name}: {path} has no config.json (is it a checkpoint folder "
                                         f"of {hub_id}?)")
        return path
    repo = weights or hub_id
    if weights and ("/" not in weights or weights.startswith((".", "/", "~"))):
        raise BackboneWeightsMissing(f"backbone {name}: --weights {weights} is not a folder. Download the "
                                     f"checkpoint: `huggingface-cli download {hub_id} --local-dir {weights}`")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=not allow_download))
    except Exception as e:
        raise BackboneWeightsMissing(
            f"backbone {name}: weights for {repo} are not on this machine ({type(e).__name__}). Download them "
            f"({size}): `huggingface-cli download {repo} --local-dir DIR` and pass `--weights DIR`, "
            f"or allow the download with `--allow-download`") from None


def load_transformers_model(model_class: str, path: Path, dtype: torch.dtype | None, device: str | None,
                            device_map: str | None):
    """``(model, feature_extractor, tokenizer)`` of a transformers audio-LLM checkpoint folder via
    ``transformers.<model_class>.from_pretrained`` (never remote code)."""
    import transformers

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if device_map:
        kwargs["device_map"] = device_map
    model = getattr(transformers, model_class).from_pretrained(path, **kwargs)
    if device:
        model.to(device)
    return model, transformers.AutoFeatureExtractor.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
