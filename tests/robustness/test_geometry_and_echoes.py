"""Unusual acquisitions give the right susceptibility: orientation, voxel
shape, matrix size, slab thickness, number and spacing of echoes, bipolar
readouts.

Each case writes a tiny run of a sphere of known chi, computed analytically
in world coordinates with B0 along world z, so the test fails if qsmprep
misreads the affine (B0 direction or voxel size), and runs the workflow's
interfaces on it (``_chain.run_chain``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from _chain import CHI, centered_affine, data, run_chain, sphere_signal, write_run
from scipy.spatial.transform import Rotation

from qsmprep.config import Config
from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import check_methods, collect_data
from qsmprep.workflows.qsm import init_qsm_wf

TE = (0.004, 0.008, 0.012, 0.016)
ISO = np.diag([2.0, 2.0, 2.0])


def _process(tmp_path, rotation_zoom, shape, echo_times=TE, config=None, signal=None):
    affine = centered_affine(rotation_zoom, shape)
    sig, chi, _ = sphere_signal(affine, shape, echo_times)
    if signal is not None:
        sig = signal(sig)
    write_run(tmp_path / "bids", sig, affine, echo_times)
    run = collect_data(tmp_path / "bids", validate=False)["01"][0]
    out = run_chain(run, tmp_path / "work", config)
    return run, out, chi


def _sphere_chi(out, chi):
    """Mean chi in the sphere minus the mean elsewhere in the final mask (ppm)."""
    result = data(out["referencing"].chi)
    mask = data(out["bf_removal"].mask) > 0
    return float(result[mask & (chi > 0)].mean() - result[mask & (chi == 0)].mean())


@pytest.fixture(scope="module")
def axial(tmp_path_factory):
    run, out, chi = _process(tmp_path_factory.mktemp("axial"), ISO, (32, 32, 32))
    return _sphere_chi(out, chi)


def test_axial_reference_recovers_the_sphere(axial):
    assert 0.35 * CHI < axial < 1.2 * CHI


@pytest.mark.parametrize("name, rotation_zoom, b0", [
    ("LPS", np.diag([-2.0, -2.0, 2.0]), (0, 0, 1)),
    ("sagittal", np.array([[0, 0, 2.0], [2.0, 0, 0], [0, 2.0, 0]]), (0, 1, 0)),
    ("oblique 25 deg", Rotation.from_euler("x", 25, degrees=True).as_matrix() @ ISO,
     (0, np.sin(np.radians(25)), np.cos(np.radians(25)))),
])
def test_orientation_gives_the_same_chi(tmp_path, axial, name, rotation_zoom, b0):
    run, out, chi = _process(tmp_path, rotation_zoom, (32, 32, 32))
    np.testing.assert_allclose(np.abs(run.b0_dir), b0, atol=1e-6)
    assert _sphere_chi(out, chi) == pytest.approx(axial, abs=0.1 * CHI), name


@pytest.mark.parametrize("rotation_zoom, shape", [
    (np.diag([0.5, 0.5, 2.0]), (72, 72, 18)),  # anisotropic voxels
    (ISO, (31, 35, 29)),  # odd matrix
])
def test_anisotropic_voxels_and_odd_matrix(tmp_path, rotation_zoom, shape):
    run, out, chi = _process(tmp_path, rotation_zoom, shape)
    assert data(out["referencing"].chi).shape == shape
    assert 0.35 * CHI < _sphere_chi(out, chi) < 1.2 * CHI


def test_thin_slab_warns_and_runs_with_non_eroding_background_removal(tmp_path, caplog):
    config = Config()
    config.workflow.bf_removal = "pdf"
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        run, out, chi = _process(tmp_path, ISO, (32, 32, 5), config=config)
    assert "thin slab (5 voxels, 10 mm along axis 2)" in caplog.text
    assert Path(run.phase[0]).name in caplog.text and "--bf-removal pdf" in caplog.text
    mask = data(out["bf_removal"].mask) > 0
    result = data(out["referencing"].chi)
    assert mask.sum() > 0.5 * (chi == 0).sum() / 5 and np.isfinite(result).all()


def test_eroding_background_removal_on_a_three_slice_slab_fails_clearly(tmp_path):
    # V-SHARP erodes the mask by its radius (the default PDF keeps the whole mask)
    config = Config.from_dict({"workflow": {"bf_removal": "vsharp"}})
    with pytest.raises(ValueError, match="no voxel farther than"):
        _process(tmp_path, ISO, (32, 32, 3), config=config)


@pytest.mark.parametrize("echo_times", [(0.012,), (0.006, 0.014), (0.004, 0.007, 0.015, 0.018)],
                         ids=["single echo", "two echoes", "uneven echoes"])
def test_echo_count_and_spacing(tmp_path, echo_times):
    def with_offset(sig):  # an echo-independent phase offset, as from a real coil
        return sig * np.exp(1j * 0.8)

    run, out, chi = _process(tmp_path, ISO, (32, 32, 32), echo_times, signal=with_offset)
    assert ("phase_offset" in out) == (len(echo_times) > 1)
    assert 0.35 * CHI < _sphere_chi(out, chi) < 1.2 * CHI


def _bipolar(sig):
    """Even echoes of a bipolar readout: an extra phase linear along the readout."""
    x = np.linspace(-1.5, 1.5, sig.shape[0])[:, None, None]
    sig = sig.copy()
    sig[..., 1::2] *= np.exp(1j * (x + 0.5))
    return sig


def test_bipolar_flag_reaches_mcpc3ds_and_removes_the_even_echo_phase(tmp_path):
    config = Config.from_dict({"workflow": {"params": {"phase_offset": {"bipolar": True}}}})
    run, out, chi = _process(tmp_path / "on", ISO, (32, 32, 32), config=config,
                             signal=_bipolar)
    assert 0.35 * CHI < _sphere_chi(out, chi) < 1.2 * CHI
    config.execution.bids_dir = str(tmp_path / "on" / "bids")
    config.execution.output_dir = str(tmp_path / "out")
    wf = init_qsm_wf(config, run)
    assert wf.get_node("phase_offset").inputs.params == {"bipolar": True}
    # without the flag the even-echo phase corrupts the field map
    _, off, _ = _process(tmp_path / "off", ISO, (32, 32, 32), signal=_bipolar)
    _, clean, _ = _process(tmp_path / "clean", ISO, (32, 32, 32))
    mask = data(clean["masking"].mask) > 0
    truth = data(clean["echo_combine"].fieldmap)[mask]
    err_on, err_off = (np.abs(data(o["echo_combine"].fieldmap)[mask] - truth).mean()
                       for o in (out, off))
    assert err_on < 3.0 and err_off > 5 * err_on, (err_on, err_off)  # Hz


def test_bipolar_needs_three_echoes(tmp_path):
    affine = centered_affine(ISO, (16, 16, 16))
    sig, _, _ = sphere_signal(affine, (16, 16, 16), TE[:2])
    write_run(tmp_path, sig, affine, TE[:2])
    data_ = collect_data(tmp_path, validate=False)
    config = Config.from_dict({"workflow": {"params": {"phase_offset": {"bipolar": True}}}})
    with pytest.raises(QSMPrepInputError, match="needs 3 or more"):
        check_methods(data_, config.workflow)


def test_total_field_inversion_pipeline_recovers_the_sphere(tmp_path):
    """--pipeline tfi: no background stage, the linear background fitted by
    TFI's outside sources; the sphere's chi comes out as with the default chain."""
    rot = Rotation.from_euler("xy", [20, -10], degrees=True).as_matrix() * 2.0
    config = Config.from_dict({"workflow": {"pipeline": "tfi"}})
    run, out, chi = _process(tmp_path, rot, (32, 32, 32), config=config)
    got = _sphere_chi(out, chi)
    assert 0.35 * CHI < got < 1.2 * CHI, got
    # the background stage passed the total field through, on the whole mask
    assert np.array_equal(data(out["bf_removal"].mask), data(out["masking"].mask))


def test_no_background_removal_needs_the_total_field_inversion():
    config = Config.from_dict({"workflow": {"bf_removal": "none", "inversion": "tv"}})
    with pytest.raises(QSMPrepInputError, match="only --inversion tfi fits the background"):
        check_methods({}, config.workflow)
    check_methods({}, Config.from_dict({"workflow": {"pipeline": "tfi"}}).workflow)
