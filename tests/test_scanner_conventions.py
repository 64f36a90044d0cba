"""What real scanners and dcm2niix hand over (issue 24): the field strength
from ImagingFrequency, integer phase scaling checked by its 2pi wraps, the
phase sign, and brain masks of thin slabs without holes at the cut faces."""

from __future__ import annotations

import json
import logging

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T

# ---------------------------------------------------------------------------
# brain masks of thin slabs: no holes at the faces where the grid cuts the object
# ---------------------------------------------------------------------------


def _slab_object(axis, *, n=48, slices=10, voxel_mm=2.2, slice_mm=3.0, seed=0):
    """A uniform ball (radius 45 mm) cut by a 10-slice slab along ``axis``,
    with two dark signal voids that open at the cut faces: a vein-like tube
    (radius 5 mm) through the whole slab and a half-ball (radius 8 mm) at its
    first face. Returns magnitude, voxel size and the ball."""
    shape, vox = [n, n, n], [voxel_mm] * 3
    shape[axis], vox[axis] = slices, slice_mm
    grid = np.meshgrid(*[(np.arange(k) - (k - 1) / 2) * v for k, v in zip(shape, vox)],
                       indexing="ij")
    ball = sum(g**2 for g in grid) < 45.0**2
    inplane = [g for a, g in enumerate(grid) if a != axis]
    tube = (inplane[0] - 12) ** 2 + (inplane[1] + 6) ** 2 < 5.0**2
    face = grid[axis] - grid[axis].min()
    blob = (inplane[0] + 14) ** 2 + (inplane[1] - 10) ** 2 + face**2 < 8.0**2
    rng = np.random.default_rng(seed)
    mag = np.where(ball & ~tube & ~blob, 1.0, 0.0) + 0.02 * np.abs(rng.standard_normal(shape))
    return mag.astype(np.float32), tuple(vox), ball


def _holes_2d(mask, axis):
    """Voxels in 2-D holes of each slice along ``axis``."""
    return sum(int((ndimage.binary_fill_holes(s) & ~s).sum())
               for s in np.moveaxis(mask, axis, 0))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_bet_mask_of_a_thin_slab_has_no_holes_at_its_faces(axis):
    from qsmprep.qsm.bet import bet_mask

    mag, vox, ball = _slab_object(axis)
    mask = bet_mask(mag, voxel_size_mm=vox)
    assert _holes_2d(mask, axis) == 0
    # every slice keeps the whole cross-section of the uniform ball (less a 3-voxel rim)
    core = np.stack([ndimage.binary_erosion(s, iterations=3)
                     for s in np.moveaxis(ball, axis, 0)])
    missing = np.moveaxis(core, 0, axis) & ~mask
    assert missing.sum() == 0, [int(s.sum()) for s in np.moveaxis(missing, axis, 0)]


@pytest.mark.parametrize("axis", [0, 2])
def test_magnitude_mask_of_a_thin_slab_has_no_holes_at_its_faces(axis):
    from qsmprep.qsm.mask import robust_magnitude_mask

    mag, vox, ball = _slab_object(axis)
    mask = robust_magnitude_mask(mag)
    assert _holes_2d(mask, axis) == 0


def test_fill_mask_holes_closes_holes_open_at_a_face_but_not_concave_outlines():
    from qsmprep.qsm.mask import fill_mask_holes

    mask = np.zeros((20, 20, 6), bool)
    mask[3:17, 3:17, :] = True
    mask[8:11, 8:11, :] = False     # a tube through every slice: a hole of each slice
    mask[4:6, 12:15, :2] = False    # a pit open at the first face only
    mask[14:17, 8:12, :] = False    # a notch open to the side: not a hole
    filled = fill_mask_holes(mask)
    assert filled[8:11, 8:11, :].all() and filled[4:6, 12:15, :2].all()
    assert not filled[14:17, 8:12, :].any()
    assert (filled >= mask).all() and not filled[:3].any()
    # not a slab (20 x 20 x 12): a bay closed in its slice but open through the next
    # slice to the outside stays out; a hole closed in 3-D is filled
    cube = np.zeros((20, 20, 12), bool)
    cube[3:17, 3:17, :] = True
    cube[8:11, 8:11, 4:7] = False    # enclosed
    cube[4:6, 4:6, 2:5] = False      # a channel to the side, below the surface:
    cube[3:6, 3, 2] = False          # open to the outside through slice 2 only
    filled = fill_mask_holes(cube)
    assert filled[8:11, 8:11, 4:7].all() and not filled[4:6, 4:6, 3:5].any()


