"""Multi-echo signal model and the simulated BIDS dataset."""

import json

import nibabel as nib
import numpy as np
import pytest

from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T, b0_dir_from_affine
from qsmprep.sim.phantoms import LABELS, challenge_head, mni_head
from qsmprep.sim.signal import magnitude_phase, multi_echo_signal


def _wrap(x):
    return np.angle(np.exp(1j * x))


def test_phase_wraps_are_consistent_with_field_times_te():
    rng = np.random.default_rng(0)
    shape, te, b0 = (16, 16, 8), np.array([0.004, 0.009, 0.014]), 7.0
    field = rng.uniform(-1.0, 1.0, shape).astype(np.float32)  # ppm: many wraps at 7 T
    offset = rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
    r2s = rng.uniform(10, 60, shape).astype(np.float32)
    mag, phase = magnitude_phase(multi_echo_signal(field, 0.8, r2s, te, b0, phase_offset_rad=offset,
                                                   intravoxel_dephasing=False))
    assert phase.shape == shape + (3,) and phase.min() >= -np.pi and phase.max() <= np.pi
    omega = 2 * np.pi * field * GAMMA_BAR_MHZ_PER_T * b0  # rad/s
    expected = omega[..., None] * te + offset[..., None]
    assert np.abs(_wrap(phase - expected)).max() < 1e-3
    assert np.abs(expected).max() > 6 * np.pi  # the test really has wraps
    # echo differences give the field back without the offset
    dphi = _wrap(phase[..., 1] - phase[..., 0])
    np.testing.assert_allclose(dphi, _wrap(omega * (te[1] - te[0])), atol=1e-3)
    np.testing.assert_allclose(mag, 0.8 * np.exp(-r2s[..., None] * te), rtol=1e-5)


def test_intravoxel_dephasing_of_a_linear_gradient_is_a_sinc():
    # field rising by g Hz per voxel along x (and nothing along y, z): the
    # signal averaged over a voxel is sinc(g TE) of the undephased one
    b0, te = 3.0, np.array([0.005, 0.010, 0.020])
    g_hz = 30.0
    x = np.arange(12, dtype=np.float32)
    field_hz = np.broadcast_to(g_hz * x[:, None, None], (12, 6, 5))
    field_ppm = field_hz / (GAMMA_BAR_MHZ_PER_T * b0)
    mag, _ = magnitude_phase(multi_echo_signal(field_ppm, 1.0, 0.0, te, b0))
    expected = np.abs(np.sin(np.pi * g_hz * te) / (np.pi * g_hz * te))
    np.testing.assert_allclose(mag[5, 3, 2], expected, rtol=1e-3)
    assert mag[5, 3, 2, -1] < 0.8 * mag[5, 3, 2, 0]  # later echoes lose more
    # a uniform field loses nothing; switching the model off restores |S| = M0
    flat, _ = magnitude_phase(multi_echo_signal(np.full((8, 8, 8), 0.3), 1.0, 0.0, te, b0))
    np.testing.assert_allclose(flat, 1.0, rtol=1e-5)
    off, _ = magnitude_phase(multi_echo_signal(field_ppm, 1.0, 0.0, te, b0,
                                               intravoxel_dephasing=False))
    np.testing.assert_allclose(off, 1.0, rtol=1e-5)


def test_noise_level_follows_snr():
    m0 = np.ones((40, 40, 20), np.float32)
    sig = multi_echo_signal(np.zeros_like(m0), m0, 0.0, [0.005], 3.0, snr=25.0, rng=1)
    noise = sig[..., 0] - 1.0
    assert abs(noise.real.std() - 1 / 25) < 0.002 and abs(noise.imag.std() - 1 / 25) < 0.002
    with pytest.raises(ValueError, match="echo_times_s"):
        multi_echo_signal(m0, m0, 0.0, [4.0, -1.0], 3.0)


