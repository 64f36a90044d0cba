"""Templates and atlases, found on this machine only: qsmprep never downloads.

* ``QSMChallenge`` (the default): shipped in ``qsmprep/data/atlas`` — a
  GRE-magnitude-like template built from the QSM Challenge 2.0 head model
  with its seven deep grey matter labels (``python -m qsmprep.regions.make_atlas``).
* TemplateFlow templates (e.g. ``MNI152NLin2009cAsym``) when their files are
  already under ``$TEMPLATEFLOW_HOME`` (the container prefetches them at build
  time). They are looked up on disk with ``glob``; the ``templateflow``
  client, which fetches missing files from the internet, is never called.
* TemplateFlow atlases of the regions (``--regions-atlas MASSP20``) are found
  the same way, by :mod:`qsmprep.regions.atlases`.

Output-space specifications follow fMRIPrep (``--output-spaces``):
``native``, ``<template>`` or ``<template>:res-<label>`` (``res-native`` or a
number; ``cohort-<label>`` is accepted as well).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

#: the embedded template's name (a BIDS ``space-`` label)
DEFAULT_TEMPLATE = "QSMChallenge"
#: TemplateFlow image suffixes usable as the registration target, best first
#: (no TemplateFlow template has a GRE magnitude; T2w and T1w are the closest)
TEMPLATEFLOW_SUFFIXES = ("T2starw", "T2w", "T1w")


class TemplateNotFoundError(FileNotFoundError):
    """A requested template is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class Space:
    """One ``--output-spaces`` entry."""

    name: str
    spec: dict = field(default_factory=dict)

    @property
    def is_native(self):
        return self.name == "native"

    @property
    def label(self):
        """BIDS ``space-`` label (``res``/``cohort`` go to their own entities)."""
        return self.name

    def __str__(self):
        return ":".join([self.name] + [f"{k}-{v}" for k, v in self.spec.items()])


def parse_space(text):
    """``"MNI152NLin2009cAsym:res-2"`` -> :class:`Space`; a ValueError otherwise."""
    name, *mods = text.strip().split(":")
    if not name.isalnum():
        raise ValueError(f"output space {text!r}: expected native, a template name such as "
                         "MNI152NLin2009cAsym or QSMChallenge, optionally with :res-<n>")
    spec = {}
    for mod in mods:
        key, sep, value = mod.partition("-")
        if not sep or key not in ("res", "cohort") or not value.isalnum():
            raise ValueError(f"output space {text!r}: modifier {mod!r} is not res-<label> "
                             "or cohort-<label>")
        spec[key] = value
    if name == "native" and spec:
        raise ValueError(f"output space {text!r}: native takes no modifiers")
    return Space(name, spec)


def embedded_atlas():
    """Paths of the shipped template, its deep grey matter dseg and lookup table."""
    from .make_atlas import DSEG, LUT, TEMPLATE

    root = Path(str(resources.files("qsmprep").joinpath("data", "atlas")))
    return {"template": root / TEMPLATE, "dseg": root / DSEG, "lut": root / LUT}


def is_image_file(path):
    """Whether ``path`` holds an image rather than an unfetched placeholder (an empty
    file, a git-annex/DataLad pointer or a broken link): gzip data for ``.gz``."""
    try:
        with open(path, "rb") as f:
            head = f.read(348)
    except OSError:
        return False
    return head[:2] == b"\x1f\x8b" if str(path).endswith(".gz") else len(head) == 348


def templateflow_home():
    """``$TEMPLATEFLOW_HOME``, else TemplateFlow's default: ``templateflow`` in the
    user's cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(os.environ.get("TEMPLATEFLOW_HOME") or Path(cache) / "templateflow").expanduser()


def templateflow_templates(home):
    """The template identifiers in the TemplateFlow home ``home`` (sorted), as
    ``templateflow.api.templates()`` lists them: the ``<id>`` of each
    ``tpl-<id>`` folder (letters and digits, TemplateFlow's ``template``
    entity) that holds a file (a DataLad link not yet fetched counts), hidden
    ones left out."""
    def shown(path):
        return not path.is_dir() and not any(
            part.startswith(".") for part in path.relative_to(home).parts)

    names = set()
    for folder in Path(home).glob("tpl-*"):
        match = re.match(r"tpl-([a-zA-Z0-9]+)", folder.name)
        if match and folder.is_dir() and any(map(shown, folder.rglob("*"))):
            names.add(match.group(1))
    return sorted(names)


def find_template(space, suffixes=TEMPLATEFLOW_SUFFIXES):
    """The registration target of ``space`` (a :class:`Space` or its name), on disk:
    its image of the first of ``suffixes`` found (T1w first when a T1w is registered).

    Raises :class:`TemplateNotFoundError` naming the folder searched and the fix.
    """
    space = parse_space(space) if isinstance(space, str) else space
    if space.name == DEFAULT_TEMPLATE:
        return embedded_atlas()["template"]
    home = templateflow_home()
    folder = home / f"tpl-{space.name}"
    cohort = f"cohort-{space.spec['cohort']}" if "cohort" in space.spec else None
    res = space.spec.get("res")
    candidates = []
    for suffix in suffixes:
        for path in sorted(folder.glob(f"**/tpl-{space.name}_*{suffix}.nii.gz")):
            parts = path.name.split("_")
            if "desc-brain" in path.name or (cohort and cohort not in parts):
                continue
            if res not in (None, "native") and f"res-{int(res):02d}" not in parts \
                    and f"res-{res}" not in parts:
                continue
            if not is_image_file(path):  # a git-annex/DataLad pointer, not the image
                continue
            candidates.append(path)
        if candidates:
            break
    if not candidates:
        raise TemplateNotFoundError(
            f"Template {space} not found under {folder} (TEMPLATEFLOW_HOME={home}); "
            "qsmprep never downloads at run time: fetch it beforehand, e.g. "
            f"python -c \"from templateflow import api; api.get('{space.name}', "
            f"suffix='T1w', desc=None)\" on a machine with internet, and copy "
            f"{home} over, or use the embedded {DEFAULT_TEMPLATE}")
    return candidates[0]