# ---------------------------------------------------------------------------
# integer phase: the scale decided from the sidecar, header and range, checked by the wraps
# ---------------------------------------------------------------------------


def _wrapped_phase(shape=(32, 32, 24), echo_times_s=(0.006, 0.012, 0.018)):
    """Wrapped phase (rad) of a sphere in a smooth field, noise outside (as stored by
    scanners: the background is not masked), float64 (X, Y, Z, E)."""
    from _data import simulate_multi_echo

    phase, mag, _, _ = simulate_multi_echo(shape, echo_times_s, amplitude_hz=120.0)
    return phase.astype(np.float64), mag


def _wrap_error(a, b):
    return float(np.abs(np.angle(np.exp(1j * (np.asarray(a, float) - b)))).max())


# stored value from rad (-pi..pi) for each convention, and the largest error allowed (rad)
CONVENTIONS = {
    "siemens-signed": (lambda p: np.clip(np.round(p / (2 * np.pi) * 8192), -4096, 4095), 2e-3),
    "siemens-unsigned": (lambda p: np.round((p + np.pi) / (2 * np.pi) * 4096) % 4096, 3e-3),
    "milliradians": (lambda p: np.round(p * 1000), 1e-3),
    "float-radians": (lambda p: p, 1e-6),
}


# (radians declared "arbitrary" are rescaled min..max, no convention: not listed)
@pytest.mark.parametrize("convention, units", [
    (c, u) for c in sorted(CONVENTIONS) for u in (None, "arbitrary")
    if (c, u) != ("float-radians", "arbitrary")])
def test_integer_phase_conventions_give_back_the_phase_in_rad(convention, units, caplog):
    from qsmprep.utils.images import interpret_phase

    phase, _ = _wrapped_phase()
    to_stored, tol = CONVENTIONS[convention]
    stored = to_stored(phase).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="qsmprep"):
        out, record = interpret_phase(stored, units, "sub-01_part-phase_MEGRE.nii.gz")
    assert _wrap_error(out, phase) < tol
    assert record["verified"] is True
    assert abs(record["max_jump_periods"] - 1) < 0.1


def test_milliradian_integers_are_not_taken_for_12_bit_phase(caplog):
    """+-3142 integers fit the 12-bit range -4096..4095, but their wraps jump by
    6283, not 8192: rescaling them as 12-bit gives +-2.41 rad and a chi 23 % low."""
    from qsmprep.utils.images import interpret_phase

    phase, _ = _wrapped_phase()
    stored = np.round(phase * 1000).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        out, record = interpret_phase(stored, None, "p.nii.gz")
    assert record["convention"] == "mrad" and record["rad_per_unit"] == pytest.approx(1e-3)
    assert np.abs(out).max() == pytest.approx(np.pi, abs=2e-3)
    assert "milliradians" in caplog.text and "verified by its 2pi wraps" in caplog.text


def test_units_rad_on_scanner_integers_is_an_error_naming_the_file():
    from qsmprep.utils.images import PhaseScaleError, interpret_phase

    phase, _ = _wrapped_phase()
    stored = np.clip(np.round(phase / (2 * np.pi) * 8192), -4096, 4095).astype(np.float32)
    with pytest.raises(PhaseScaleError, match=r"sub-01_echo-1_part-phase_MEGRE.nii.gz.*"
                       r"\"Units\": \"rad\".*not radians.*\"Units\": \"arbitrary\""):
        interpret_phase(stored, "rad", "sub-01_echo-1_part-phase_MEGRE.nii.gz")


def test_units_rad_on_unwrapped_radians_is_kept():
    """Radians beyond -pi..pi without jumps (an unwrapped phase) are radians."""
    from qsmprep.utils.images import interpret_phase

    ramp = np.linspace(-12, 12, 24 * 24 * 24).reshape(24, 24, 24).astype(np.float32)
    out, record = interpret_phase(ramp, "rad", "p.nii.gz")
    assert record["convention"] == "rad" and np.array_equal(out, ramp)