@pytest.mark.slow  # ~12 s idle: four whole-head phantoms
def test_phantoms_are_reproducible_and_consistent():
    a = challenge_head(4.0, rng=3)
    b = challenge_head(4.0, rng=3)
    c = challenge_head(4.0, rng=4, texture=False, vessels=False, lesions=False)
    np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)
    assert not np.array_equal(a.chi_ppm, c.chi_ppm)
    assert a.chi_ppm.shape == a.labels.shape == a.brain_mask.shape == (41, 51, 51)
    assert set(np.unique(a.labels)) <= set(LABELS)
    # brain: mostly parenchyma with chi near zero; outside: air and bone
    assert abs(np.median(a.chi_ppm[a.brain_mask])) < 0.05
    assert np.median(a.chi_ppm[a.labels == 14]) == pytest.approx(9.2)
    assert np.median(a.m0[a.labels == 14]) == 0 and (a.m0[a.brain_mask] > 0).all()
    m = mni_head(4.0, rng=0, texture=False, vessels=False, lesions=False)
    assert 0.9e6 < m.brain_mask.sum() * 64 < 2.2e6  # brain volume in mm^3
    for lab in (2, 3, 7, 13, 14):  # nuclei, skull, air are present
        assert (m.labels == lab).any()


def test_cli_writes_a_valid_bids_dataset(tmp_path):
    bids = pytest.importorskip("bids")
    from qsmprep.sim.cli import main

    out = tmp_path / "ds"
    te = [0.005, 0.010, 0.015]
    assert main([str(out), "--subjects", "2", "--sessions", "1", "--voxel-size", "4",
                 "--matrix", "32", "36", "32", "--te", *map(str, te), "--field-strength", "7",
                 "--b0-angle", "20", "--seed", "5"]) == 0
    layout = bids.BIDSLayout(out, derivatives=True, validate=True)
    assert layout.get_subjects() == ["01", "02"] and layout.get_sessions() == ["01"]
    phase = layout.get(subject="01", suffix="MEGRE", part="phase", extension=".nii.gz",
                       scope="raw")
    mag = layout.get(subject="01", suffix="MEGRE", part="mag", extension=".nii.gz", scope="raw")
    assert [int(f.entities["echo"]) for f in phase] == [1, 2, 3] and len(mag) == 3
    meta = phase[1].get_metadata()
    assert meta["EchoTime"] == te[1] and meta["Units"] == "rad"
    assert meta["MagneticFieldStrength"] == 7.0
    img = nib.load(phase[1].path)
    assert img.shape == (32, 36, 32)
    b0 = b0_dir_from_affine(img.affine)
    np.testing.assert_allclose(b0, meta["B0_dir"], atol=1e-6)
    assert np.degrees(np.arccos(b0[2])) == pytest.approx(20.0, abs=1e-4)
    chi = layout.get(subject="01", suffix="Chimap", extension=".nii.gz", scope="qsmprep-sim")
    assert len(chi) == 1 and chi[0].get_metadata()["Units"] == "ppm"
    for desc in ("total", "local"):
        assert layout.get(subject="01", desc=desc, suffix="fieldmap", extension=".nii.gz",
                          scope="qsmprep-sim")
    mask = layout.get(subject="01", desc="brain", suffix="mask", extension=".nii.gz",
                      scope="qsmprep-sim")
    assert np.asarray(nib.load(mask[0].path).dataobj).any()
    # the phase encodes the ground-truth total field (noise aside)
    total = nib.load(layout.get(subject="01", desc="total", suffix="fieldmap",
                                extension=".nii.gz", scope="qsmprep-sim")[0].path).get_fdata()
    brain = np.asarray(nib.load(mask[0].path).dataobj) > 0
    p = [nib.load(f.path).get_fdata() for f in phase]
    omega = 2 * np.pi * total * GAMMA_BAR_MHZ_PER_T * 7.0
    resid = _wrap(p[2] - p[1] - omega * (te[2] - te[1]))[brain]
    assert np.median(np.abs(resid)) < 0.1
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]


def test_texture_amplitude_is_a_floor_plus_a_fraction_of_chi():
    """Two flat tissues (0 and 0.3 ppm): the texture's std in each is
    ``floor + relative * |chi|``; nothing is added outside the brain."""
    from qsmprep.sim.phantoms import add_texture

    chi = np.zeros((64, 64, 64), np.float32)
    chi[32:] = 0.3
    brain = np.zeros(chi.shape, bool)
    brain[4:60, 4:60, 4:60] = True
    out = add_texture(chi, brain, (1.0, 1.0, 1.0), np.random.default_rng(0),
                      floor_ppm=0.01, relative=0.2, fwhm_mm=2.0)
    low, high = brain & (chi == 0), brain & (chi > 0)
    assert np.std(out[low]) == pytest.approx(0.01, rel=0.15)
    assert np.std(out[high]) == pytest.approx(0.01 + 0.2 * 0.3, rel=0.15)
    np.testing.assert_array_equal(out[~brain], chi[~brain])
