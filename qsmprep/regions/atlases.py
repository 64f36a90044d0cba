"""Atlases of the regional statistics (``--regions-atlas``), found on disk only.

* ``QSMChallenge`` (the default): the embedded deep grey matter labels
  (:func:`qsmprep.regions.templates.embedded_atlas`).
* A TemplateFlow atlas whose ``dseg`` image and lookup table are already
  under ``$TEMPLATEFLOW_HOME``: ``MASSP20`` (short for
  ``MNI152NLin2009cAsym:atlas-MASSP20``) or ``<template>:atlas-<label>``
  with optional ``:desc-<label>`` and ``:res-<label>`` (fMRIPrep's
  ``--output-spaces`` syntax). Files are found with ``glob``; the TemplateFlow
  client, which downloads, is never called.

The atlas' labels are mapped to qsmprep's region names where they are the
same structure (:data:`REGION_ALIASES`: hemispheres and subdivisions merged,
e.g. MASSP's left/right globus pallidus interna/externa into
``globus_pallidus``); every other label is kept under its own name
(:func:`merge_regions`). The merged regions keep the embedded atlas' indices
(1-7), the others follow from 8 in the atlas' order.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .make_atlas import DEEP_GM
from .templates import DEFAULT_TEMPLATE, embedded_atlas, is_image_file, templateflow_home

#: the template of a bare atlas label (``--regions-atlas MASSP20``): fMRIPrep's default
DEFAULT_ATLAS_TEMPLATE = "MNI152NLin2009cAsym"
#: largest number of regions after merging (the labels are written as uint8)
MAX_REGIONS = 255

#: atlas label name (lower case, hemisphere removed, '-' separated) -> qsmprep region.
#: MASSP (Bazin et al. 2020; TemplateFlow's MASSP20), CIT168 (Pauli et al. 2018)
#: abbreviations and FreeSurfer aseg names. Not the hippocampal "dentate gyrus".
REGION_ALIASES = {
    "caudate": "caudate", "caudate-nucleus": "caudate", "ca": "caudate",
    "putamen": "putamen", "pu": "putamen",
    "globus-pallidus": "globus_pallidus", "pallidum": "globus_pallidus",
    "globus-pallidus-interna": "globus_pallidus",
    "globus-pallidus-externa": "globus_pallidus",
    "globus-pallidus-internus": "globus_pallidus",
    "globus-pallidus-externus": "globus_pallidus",
    "gp": "globus_pallidus", "gpi": "globus_pallidus", "gpe": "globus_pallidus",
    "red-nucleus": "red_nucleus", "rn": "red_nucleus",
    "dentate-nucleus": "dentate_nucleus", "cerebellar-dentate": "dentate_nucleus",
    "dentate-nucleus-cerebellum": "dentate_nucleus", "dn": "dentate_nucleus",
    "substantia-nigra": "substantia_nigra_stn", "sn": "substantia_nigra_stn",
    "substantia-nigra-pars-compacta": "substantia_nigra_stn", "snc": "substantia_nigra_stn",
    "substantia-nigra-pars-reticulata": "substantia_nigra_stn", "snr": "substantia_nigra_stn",
    "subthalamic-nucleus": "substantia_nigra_stn", "subthalamic-nuclei": "substantia_nigra_stn",
    "stn": "substantia_nigra_stn",
    "thalamus": "thalamus", "thalamus-proper": "thalamus", "tha": "thalamus",
}
_HEMISPHERE = re.compile(r"^(left|right|lh|rh|l|r)-|-(left|right|lh|rh|l|r)$")


class AtlasNotFoundError(FileNotFoundError):
    """A requested atlas is not on this machine (or not usable); the message says why."""


@dataclass(frozen=True)
class Atlas:
    """A regions atlas: its label, template space and files."""

    name: str  # "QSMChallenge", "MASSP20"
    space: str  # the template its labels are drawn on
    dseg: Path
    lut: Path

    @property
    def embedded(self):
        return self.name == DEFAULT_TEMPLATE


def parse_atlas(text):
    """``"MASSP20"`` / ``"MNI152NLin2009cAsym:atlas-MASSP20:res-1"`` ->
    ``(template, {"atlas": ..., "desc": ..., "res": ...})``; a ValueError otherwise."""
    name, *mods = str(text).strip().split(":")
    if not name.isalnum():
        raise ValueError(f"regions atlas {text!r}: expected QSMChallenge, a TemplateFlow atlas "
                         "label such as MASSP20, or <template>:atlas-<label>[:desc-<label>]"
                         "[:res-<label>]")
    if name == DEFAULT_TEMPLATE and not mods:
        return name, {}
    spec = {}
    for mod in mods:
        key, sep, value = mod.partition("-")
        if not sep or key not in ("atlas", "desc", "res") or not value.isalnum():
            raise ValueError(f"regions atlas {text!r}: modifier {mod!r} is not atlas-<label>, "
                             "desc-<label> or res-<label>")
        spec[key] = value
    if not mods:
        return DEFAULT_ATLAS_TEMPLATE, {"atlas": name}
    if "atlas" not in spec:
        raise ValueError(f"regions atlas {text!r}: name the atlas, e.g. {name}:atlas-MASSP20")
    return name, spec


def _entities(path):
    stem = path.name.split(".")[0]
    return dict(part.split("-", 1) for part in stem.split("_")[:-1] if "-" in part)


def _res_key(value):
    try:
        return float(value.replace("p", "."))
    except (AttributeError, ValueError):
        return 0.0  # no res- entity: the template's native grid


def find_atlas(text):
    """The :class:`Atlas` named by ``text`` (``--regions-atlas``), on disk.

    Raises :class:`AtlasNotFoundError` naming the folder searched and the fix.
    """
    template, spec = parse_atlas(text)
    if template == DEFAULT_TEMPLATE and not spec:
        files = embedded_atlas()
        return Atlas(DEFAULT_TEMPLATE, DEFAULT_TEMPLATE, files["dseg"], files["lut"])
    label = spec["atlas"]
    home = templateflow_home()
    folder = home / f"tpl-{template}"
    matches, placeholders = [], []
    for path in sorted(folder.glob(f"**/tpl-{template}_*dseg.nii.gz")):
        ent = _entities(path)
        if ent.get("atlas") != label or ent.get("desc") != spec.get("desc", ent.get("desc")):
            continue
        if "res" in spec and _res_key(ent.get("res", "")) != _res_key(spec["res"]):
            continue
        (matches if is_image_file(path) else placeholders).append(path)
    descs = sorted({_entities(p).get("desc") or "" for p in matches})
    if len(descs) > 1 and "desc" not in spec:
        raise AtlasNotFoundError(
            f"Regions atlas {text}: {folder} holds several versions of atlas-{label} "
            f"(desc-{', desc-'.join(d or '(none)' for d in descs)}); choose one with "
            f"{template}:atlas-{label}:desc-<label>")
    if not matches:
        found = sorted({_entities(p).get("atlas") for p in folder.glob(
            f"**/tpl-{template}_*atlas-*_dseg.nii.gz") if is_image_file(p)} - {None})
        fetch = (f"python -c \"from templateflow import api; api.get('{template}', "
                 f"atlas='{label}', suffix='dseg')\"")
        raise AtlasNotFoundError(
            f"Regions atlas {text}: no atlas-{label} dseg image under {folder} "
            f"(TEMPLATEFLOW_HOME={home})"
            + (" (only unfetched placeholders)" if placeholders else "")
            + f"; atlases there: {', '.join(found) or 'none'}. qsmprep never downloads at run "
            f"time: fetch it beforehand on a machine with internet ({fetch}) and copy {home} "
            f"over, or use the embedded {DEFAULT_TEMPLATE}")
    dseg = min(matches, key=lambda p: _res_key(_entities(p).get("res", "")))  # finest
    stem = dseg.name[: -len(".nii.gz")]
    # TemplateFlow keeps one table for every resolution (and threshold, desc-th<n>)
    no_res = re.sub(r"_res-[^_]+", "", stem)
    names = list(dict.fromkeys([stem, no_res, re.sub(r"_desc-[^_]+", "", no_res)]))
    luts = [d / f"{n}.tsv" for n in names for d in dict.fromkeys([dseg.parent, folder])]
    lut = next((p for p in luts if p.is_file()), None)
    if lut is None:
        raise AtlasNotFoundError(
            f"Regions atlas {text}: {dseg} has no lookup table ({' or '.join(names)}.tsv); "
            "fetch it with the image (suffix='dseg', extension='.tsv')")
    regions = merge_regions(read_lut_rows(lut))[0]
    if regions and regions[-1][0] > MAX_REGIONS:
        raise AtlasNotFoundError(
            f"Regions atlas {text}: {len(regions)} regions in {lut.name}, more than the "
            f"{MAX_REGIONS} a regions dseg holds; choose an atlas of subcortical structures "
            "such as MASSP20")
    return Atlas(label, template, dseg, lut)


def read_lut_rows(path):
    """A BIDS dseg lookup table -> ``[(index, name)]``; an error naming the file
    when it lacks the ``index`` and ``name`` columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not {"index", "name"} <= set(reader.fieldnames or ()):
            raise AtlasNotFoundError(
                f"Regions atlas lookup table {path}: expected the BIDS columns index and "
                f"name, found {', '.join(reader.fieldnames or ()) or 'none'}")
        return [(int(row["index"]), row["name"].strip()) for row in reader
                if row["index"].strip() and int(row["index"]) != 0]


