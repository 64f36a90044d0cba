"""Thin Nipype interfaces of the template registration and regional statistics.

Each reads its files, makes one call into :mod:`qsmprep.regions` and writes
the result; the algorithms live there.
"""

from __future__ import annotations

import csv
import os

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..utils.files import atomic_write
from ..utils.images import save_like


def _out(name, runtime):
    return os.path.join(runtime.cwd, name)


class _RegistrationReferenceInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="(X, Y, Z[, E]) magnitude")


class _RegistrationReferenceOutputSpec(TraitedSpec):
    reference = File(exists=True, desc="mean magnitude over echoes (3-D)")


class RegistrationReference(SimpleInterface):
    """The moving image of the registration: the GRE magnitude averaged over
    echoes (higher SNR than echo 1, a contrast like the template's)."""

    input_spec = _RegistrationReferenceInputSpec
    output_spec = _RegistrationReferenceOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.magnitude)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data.mean(-1)
        data[~np.isfinite(data)] = 0
        self._results["reference"] = save_like(data, img, _out("gre_ref.nii.gz", runtime))
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True, desc="subject GRE reference")
    template = File(exists=True, mandatory=True, desc="template image")
    intermediate = File(exists=True, desc="T1w of the same subject: GRE -> T1w rigid, "
                        "T1w -> template")
    preset = traits.Str("default", usedefault=True, desc="iteration schedule (PRESETS)")
    num_threads = traits.Int(1, usedefault=True)
    seed = traits.Int(1, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    forward_xfm = File(exists=True, desc="GRE -> template (ITK composite .h5)")
    inverse_xfm = File(exists=True, desc="template -> GRE (ITK composite .h5)")
    template_grid = File(exists=True, desc="the template on the registration grid")


class RegisterToTemplate(SimpleInterface):
    """Rigid + affine + SyN registration of the GRE reference to a template,
    on the template resampled to the subject's voxel size when that is coarser."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from ..regions.registration import register, register_via_intermediate, \
            template_on_grid

        via = self.inputs.intermediate if isdefined(self.inputs.intermediate) else None
        vox = float(max(nb.load(via or self.inputs.moving).header.get_zooms()[:3]))
        grid = template_on_grid(self.inputs.template, vox, _out("template_grid.nii.gz", runtime))
        paths = (_out("from-GRE_to-template_xfm.h5", runtime),
                 _out("from-template_to-GRE_xfm.h5", runtime))
        kwargs = dict(preset=self.inputs.preset, threads=self.inputs.num_threads,
                      seed=self.inputs.seed)
        if via:
            fwd, inv = register_via_intermediate(self.inputs.moving, via, grid, *paths, **kwargs)
        else:
            fwd, inv = register(self.inputs.moving, grid, *paths, **kwargs)
        self._results.update(forward_xfm=str(fwd), inverse_xfm=str(inv),
                             template_grid=str(grid))
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to resample")
    reference = File(exists=True, mandatory=True, desc="grid of the output")
    transform = File(exists=True, mandatory=True, desc=".h5 transform")
    interpolation = traits.Enum("lanczos", "linear", "nearest", "label", usedefault=True)
    mask = File(exists=True, desc="zero the output outside this mask (on the output grid)")
    dtype = traits.Enum("float32", "uint8", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyTransform(SimpleInterface):
    """Resample an image through a transform (labels: ``label`` = majority vote)."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from ..regions.registration import apply_transform

        out = apply_transform(self.inputs.in_file, self.inputs.reference, self.inputs.transform,
                              None, interpolation=self.inputs.interpolation,
                              threads=self.inputs.num_threads).numpy()
        ref = nb.load(self.inputs.reference)
        if isdefined(self.inputs.mask):
            out[np.asanyarray(nb.load(self.inputs.mask).dataobj) <= 0] = 0
        dtype = np.dtype(self.inputs.dtype)
        if dtype == np.uint8:
            out = np.rint(out)
        self._results["out_file"] = save_like(out, ref, _out("resampled.nii.gz", runtime),
                                              dtype=dtype)
        return runtime


class _PrepareAtlasInputSpec(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True, desc="the atlas' label image (template space)")
    lut = File(exists=True, mandatory=True, desc="its BIDS lookup table (index, name)")


class _PrepareAtlasOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc="labels merged into qsmprep's regions (uint8)")
    lut = File(exists=True, desc="lookup table: index, name, atlas_labels")


