"""Helpers of the robustness tests: tiny synthetic GRE runs with a known
answer, and the QSM workflow's interfaces called in graph order.

``run_chain`` runs each interface of :func:`qsmprep.workflows.qsm.init_qsm_wf`
on one :class:`~qsmprep.bids.runs.QSMRun` directly (no Nipype scheduler,
no reports), so a case costs seconds; the full CLI is run only by the tests
about the run itself (test_runs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np

from qsmprep.config import Config
from qsmprep.interfaces import qsm as ifaces
from qsmprep.interfaces import reference as reference_ifaces
from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T
from qsmprep.qsm.reference import csf_search_params

#: chi (ppm) of the sphere at the world origin; brain radius and sphere radius (mm)
CHI, BRAIN_MM, SPHERE_MM = 0.2, 20.0, 6.0
FIELD_T = 3.0
#: harmonic background: a linear field along world x (Hz/mm)
GRADIENT_HZ_PER_MM = 1.5


def centered_affine(rotation_zoom, shape):
    """Affine with 3x3 block ``rotation_zoom`` whose grid centre is the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = rotation_zoom
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def world_coords(affine, shape):
    """World (RAS, mm) coordinates of every voxel centre, shape (3, X, Y, Z)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return xyz.reshape((3,) + tuple(shape))


def sphere_signal(affine, shape, echo_times, *, snr=200.0, seed=0, phase_offset=0.0):
    """Complex multi-echo signal (X, Y, Z, E) of a sphere of :data:`CHI` in a
    spherical brain, B0 along world z, computed analytically in world
    coordinates (independent of how qsmprep reads the affine).

    Returns ``(signal, chi, brain)``: chi (ppm) and brain mask on the grid.
    """
    x, y, z = world_coords(affine, shape)
    r2 = x**2 + y**2 + z**2
    brain = r2 < BRAIN_MM**2
    sphere = r2 <= SPHERE_MM**2
    with np.errstate(divide="ignore", invalid="ignore"):
        field = CHI * SPHERE_MM**3 * (3 * z**2 / r2 - 1) / r2**1.5 / 3
    field[sphere] = 0.0
    hz = field * GAMMA_BAR_MHZ_PER_T * FIELD_T + GRADIENT_HZ_PER_MM * x
    te = np.asarray(echo_times)
    rng = np.random.default_rng(seed)
    rho = brain[..., None] * np.exp(-te / 0.05)
    sig = rho * np.exp(1j * (2 * np.pi * hz[..., None] * te + phase_offset))
    sig = sig + (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape)) / snr
    return sig, np.where(sphere, CHI, 0.0), brain


def write_run(root, signal, affine, echo_times, *, subject="01", parts=("mag", "phase"),
              meta=None, encode=None):
    """Write ``signal`` as one 3-D file per echo and part (``parts`` from
    mag, phase, real, imag); ``encode(part, volume)`` may change the stored
    array (e.g. to scanner integers). Returns the files by part."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "robustness", "BIDSVersion": "1.9.0"}))
    anat = root / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    get = {"mag": np.abs, "phase": np.angle, "real": np.real, "imag": np.imag}
    files = {p: [] for p in parts}
    for e, te in enumerate(echo_times, start=1):
        for part in parts:
            vol = get[part](signal[..., e - 1]).astype(np.float32)
            vol = encode(part, vol) if encode else vol
            stem = anat / f"sub-{subject}_echo-{e}_part-{part}_MEGRE"
            nb.Nifti1Image(vol, affine).to_filename(f"{stem}.nii.gz")
            sidecar = {"EchoTime": te, "MagneticFieldStrength": FIELD_T, **(meta or {})}
            if part == "phase" and "Units" not in sidecar:
                sidecar["Units"] = "rad"
            Path(f"{stem}.json").write_text(json.dumps(
                {k: v for k, v in sidecar.items() if v is not None}))
            files[part].append(Path(f"{stem}.nii.gz"))
    return files


def load_run(run, workdir):
    """The workflow's ``load`` step on ``run``; returns its Nipype outputs."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return ifaces.LoadEchoes(
        magnitude=[str(p) for p in run.magnitude],
        magnitude_echo_times_s=list(run.magnitude_echo_times_s),
        phase=[str(p) for p in run.phase], echo_times_s=list(run.echo_times_s),
        phase_units=run.phase_units, complex_parts=run.complex_parts,
    ).run(cwd=str(workdir)).outputs


def run_chain(run, workdir, config=None):
    """Every step of the QSM workflow on ``run`` (settings from ``config``);
    returns ``{step: outputs}`` with the Nipype output objects."""
    config = config or Config()
    wf = config.workflow
    workdir = Path(workdir)

    def call(name, interface):
        cwd = workdir / name
        cwd.mkdir(parents=True, exist_ok=True)
        return interface.run(cwd=str(cwd)).outputs

    def method(stage, cls, **inputs):
        return call(stage, cls(method=wf.method(stage), params=wf.stage_params(stage),
                               mem_gb=config.nipype.mem_gb, **inputs))

    out = {"load": load_run(run, workdir / "load")}
    load = out["load"]
    phase = load.phase
    if wf.phase_offset == "mcpc3ds" and len(run.echo_times_s) > 1:
        out["phase_offset"] = call("phase_offset", ifaces.PhaseOffset(
            phase=phase, magnitude=load.magnitude, echo_times_s=load.echo_times_s,
            params=wf.stage_params("phase_offset")))
        phase = out["phase_offset"].phase
    out["unwrapping"] = method("unwrapping", ifaces.Unwrap, phase=phase,
                               magnitude=load.magnitude, valid=load.valid,
                               echo_times_s=load.echo_times_s)
    out["echo_combine"] = call("echo_combine", ifaces.EchoCombine(
        unwrapped=out["unwrapping"].unwrapped, magnitude=load.magnitude,
        echo_times_s=load.echo_times_s))
    out["total_field"] = call("total_field", ifaces.TotalField(
        fieldmap=out["echo_combine"].fieldmap, field_strength_t=run.field_strength_t))
    quality = {"quality": out["unwrapping"].quality} if out["unwrapping"].quality else {}
    out["masking"] = method("masking", ifaces.Mask, magnitude=load.magnitude,
                            valid=load.valid, **quality)
    b0 = list(run.b0_dir)
    out["bf_removal"] = method("bf_removal", ifaces.BackgroundRemoval,
                               total_field=out["total_field"].total_field,
                               mask=out["masking"].mask, b0_dir=b0)
    out["csf_core"] = call("csf_core", reference_ifaces.CSFCore(
        magnitude=load.magnitude, mask=out["bf_removal"].mask, echo_times_s=load.echo_times_s,
        params=csf_search_params(wf.method("referencing"), wf.stage_params("referencing"))))
    csf = {"csf": out["csf_core"].csf, "csf_note": out["csf_core"].csf_note}
    out["inversion"] = method("inversion", ifaces.Inversion,
                              local_field=out["bf_removal"].local_field,
                              mask=out["bf_removal"].mask, b0_dir=b0, **csf)
    out["referencing"] = method("referencing", reference_ifaces.Reference,
                                chi=out["inversion"].chi, mask=out["bf_removal"].mask, **csf)
    return out


def data(path):
    return np.asanyarray(nb.load(path).dataobj)