def test_scl_slope_and_intercept_of_the_header_are_applied_and_checked(tmp_path, monkeypatch):
    """GE/Philips style: int16 in the file, scl_slope/scl_inter giving radians."""
    from conftest import write_gre

    from qsmprep.interfaces.qsm import LoadEchoes

    phase, mag = _wrapped_phase(shape=(20, 20, 16))
    files = write_gre(tmp_path / "bids", echo_times_s=(0.006, 0.012, 0.018), shape=(20, 20, 16),
                      phase_meta={"Units": None})
    for e, path in enumerate(files["phase"]):
        # nibabel stores the radians as int16 with its own scl_slope/scl_inter
        img = nb.Nifti1Image(phase[..., e].astype(np.float32), nb.load(path).affine)
        img.set_data_dtype(np.int16)
        img.to_filename(path)
        proxy = nb.load(path).dataobj
        slope, inter = proxy.slope, proxy.inter
        assert nb.load(path).get_data_dtype() == np.int16 and slope != 1.0
        sidecar = path.with_name(path.name.replace(".nii.gz", ".json"))
        meta = json.loads(sidecar.read_text())
        meta.pop("Units", None)
        sidecar.write_text(json.dumps(meta))
    result = LoadEchoes(
        magnitude=[str(f) for f in files["mag"]], magnitude_echo_times_s=[0.006, 0.012, 0.018],
        phase=[str(f) for f in files["phase"]], echo_times_s=[0.006, 0.012, 0.018],
        phase_units=None)
    monkeypatch.chdir(tmp_path)
    result = result.run()
    out = nb.load(result.outputs.phase).get_fdata()
    assert _wrap_error(out, phase) < 1e-3
    record = result.outputs.phase_scaling
    assert record["convention"] == "rad" and record["verified"]
    assert record["header_scaling"][0] != 1.0


# ---------------------------------------------------------------------------
# a small head in air, simulated here (not with qsmprep.sim): field strength and sign
# ---------------------------------------------------------------------------

HEAD_SHAPE, HEAD_VOX = (40, 46, 40), 4.0
HEAD_TES = (0.005, 0.010, 0.015)


def _head(field_strength_t=3.0, *, b0_dir=(0.0, 0.0, 1.0), seed=0):
    """Phase (rad, wrapped, qsmprep's sign: +gamma dB TE) and magnitude of an
    ellipsoidal head in air with a sinus, a skull shell, an iron-rich blob
    and a vein, ear canals. chi relative to air: tissue -9.4 ppm, skull -11.4 ppm
    (Schenck 1996); field by FFT dipole convolution on a 2x padded grid, less
    its 2nd-order fit over the brain (a shim). Returns phase, magnitude, affine,
    brain mask and the true B0 map (Hz)."""
    from qsmprep.qsm.kernels import dipole_convolve
    from qsmprep.qsm.phase_sign import remove_polynomial

    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * HEAD_VOX for n in HEAD_SHAPE],
                    indexing="ij")
    x, y, z = g
    head = (x / 68) ** 2 + (y / 84) ** 2 + (z / 72) ** 2 < 1
    inner = (x / 60) ** 2 + (y / 76) ** 2 + (z / 64) ** 2 < 1     # inside the scalp
    brain = (x / 54) ** 2 + (y / 70) ** 2 + (z / 58) ** 2 < 1   # skull 6 mm
    skull = inner & ~brain
    sinus = (x / 14) ** 2 + ((y - 62) / 12) ** 2 + ((z + 30) / 12) ** 2 < 1
    for side in (-1, 1):  # ear canals, from outside the head through the skull
        sinus |= ((z + 20) ** 2 + y**2 < 5**2) & (side * x > 44)
    chi = np.zeros(HEAD_SHAPE, np.float32)
    chi[head] = -9.4
    chi[skull] = -11.4
    chi[sinus] = 0.0
    chi[brain & (x**2 + y**2 + (z + 8) ** 2 < 14**2)] += 0.15           # iron
    chi[brain & ((x - 16) ** 2 + (y + 20) ** 2 < 5**2)] += 0.4          # a vein along z
    field_ppm = dipole_convolve(chi, (HEAD_VOX,) * 3, b0_dir)
    field_ppm[brain] = remove_polynomial(field_ppm, brain, (HEAD_VOX,) * 3)
    field_ppm[~brain] -= np.median(field_ppm[brain])  # keep the outside near the shim
    hz = field_ppm * GAMMA_BAR_MHZ_PER_T * field_strength_t
    rho = (head & ~skull & ~sinus).astype(np.float32)
    te = np.asarray(HEAD_TES)
    signal = rho[..., None] * np.exp(-te / 0.05) * np.exp(2j * np.pi * hz[..., None] * te)
    noise = (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape)) / 50
    s = signal + noise
    affine = np.diag([HEAD_VOX] * 3 + [1.0])
    return np.angle(s).astype(np.float32), np.abs(s).astype(np.float32), affine, brain, hz


