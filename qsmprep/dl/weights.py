"""Registry of shipped network weights, checked against a sha256 manifest.

Files live in ``qsmprep/data/models/``: ``<name>.pt`` (a dict with the model
``config`` and its ``state_dict``, floating tensors stored as float16 to keep
the package small), ``<name>.md`` (the model card: data, steps, wall time,
hardware, validation metrics) and ``manifest.json`` mapping every file to its
sha256 and size. :func:`load_weights` refuses a file whose hash differs.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from ..utils.files import atomic_write, write_text

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
MANIFEST = "manifest.json"


class WeightsError(RuntimeError):
    """Shipped weights are missing or do not match the manifest."""


def sha256(path):
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(models_dir=None):
    """The manifest (file name -> {"sha256", "bytes"}); empty if absent."""
    path = Path(models_dir or MODELS_DIR) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def verify(filename, models_dir=None):
    """Path of a shipped file after checking its sha256 against the manifest."""
    models_dir = Path(models_dir or MODELS_DIR)
    path = models_dir / filename
    entry = read_manifest(models_dir).get(filename)
    if not path.exists() or entry is None:
        raise WeightsError(
            f"No shipped file {filename!r} in {models_dir}. Train and export it with "
            f"`qsmprep-train {filename.split('.')[0]} --out DIR --export`."
        )
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise WeightsError(
            f"{path} is corrupted or was changed: sha256 {digest} does not match the "
            f"manifest ({entry['sha256']}). Reinstall qsmprep or retrain with "
            f"`qsmprep-train {filename.split('.')[0]} --out DIR --export`."
        )
    return path


def load_weights(name, models_dir=None):
    """``{"config": dict, "state_dict": float32 tensors, "meta": dict}`` of model
    ``name`` after checking its sha256; :class:`WeightsError` otherwise."""
    path = verify(f"{name}.pt", models_dir)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    blob["state_dict"] = {
        k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()
    }
    return blob


def save_file(filename, data, models_dir=None):
    """Write ``data`` (bytes) as a shipped file and record it in the manifest."""
    models_dir = Path(models_dir or MODELS_DIR)
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / filename
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    manifest = read_manifest(models_dir)
    manifest[filename] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    write_text(models_dir / MANIFEST, json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return path


def save_weights(name, model, meta=None, models_dir=None):
    """Ship ``model`` (with a ``config`` attribute) as ``<name>.pt``."""
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"config": model.config, "state_dict": state, "meta": dict(meta or {})}, buf)
    return save_file(f"{name}.pt", buf.getvalue(), models_dir)
