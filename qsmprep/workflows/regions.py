"""Template registration, deep grey matter regions and template-space outputs of one run.

::

    magnitude ─► gre_reference (mean over echoes)
                   │
                   ├─► register_<space> (rigid + affine + SyN, ANTs) ─► ds_xfm_<space>
                   │        │ inverse                    │ forward       (from-GRE_to-<space>
                   │        ▼                            ▼                and from-<space>_to-GRE)
    atlas dseg ─► labels_to_native (majority)    chi_to_<space> (Lanczos) ─► ds_chimap_<space>
                   │
    chi, mask ─► region_stats ─► ds_regions_stats (*_desc-regions_stats.tsv + .json)
                                 ds_regions_dseg  (*_desc-regions_dseg.nii.gz + .tsv)

The regions come from the embedded QSMChallenge atlas (seven deep grey
matter nuclei) or, with ``--regions-atlas``, from a TemplateFlow atlas on
disk whose labels are first mapped to qsmprep's region names
(``prepare_atlas``; :mod:`qsmprep.regions.atlases`), registered to the
atlas' own template. The statistics are of the Chimap as written, i.e.
relative to the referencing stage's reference region, which the sidecar
states.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.bids import DerivativesDataSink
from ..interfaces.regions import ApplyTransform, PrepareAtlas, RegionsReportlet, \
    RegionStats, RegisterToTemplate, RegistrationReference
from ..regions.atlases import find_atlas, merge_regions, read_lut_rows
from ..regions.make_atlas import DEEP_GM
from ..regions.templates import (
    DEFAULT_TEMPLATE,
    TEMPLATEFLOW_SUFFIXES,
    find_template,
    parse_space,
)

#: what each referencing method makes chi relative to (for the stats sidecar)
REFERENCE_REGIONS = {
    "none": "none: chi as given by the dipole inversion (no referencing)",
    "mean": "whole brain: the mean chi over the run's desc-brain_mask is 0",
    "csf": "CSF: the median chi over the core of the run's ventricular cerebrospinal fluid "
           "(its voxels core_voxels in from its edge) is 0 (the whole brain's mean where "
           "none was found: see the Chimap sidecar's ReferencingWarnings)",
}


def template_spaces(config):
    """The template :class:`~qsmprep.regions.templates.Space` entries of ``--output-spaces``."""
    return [s for s in map(parse_space, config.workflow.output_spaces) if not s.is_native]


#: citation keys (qsmprep/data/boilerplate.bib) of the templates and atlases qsmprep knows
CITATIONS = {"MNI152NLin2009cAsym": "fonov2011mni", "MASSP20": "bazin2020massp"}


def regions_atlas(config):
    """The :class:`~qsmprep.regions.atlases.Atlas` of ``--regions-atlas``, found on disk."""
    return find_atlas(getattr(config.workflow, "regions_atlas", DEFAULT_TEMPLATE))


def needs_registration(config):
    """Whether runs are registered to a template (regions or a template output space)."""
    return bool(config.workflow.regions or template_spaces(config))


def reference_region(referencing):
    """The sentence stating the reference region of a referencing method."""
    return REFERENCE_REGIONS.get(referencing, f"as defined by the '{referencing}' "
                                 "referencing method")


def find_t1w(bids_dir, subject, session=None):
    """A T1w image of the subject in the same session (first in name order), or None.

    Plain file search in ``sub-<s>/[ses-<s>/]anat/``; qsmprep's pybids query
    covers only GRE images.
    """
    from pathlib import Path

    folder = Path(bids_dir) / f"sub-{subject}"
    prefix = f"sub-{subject}"
    if session:
        folder, prefix = folder / f"ses-{session}", f"{prefix}_ses-{session}"
    found = sorted(p for p in (folder / "anat").glob(f"{prefix}_*T1w.nii*")
                   if p.name.endswith(("_T1w.nii", "_T1w.nii.gz")))
    return found[0] if found else None


def check_templates(config):
    """Every template of ``--output-spaces`` (and the regions' atlas) is on this
    machine, and the registration preset exists; a QSMPrepInputError otherwise,
    before any work."""
    from ..regions.registration import PRESETS
    from ..regions.templates import TemplateNotFoundError
    from ..bids import QSMPrepInputError

    if config.workflow.registration not in PRESETS:
        raise QSMPrepInputError(
            f"Unknown registration preset {config.workflow.registration!r} in the "
            f"configuration; expected one of {sorted(PRESETS)}")
    try:
        for space in template_spaces(config):
            find_template(space)
    except (TemplateNotFoundError, ValueError) as err:
        raise QSMPrepInputError(f"--output-spaces cannot be used as given: {err}") from None
    if config.workflow.regions:
        try:
            atlas = regions_atlas(config)
            find_template(parse_space(atlas.space))
        except (FileNotFoundError, ValueError) as err:
            raise QSMPrepInputError(f"--regions-atlas cannot be used as given: {err}") from None


def _cite(name):
    return f" [@{CITATIONS[name]}]" if name in CITATIONS else ""


def _atlas_methods(atlas):
    """The methods sentence naming the regions and where they come from."""
    if atlas.embedded:
        return ("Seven deep grey matter regions (caudate, globus pallidus, putamen, red nucleus, "
                "dentate nucleus, substantia nigra with the subthalamic nucleus, thalamus) of the "
                "QSMChallenge atlas, built from the QSM Challenge 2.0 head model "
                "[@marques2021challenge],")
    regions = merge_regions(read_lut_rows(atlas.lut))[0]
    ours = [name.replace("_", " ") for index, name, _ in regions if index in DEEP_GM]
    others = len(regions) - len(ours)
    return (f"The {len(regions)} regions of the {atlas.name} atlas{_cite(atlas.name)} in the "
            f"{atlas.space} template{_cite(atlas.space)}, from TemplateFlow "
            "[@ciric2022templateflow]"
            + (f" (its labels of the {', '.join(ours)} mapped to one region each, hemispheres "
               "and subdivisions merged" + (f"; {others} other labels kept as named by the "
                                            "atlas)" if others else ")") if ours else "") + ",")


def _atlas_sidecar(atlas):
    if atlas.embedded:
        return (f"{DEFAULT_TEMPLATE} deep grey matter labels (qsmprep/data/atlas; "
                "QSM Challenge 2.0 head model, MIT)")
    return (f"{atlas.name} in {atlas.space} (TemplateFlow, {atlas.dseg.name}); its labels "
            "mapped to qsmprep's region names, the others kept as named (see the "
            "atlas_labels column of the desc-regions_dseg.tsv)")


def init_regions_wf(config, run, *, referencing, name="regions_wf"):
    """Register one run to its templates; regional statistics; template-space chi.

    Inputs (``inputnode``): ``magnitude`` (echoes), ``chi`` (ppm), ``mask``.
    ``referencing``: the name of the run's referencing method.
    """
    wf = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(["magnitude", "chi", "mask"]), name="inputnode")
    omp = config.nipype.resolved()[1]
    preset = config.workflow.registration
    spaces = template_spaces(config)
    atlas = regions_atlas(config) if config.workflow.regions else None
    # one registration per template: the atlas' and those of the output spaces
    targets = list(dict.fromkeys(([atlas.space] if atlas else []) + [s.name for s in spaces]))

    t1w = (find_t1w(config.execution.bids_dir, run.subject, run.entity_dict.get("session"))
           if config.workflow.t1w_intermediate and config.execution.bids_dir else None)
    spaces_text = ", ".join(str(s) for s in spaces)
    wf.__desc__ = (
        "\n#### Template registration and regions\n\n"
        "The magnitude of each run, averaged over echoes, was registered to "
        + (f"the template(s) {', '.join(targets)}" if len(targets) > 1 else f"the {targets[0]} "
           "template") +
        " with ANTs (rigid, affine and symmetric normalization (SyN) stages, mutual "
        f"information; preset '{preset}') [@avants2008syn]."
        + (" For the TemplateFlow templates, the registration went through the subject's "
           "T1-weighted image (GRE to T1w rigid, T1w to template as above), composed into "
           "one transform." if t1w is not None and set(targets) - {DEFAULT_TEMPLATE} else "")
        + (f" {_atlas_methods(atlas)} were brought onto each run's grid through the inverse "
           "transform (majority-vote label interpolation) and restricted to the brain mask; "
           "the voxel count, mean, median, standard deviation and 5th/95th percentiles of "
           "the susceptibility map were computed in each region, relative to the reference "
           f"region of the referencing step ({reference_region(referencing)})."
           if atlas else "")
        + (f" The susceptibility map was resampled to {spaces_text} with a Lanczos windowed "
           "sinc kernel." if spaces else "") + "\n")

    gre_ref = pe.Node(RegistrationReference(), name="gre_reference")
    wf.connect(inputnode, "magnitude", gre_ref, "magnitude")

    def sink(node_name, **kwargs):
        return pe.Node(DerivativesDataSink(
            base_directory=config.execution.output_dir, source_file=run.phase[0],
            dismiss_entities=["echo", "part"], check_hdr=False, **kwargs),
            name=node_name, run_without_submitting=True)

    registered = {}
    for target in targets:
        # TemplateFlow templates have T1w/T2w contrast: a T1w registers better to
        # their T1w; the GRE-like QSMChallenge is registered from the GRE itself
        via = t1w if t1w is not None and target != DEFAULT_TEMPLATE else None
        suffixes = ("T1w",) + TEMPLATEFLOW_SUFFIXES if via else TEMPLATEFLOW_SUFFIXES
        reg = pe.Node(RegisterToTemplate(template=str(find_template(parse_space(target),
                                                                    suffixes)),
                                         preset=preset, num_threads=omp),
                      name=f"register_{target}", n_procs=omp)
        if via is not None:
            reg.inputs.intermediate = str(via)
        wf.connect(gre_ref, "reference", reg, "moving")
        registered[target] = reg
        for field, src, dst in (("forward_xfm", "GRE", target), ("inverse_xfm", target, "GRE")):
            ds = sink(f"ds_xfm_{target}_{field}", mode="image", suffix="xfm", extension=".h5",
                      compress=False, **{"from": src, "to": dst})
            wf.connect(reg, field, ds, "in_file")

    if atlas:
        labels = pe.Node(ApplyTransform(interpolation="label", dtype="uint8", num_threads=omp),
                         name="labels_to_native")
        stats = pe.Node(RegionStats(), name="region_stats")
        ds_lut = sink("ds_regions_lut", desc="regions", suffix="dseg", extension=".tsv")
        if atlas.embedded:
            labels.inputs.in_file = str(atlas.dseg)
            stats.inputs.lut = ds_lut.inputs.in_file = str(atlas.lut)
            wf.add_nodes([ds_lut])
        else:  # the atlas' labels mapped to qsmprep's region names, on its own grid
            prepare = pe.Node(PrepareAtlas(dseg=str(atlas.dseg), lut=str(atlas.lut)),
                              name="prepare_atlas")
            wf.connect([(prepare, labels, [("dseg", "in_file")]),
                        (prepare, stats, [("lut", "lut")]),
                        (prepare, ds_lut, [("lut", "in_file")])])
        wf.connect([
            (gre_ref, labels, [("reference", "reference")]),
            (registered[atlas.space], labels, [("inverse_xfm", "transform")]),
            (labels, stats, [("out_file", "labels")]),
            (inputnode, stats, [("chi", "chi"), ("mask", "mask")]),
        ])  # fmt: skip
        common = {"Atlas": _atlas_sidecar(atlas),
                  "Registration": f"ANTs rigid + affine + SyN, preset '{preset}'"}
        ds_stats = sink("ds_regions_stats", desc="regions", suffix="stats", extension=".tsv",
                        meta_dict={**common, "ReferenceRegion": reference_region(referencing),
                                   "Units": "ppm",
                                   "Columns": "region, label, voxels (inside desc-brain_mask), "
                                   "mean_ppm, median_ppm, std_ppm (ddof 0), p5_ppm, p95_ppm"})
        ds_dseg = sink("ds_regions_dseg", desc="regions", suffix="dseg", compress=True,
                       meta_dict={**common, "Resampling": "ANTs GenericLabel (majority vote) "
                                  f"through from-{atlas.space}_to-GRE, restricted to "
                                  "desc-brain_mask"})
        wf.connect([(stats, ds_stats, [("stats", "in_file")]),
                    (stats, ds_dseg, [("labels", "in_file")])])

        # reportlets: template contours on the run; the regions over chi
        warped = pe.Node(ApplyTransform(interpolation="linear", num_threads=omp),
                         name="template_to_native")
        draw_reg = pe.Node(RegionsReportlet(kind="registration"), name="report_registration")
        draw_regions = pe.Node(RegionsReportlet(kind="regions"), name="report_regions")
        wf.connect([
            (registered[atlas.space], warped, [("template_grid", "in_file"),
                                               ("inverse_xfm", "transform")]),
            (gre_ref, warped, [("reference", "reference")]),
            (gre_ref, draw_reg, [("reference", "in_file")]),
            (warped, draw_reg, [("out_file", "overlay")]),
            (inputnode, draw_reg, [("mask", "mask_file")]),
            (inputnode, draw_regions, [("chi", "in_file"), ("mask", "mask_file")]),
            (stats, draw_regions, [("labels", "overlay")]),
        ])  # fmt: skip
        for kind, node in (("registration", draw_reg), ("regions", draw_regions)):
            ds = sink(f"ds_report_{kind}", datatype="figures", desc=kind, suffix=run.suffix,
                      extension=".svg")
            wf.connect(node, "out_report", ds, "in_file")

    for space in spaces:
        key = str(space).replace(":", "_").replace("-", "")
        to_space = pe.Node(ApplyTransform(reference=str(find_template(space)),
                                          interpolation="lanczos", num_threads=omp),
                           name=f"chi_to_{key}")
        wf.connect([(inputnode, to_space, [("chi", "in_file")]),
                    (registered[space.name], to_space, [("forward_xfm", "transform")])])
        entities = {"space": space.name}
        if "res" in space.spec:
            entities["res"] = space.spec["res"]
        ds = sink(f"ds_chimap_{key}", suffix="Chimap", compress=True, **entities,
                  meta_dict={"Units": "ppm", "SpatialReference": space.name,
                             "Resampling": "ANTs LanczosWindowedSinc through "
                             f"from-GRE_to-{space.name}_mode-image_xfm.h5"})
        wf.connect(to_space, "out_file", ds, "in_file")
    return wf