def _write_run(root, subject, phase, mag, affine, meta, *, units="rad", dtype=None):
    """One run as dcm2niix writes it: an echo per file, qform = sform (scanner),
    the phase sidecar with ``Units`` (left out when None) and the phase stored as
    given, or as ``dtype`` with nibabel's scl_slope/scl_inter (GE/Philips style)."""
    anat = root / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for n, te in enumerate(HEAD_TES, start=1):
        for part, data in (("mag", mag), ("phase", phase)):
            stem = anat / f"sub-{subject}_echo-{n}_part-{part}_MEGRE"
            img = nb.Nifti1Image(data[..., n - 1], affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            if part == "phase" and dtype is not None:
                img.set_data_dtype(dtype)
            img.to_filename(f"{stem}.nii.gz")
            extra = {"Units": units} if part == "phase" and units is not None else {}
            stem.with_suffix(".json").write_text(json.dumps({"EchoTime": te, **meta, **extra}))


def test_phase_sign_check_on_a_head_in_air():
    """The check finds qsmprep's sign on the simulated head and the inverted one
    on its negated field, at 0 and 30 degrees of B0; it abstains on a 10-slice
    slab of it rather than guess."""
    from qsmprep.qsm.phase_sign import CLEAR_CORRELATION, phase_sign_evidence

    from qsmprep.sim.acquisition import tilted_b0

    for b0_dir in ((0.0, 0.0, 1.0), tuple(tilted_b0(30.0))):
        _, mag, _, brain, b0_hz = _head(b0_dir=b0_dir)
        for sign in (1, -1):
            ev = phase_sign_evidence(sign * b0_hz, mag, brain, (HEAD_VOX,) * 3, b0_dir)
            assert sign * ev["correlation"] >= CLEAR_CORRELATION, (b0_dir, ev)
    _, mag, _, brain, b0_hz = _head()
    slab = slice(15, 25)
    ev = phase_sign_evidence(b0_hz[:, :, slab], mag[:, :, slab], brain[:, :, slab],
                             (HEAD_VOX,) * 3, (0, 0, 1))
    # never a clear wrong sign: abstains (|r| < 0.3) or right
    assert ev["correlation"] is None or ev["correlation"] > -CLEAR_CORRELATION, ev


def test_phase_sign_check_sees_the_sign_on_a_real_head_geometry():
    """On the QSM Challenge 2.0 head (real skull, sinuses, mastoid cells; at
    2.56 mm, chi from the Challenge's labels, signal where there is neither air
    nor bone) the brain's field is mostly that of air enclosed in bone, which
    the magnitude cannot tell from bone: over the brain alone the air model
    shows no sign. With the tissue outside the brain (the head's outer air
    surface) the check finds the right sign at 0 and 30 degrees of B0, and the
    inverted one on the negated field, also with the face removed as defacing
    tools do (magnitude and field zeroed in front of and below the brain)."""
    import sys
    from pathlib import Path

    from _data import shared_data_dir

    from qsmprep.qsm import phase_sign as ps
    from qsmprep.qsm.kernels import dipole_convolve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import independent_heads

    chi, mask, magnitude, vox = independent_heads.challenge_geometry(
        4, source=shared_data_dir() / "challenge2-head")
    for tilt in (0.0, 30.0):
        b0 = (0.0, float(np.sin(np.deg2rad(tilt))), float(np.cos(np.deg2rad(tilt))))
        field = dipole_convolve(chi, vox, b0)
        for sign in (1, -1):
            ev = ps.phase_sign_evidence(sign * field, magnitude, mask, vox, b0)
            assert sign * ev["correlation"] >= ps.CLEAR_CORRELATION, (tilt, ev)
            assert ev["voxels_outside_brain"] > ev["voxels"] / 2, ev
        brain_only = ps.phase_sign_evidence(field, magnitude, mask, vox, b0, outside_mm=None)
        assert abs(brain_only["correlation"]) < ps.CLEAR_CORRELATION, (tilt, brain_only)
        y, z = np.ogrid[:chi.shape[1], :chi.shape[2]]
        face = ((y > 58) & (z < 45))[None] & ~mask     # the challenge grid is RAS
        defaced = ps.phase_sign_evidence(np.where(face, 0, field), np.where(face, 0, magnitude),
                                         mask, vox, b0)
        assert defaced["correlation"] >= ps.CLEAR_CORRELATION, (tilt, defaced)


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
    """One qsmprep run (the real Nipype graph, CLI) over three subjects made of
    the same simulated head: ``nominal`` declares only MagneticFieldStrength 3,
    ``freq`` also ImagingFrequency 123.2 MHz (2.894 T), ``flipped`` holds the
    negated phase (another vendor's sign convention); ``siemens`` (int16
    -4096..4095), ``ge`` (int16 with scl_slope/scl_inter) and ``mrad`` (int16
    milliradians) are ``freq`` stored as dcm2niix hands them over, without Units."""
    from qsmprep.cli.run import main

    root = tmp_path_factory.mktemp("heads")
    bids = root / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "heads", "BIDSVersion": "1.9.0"}))
    phase, mag, affine, brain, _ = _head()
    _write_run(bids, "nominal", phase, mag, affine, {"MagneticFieldStrength": 3})
    _write_run(bids, "freq", phase, mag, affine,
               {"MagneticFieldStrength": 3, "ImagingFrequency": 123.2})
    _write_run(bids, "flipped", -phase, mag, affine, {"MagneticFieldStrength": 3})
    # dcm2niix-style vendor conventions, no Units (as dcm2niix writes), ImagingFrequency
    dcm2niix = {"MagneticFieldStrength": 3, "ImagingFrequency": 123.2}
    siemens = np.clip(np.round(phase / (2 * np.pi) * 8192), -4096, 4095).astype(np.int16)
    _write_run(bids, "siemens", siemens, mag, affine, dcm2niix, units=None)
    _write_run(bids, "ge", phase, mag, affine, dcm2niix, units=None, dtype=np.int16)
    _write_run(bids, "mrad", np.round(phase * 1000).astype(np.int16), mag, affine, dcm2niix,
               units=None)
    plugin = root / "plugin.yml"
    plugin.write_text("plugin: Linear\n")
    out = root / "out"
    code = main([str(bids), str(out), "participant", "-w", str(root / "work"),
                 "--bf-removal", "vsharp", "--inversion", "tkd", "--device", "cpu",
                 "--use-plugin", str(plugin)])
    assert code == 0
    return out, brain