def region_for(label_name):
    """qsmprep's region name for an atlas label (``"left-globus-pallidus-externa"`` ->
    ``"globus_pallidus"``), or None when it is not one of the seven deep nuclei."""
    key = re.sub(r"[\s_.]+", "-", label_name.strip().lower())
    key = _HEMISPHERE.sub("", key)
    return REGION_ALIASES.get(key)


def merge_regions(rows):
    """``[(index, name)]`` of an atlas -> ``(regions, mapping)``.

    ``regions``: ``[(new index, name, [atlas names])]``, the seven deep nuclei
    first with their embedded indices (only those the atlas has), then every
    other label under its own name (indices from 8). ``mapping``: atlas index
    -> new index.
    """
    ours = {name: index for index, (name, _) in DEEP_GM.items()}
    merged, others, mapping = {}, [], {}
    for index, name in rows:
        region = region_for(name)
        if region:
            merged.setdefault(region, []).append(name)
            mapping[index] = ours[region]
        else:
            others.append((index, name))
    regions = [(ours[r], r, merged[r]) for r in sorted(merged, key=ours.get)]
    next_index = max(ours.values()) + 1
    for index, name in others:
        regions.append((next_index, name, [name]))
        mapping[index] = next_index
        next_index += 1
    return regions, mapping


def remap_labels(labels, mapping):
    """Atlas labels -> merged region indices (:func:`merge_regions`); labels
    missing from the lookup table become 0 (unlabelled)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.uint8)
    top = max(int(labels.max()), max(mapping, default=0))
    lut = np.zeros(top + 1, np.uint8)
    for old, new in mapping.items():
        if old >= 0:
            lut[old] = new
    values = np.clip(np.rint(labels).astype(np.int64), 0, top)
    return lut[values]


def write_merged_lut(path, regions):
    """The merged lookup table: ``index``, ``name``, ``atlas_labels`` (the atlas'
    labels of each region, ``+``-joined)."""
    from ..utils.files import write_text

    lines = ["index\tname\tatlas_labels"] + [f"{i}\t{name}\t{'+'.join(src)}"
                                              for i, name, src in regions]
    return write_text(path, "\n".join(lines) + "\n")