class PrepareAtlas(SimpleInterface):
    """A TemplateFlow atlas with its labels mapped to qsmprep's region names
    (:func:`qsmprep.regions.atlases.merge_regions`), on the atlas' own grid."""

    input_spec = _PrepareAtlasInputSpec
    output_spec = _PrepareAtlasOutputSpec

    def _run_interface(self, runtime):
        from ..regions.atlases import merge_regions, read_lut_rows, remap_labels, \
            write_merged_lut

        regions, mapping = merge_regions(read_lut_rows(self.inputs.lut))
        img = nb.load(self.inputs.dseg)
        labels = remap_labels(np.asanyarray(img.dataobj), mapping)
        self._results["dseg"] = save_like(labels, img, _out("atlas_dseg.nii.gz", runtime),
                                          dtype=np.uint8)
        self._results["lut"] = str(write_merged_lut(_out("atlas_dseg.tsv", runtime), regions))
        return runtime


class _RegionStatsInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="chi map (ppm)")
    labels = File(exists=True, mandatory=True, desc="labels on the chi grid")
    lut = File(exists=True, mandatory=True, desc="lookup table (index, name, ...)")
    mask = File(exists=True, desc="where chi is defined")


class _RegionStatsOutputSpec(TraitedSpec):
    stats = File(exists=True, desc="TSV: region, label, voxels, mean, median, std, p5, p95")
    labels = File(exists=True, desc="the labels, restricted to the mask")


class RegionStats(SimpleInterface):
    """``*_desc-regions_stats.tsv`` of one run (see :func:`qsmprep.regions.stats.region_stats`)."""

    input_spec = _RegionStatsInputSpec
    output_spec = _RegionStatsOutputSpec

    def _run_interface(self, runtime):
        from ..regions.stats import STAT_COLUMNS, region_stats

        names = read_lut(self.inputs.lut)
        chi_img = nb.load(self.inputs.chi)
        chi = np.asanyarray(chi_img.dataobj, dtype=np.float64)
        labels = np.asanyarray(nb.load(self.inputs.labels).dataobj).astype(np.int32)
        mask = (np.asanyarray(nb.load(self.inputs.mask).dataobj) > 0
                if isdefined(self.inputs.mask) else None)
        rows = region_stats(chi, labels, names, mask=mask)
        path = _out("regions_stats.tsv", runtime)
        write_tsv(path, rows, ("region", "label") + STAT_COLUMNS)
        if mask is not None:
            labels[~mask] = 0
        self._results["stats"] = path
        self._results["labels"] = save_like(labels, chi_img, _out("regions_dseg.nii.gz", runtime),
                                            dtype=np.uint8)
        return runtime


def read_lut(path):
    """BIDS dseg lookup table -> {index: name}."""
    with open(path, newline="") as f:
        return {int(row["index"]): row["name"] for row in csv.DictReader(f, delimiter="\t")}


def write_tsv(path, rows, columns):
    """Rows (dicts) as a TSV, floats with 6 significant digits, NaN as n/a."""

    def fmt(value):
        if isinstance(value, (float, np.floating)):
            return "n/a" if not np.isfinite(value) else f"{value:.6g}"
        return str(value)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write("\t".join(columns) + "\n")
            for row in rows:
                f.write("\t".join(fmt(row.get(c, "n/a")) for c in columns) + "\n")

    return atomic_write(path, write)


class _RegionsReportletInputSpec(BaseInterfaceInputSpec):
    kind = traits.Enum("registration", "regions", mandatory=True)
    in_file = File(exists=True, mandatory=True, desc="GRE reference or chi map")
    overlay = File(exists=True, mandatory=True, desc="warped template or native labels")
    mask_file = File(exists=True, desc="brain mask")


class _RegionsReportletOutputSpec(TraitedSpec):
    out_report = File(exists=True)


class RegionsReportlet(SimpleInterface):
    """The registration (template contours on the run) or regions (labels over chi) SVG."""

    input_spec = _RegionsReportletInputSpec
    output_spec = _RegionsReportletOutputSpec

    def _run_interface(self, runtime):
        from ..reports.core import load_canonical
        from ..reports.reportlets import registration_svg, regions_svg
        from ..utils.files import write_text

        data, vox = load_canonical(self.inputs.in_file)
        overlay = load_canonical(self.inputs.overlay)[0]
        mask = (load_canonical(self.inputs.mask_file)[0] > 0.5
                if isdefined(self.inputs.mask_file) else None)
        if self.inputs.kind == "registration":
            svg = registration_svg(data, overlay, vox, mask=mask)
        else:
            svg = regions_svg(data, np.rint(overlay).astype(int), vox, mask=mask)
        out = _out(f"{self.inputs.kind}.svg", runtime)
        write_text(out, svg)
        self._results["out_report"] = out
        return runtime