def _chi_and_sidecar(out, subject):
    anat = out / f"sub-{subject}" / "anat"
    chi = nb.load(anat / f"sub-{subject}_Chimap.nii.gz").get_fdata()
    mask = nb.load(anat / f"sub-{subject}_desc-brain_mask.nii.gz").get_fdata() > 0
    return chi, mask, json.loads((anat / f"sub-{subject}_Chimap.json").read_text())


# slow: both share one run of the real graph over three subjects (about 45 s of CPU)
@pytest.mark.slow
def test_imaging_frequency_sets_the_field_strength_and_scales_chi(head_runs):
    out, _ = head_runs
    chi3, mask, meta3 = _chi_and_sidecar(out, "nominal")
    chif, maskf, metaf = _chi_and_sidecar(out, "freq")
    used = 123.2 / GAMMA_BAR_MHZ_PER_T
    assert metaf["MagneticFieldStrengthUsed"] == pytest.approx(used)
    assert metaf["FieldStrengthSource"] == "ImagingFrequency"
    assert metaf["ImagingFrequency"] == 123.2 and metaf["MagneticFieldStrength"] == 3
    assert meta3["MagneticFieldStrengthUsed"] == 3
    assert meta3["FieldStrengthSource"] == "MagneticFieldStrength"
    assert np.array_equal(mask, maskf) and mask.sum() > 1000
    np.testing.assert_allclose(chif[mask], chi3[mask] * 3 / used, rtol=1e-3, atol=1e-6)
    assert np.abs(chi3[mask]).max() > 0.05  # not a trivial map
    summary = json.loads(next((out / "sub-freq" / "figures").glob("*desc-summary*.json"))
                         .read_text())
    assert summary["input_field_strength"].startswith(f"{used:.4g} T from ImagingFrequency")


@pytest.mark.slow
def test_sign_flipped_phase_is_detected_and_flipped_back(head_runs):
    out, _ = head_runs
    chi, mask, meta = _chi_and_sidecar(out, "nominal")
    chi_f, mask_f, meta_f = _chi_and_sidecar(out, "flipped")
    assert meta["PhaseSign"] == 1 and meta["PhaseSignDecision"].startswith("confirmed")
    assert meta_f["PhaseSign"] == -1 and meta_f["PhaseSignDecision"].startswith("inverted")
    assert meta_f["PhaseSignCheck"]["correlation"] <= -meta_f["PhaseSignCheck"]["threshold"]
    both = mask & mask_f
    assert both.sum() > 0.95 * mask.sum()
    # the same map: the pipeline (V-SHARP, TKD) is odd in the field
    assert np.corrcoef(chi[both], chi_f[both])[0, 1] > 0.99
    assert np.abs(chi[both] - chi_f[both]).mean() < 0.02 * np.abs(chi[both]).mean() + 1e-4
    # the fieldmap written is the sign-corrected one
    fm = nb.load(out / "sub-flipped" / "anat" / "sub-flipped_fieldmap.nii.gz").get_fdata()
    fm0 = nb.load(out / "sub-nominal" / "anat" / "sub-nominal_fieldmap.nii.gz").get_fdata()
    assert np.corrcoef(fm[both], fm0[both])[0, 1] > 0.99
    summary = json.loads(next((out / "sub-flipped" / "figures").glob("*desc-summary*.json"))
                         .read_text())
    assert summary["input_phase_sign"].startswith("-1, inverted by the check")
    assert any("phase sign looks inverted" in w for w in summary.get("warnings", []))
    scaling = meta["PhaseScaling"]
    assert scaling["Convention"] == "rad" and scaling["VerifiedByWraps"] is True
    assert meta["B0DirectionSource"].startswith("sform")


# ---------------------------------------------------------------------------
# field strength from the sidecar; --phase-sign settings; real phase of unknown scale
# ---------------------------------------------------------------------------


def _collect(root):
    from qsmprep.bids.discover import collect_data

    return collect_data(root, validate=False)["01"][0]


def test_imaging_frequency_is_preferred_over_the_nominal_field_strength(tmp_path):
    from conftest import write_gre

    write_gre(tmp_path, meta={"MagneticFieldStrength": 3, "ImagingFrequency": 123.259})
    run = _collect(tmp_path)
    assert run.field_strength_t == pytest.approx(123.259 / GAMMA_BAR_MHZ_PER_T)  # 2.895 T
    assert run.field_strength_source == "ImagingFrequency"
    assert run.nominal_field_strength_t == 3 and run.imaging_frequency_mhz == 123.259


def test_nominal_field_strength_is_used_without_imaging_frequency(tmp_path):
    from conftest import write_gre

    write_gre(tmp_path, meta={"MagneticFieldStrength": "7"})
    run = _collect(tmp_path)
    assert run.field_strength_t == 7 and run.field_strength_source == "MagneticFieldStrength"


@pytest.mark.parametrize("frequency, match", [
    (123259000.0, "expected the proton frequency in MHz"),          # in Hz
    (49.9, "cannot both be right"),                                # 31P at 3 T, or wrong field
])
def test_implausible_imaging_frequency_is_an_error_naming_the_file(tmp_path, frequency, match):
    from conftest import write_gre

    from qsmprep.bids import QSMPrepInputError

    write_gre(tmp_path, meta={"MagneticFieldStrength": 3, "ImagingFrequency": frequency})
    with pytest.raises(QSMPrepInputError, match=match) as err:
        _collect(tmp_path)
    assert "sub-01_echo-1_part-phase_MEGRE.nii.gz" in str(err.value)


def test_phase_sign_option_reaches_the_config_and_the_graph(tmp_path):
    from conftest import write_gre

    from qsmprep.cli.parser import parse_args
    from qsmprep.config import Config
    from qsmprep.bids.discover import collect_data
    from qsmprep.workflows.base import init_qsmprep_wf
    from qsmprep.workflows.qsm import phase_sign_setting

    bids = tmp_path / "bids"
    write_gre(bids)
    assert parse_args([str(bids), str(tmp_path / "o"), "participant"]).workflow.phase_sign \
        == "auto"
    config = parse_args([str(bids), str(tmp_path / "o"), "participant", "--phase-sign", "-1",
                         "-w", str(tmp_path / "w"), "--bf-removal", "vsharp", "--inversion",
                         "tkd", "--device", "cpu"])
    assert config.workflow.phase_sign == "-1"
    config.to_toml(tmp_path / "c.toml")
    assert Config.from_toml(tmp_path / "c.toml").workflow.phase_sign == "-1"
    wf = init_qsmprep_wf(config, collect_data(bids, validate=False))
    node = wf.get_node("sub_01_wf").get_node("qsm_MEGRE_wf").get_node("phase_sign")
    assert node.inputs.phase_sign == "-1"
    assert phase_sign_setting(1) == "1" and phase_sign_setting(-1) == "-1"
    with pytest.raises(ValueError, match="expected one of auto, 1, -1"):
        phase_sign_setting("negative")


def test_phase_sign_interface_given_sign_and_contradiction(tmp_path, monkeypatch, caplog):
    from qsmprep.interfaces.qsm import PhaseSign

    _, mag, affine, brain, hz = _head()
    for name, data in (("hz", -hz), ("mag", mag), ("mask", brain.astype(np.uint8))):
        nb.Nifti1Image(data, affine).to_filename(tmp_path / f"{name}.nii.gz")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        res = PhaseSign(fieldmap=str(tmp_path / "hz.nii.gz"),
                        magnitude=str(tmp_path / "mag.nii.gz"),
                        mask=str(tmp_path / "mask.nii.gz"), b0_dir=[0.0, 0.0, 1.0],
                        phase_sign="1", source="p.nii.gz").run()
    assert res.outputs.phase_sign == 1 and res.outputs.record["PhaseSignDecision"].startswith(
        "given")
    np.testing.assert_allclose(nb.load(res.outputs.fieldmap).get_fdata(), -hz, rtol=1e-6)
    assert "--phase-sign 1 was given but the phase sign check finds the opposite" in caplog.text
    res = PhaseSign(fieldmap=str(tmp_path / "hz.nii.gz"), magnitude=str(tmp_path / "mag.nii.gz"),
                    mask=str(tmp_path / "mask.nii.gz"), b0_dir=[0.0, 0.0, 1.0],
                    phase_sign="-1").run()
    np.testing.assert_allclose(nb.load(res.outputs.fieldmap).get_fdata(), hz, rtol=1e-6)


def test_real_phase_of_unknown_scale_is_rescaled_by_its_wraps():
    """ROMEO's in-vivo phase is stored as +-0.00367 without Units: within -pi..pi,
    so once taken for radians; its wraps (jumps of 0.0073) show the scale."""
    from _data import shared_data_dir

    from qsmprep.utils.images import interpret_phase

    path = shared_data_dir() / "romeo-invivo" / "Phase.nii"
    raw = np.asanyarray(nb.load(path).dataobj, dtype=np.float32)
    out, record = interpret_phase(raw, None, str(path))
    assert record["convention"] == "range" and record["verified"]
    assert out.min() == pytest.approx(-np.pi, abs=1e-4) and out.max() <= np.pi + 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("vendor, convention", [
    ("siemens", "int-4096..4095"), ("ge", "rad"), ("mrad", "mrad")])
def test_vendor_phase_conventions_give_the_chi_of_float_radians(head_runs, vendor, convention):
    """Each dcm2niix-style convention recovers chi within 5 % (NRMSE in the mask) of
    the same data in float radians."""
    out, _ = head_runs
    ref, mask, _ = _chi_and_sidecar(out, "freq")
    chi, mask_v, meta = _chi_and_sidecar(out, vendor)
    both = mask & mask_v
    assert both.sum() > 0.95 * mask.sum()
    nrmse = np.linalg.norm(chi[both] - ref[both]) / np.linalg.norm(ref[both])
    assert nrmse < 0.05, nrmse
    assert meta["PhaseScaling"]["Convention"] == convention
    assert meta["PhaseScaling"]["VerifiedByWraps"] is True
    assert meta["PhaseScaling"]["DeclaredUnits"] is None
    assert meta["FieldStrengthSource"] == "ImagingFrequency"


# ---------------------------------------------------------------------------
# voxel sizes from a float32 header
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tilt_deg", [0.0, 17.0])
def test_voxel_size_of_a_saved_oblique_affine_is_the_one_written(tmp_path, tilt_deg):
    """A header keeps its affine in float32: 1.2 mm reads back as 1.19999998 or
    1.20000004 mm. That round-off changed BET's mask by 0.45 % of a head (R26-1), so
    the voxel size read from a saved image must be the one the scanner wrote."""
    from scipy.spatial.transform import Rotation

    from qsmprep.qsm.units import voxel_size_from_affine

    vox = (1.2, 0.9375, 2.5)
    affine = np.eye(4)
    rot = Rotation.from_euler("xyz", [tilt_deg, 0.5 * tilt_deg, 11.0], degrees=True)
    affine[:3, :3] = rot.as_matrix() @ np.diag(vox)
    affine[:3, 3] = (-90.3, 101.7, -60.1)
    path = tmp_path / "oblique.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine), path)
    stored = nb.load(path).affine
    assert not np.allclose(np.linalg.norm(stored[:3, :3], axis=0), vox, rtol=0, atol=1e-12)
    assert voxel_size_from_affine(stored) == vox


# ---------------------------------------------------------------------------
# the phase-sign check's geometry: a closing by a ball, the air's dipole field
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (2.2, 2.2, 3.0)])
def test_close_bone_is_the_closing_by_a_ball_with_the_cut_faces_kept(vox):
    """close_bone (distance transforms) is the binary closing by the voxels within
    6 mm of the centre, on the grid continued by edge replication: a gap in the
    skull up to 12 mm wide is closed, a wider one (a sinus) is not, and tissue
    that touches a face of the grid is not eroded from it."""
    from qsmprep.qsm.phase_sign import BONE_CLOSING_MM, close_bone

    rng = np.random.default_rng(1)
    shape = (30, 28, 20)
    tissue = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.05
    tissue[:, :, :3] = True                       # tissue cut by the first z face
    r = [int(np.ceil(BONE_CLOSING_MM / v)) for v in vox]
    grid = np.meshgrid(*[np.arange(-k, k + 1) * v for k, v in zip(r, vox)], indexing="ij")
    ball = sum(g**2 for g in grid) <= BONE_CLOSING_MM**2
    padded = np.pad(tissue, [(k, k) for k in r], mode="edge")
    expected = ndimage.binary_closing(padded, ball)[tuple(slice(k, k + n)
                                                          for k, n in zip(r, shape))]
    closed = close_bone(tissue, vox)
    np.testing.assert_array_equal(closed, expected)
    assert closed[:, :, 0].all()
    # a 4 mm gap between two slabs closes, a 20 mm one does not
    slabs = np.zeros((40, 12, 12), bool)
    slabs[:10], slabs[14:24], slabs[44 // 2 + 20:] = True, True, True
    closed = close_bone(slabs, (1.0, 1.0, 1.0))
    assert closed[10:14].all() and not closed[25:42].any()


def test_air_model_field_is_the_dipole_field_of_the_air():
    """The air model (real FFTs, the tissue continued past the grid's faces) is
    the field of chi = -1 in the tissue: with tissue all around a ball of air,
    the field of +1 ppm in the ball up to a constant, which the complex FFT of
    kernels.dipole_convolve (zero padding) gives independently; and, as
    physics says, raised along B0 beside the ball's poles, lowered at its
    equator."""
    from qsmprep.qsm.kernels import dipole_convolve, sphere_field
    from qsmprep.qsm.phase_sign import air_model_field

    shape, vox, b0 = (48, 48, 40), (1.0, 1.0, 1.25), (0.0, 0.3, 0.954)
    _, ball = sphere_field(shape, vox, 7.0, 1.0, b0)
    model = air_model_field(~ball, vox, b0)
    reference = dipole_convolve(ball.astype(np.float32), vox, b0)
    outside = ~ndimage.binary_dilation(ball, iterations=2)
    diff = (model - reference)[outside]
    assert np.abs(diff - diff.mean()).max() < 1e-3 * np.abs(reference).max()
    centre = np.array(shape) // 2
    pole = centre + np.round(9.0 * np.array(b0) / np.array(vox)).astype(int)
    equator = centre + np.array([9, 0, 0])
    assert model[tuple(pole)] > 0.05 > -0.02 > model[tuple(equator)]


def test_remove_polynomial_removes_a_shim_and_fits_several_maps_at_once():
    """A second-order polynomial in mm (what a shim removes) leaves only the
    rest; maps stacked on a last axis get each its own fit, as one by one."""
    from qsmprep.qsm.phase_sign import remove_polynomial

    rng = np.random.default_rng(3)
    shape, vox = (20, 24, 18), (1.0, 1.2, 1.5)
    x, y, z = (np.indices(shape) * np.reshape(vox, (3, 1, 1, 1))).astype(float)
    mask = ((x - 10) ** 2 + (y - 14) ** 2 + (z - 13) ** 2) < 81
    rest = rng.normal(size=shape)
    shim = 0.3 + 0.02 * x - 0.01 * y * z + 0.004 * x * x
    alone = remove_polynomial(rest + shim, mask, vox)
    np.testing.assert_allclose(alone, remove_polynomial(rest, mask, vox), atol=1e-9)
    assert abs(np.corrcoef(alone, rest[mask])[0, 1]) > 0.9   # the rest is kept
    both = remove_polynomial(np.stack([rest + shim, -2 * shim], axis=-1), mask, vox)
    assert both.shape == (mask.sum(), 2)
    np.testing.assert_allclose(both[:, 0], alone, atol=1e-9)
    np.testing.assert_allclose(both[:, 1], 0.0, atol=1e-9)
