"""Voxel values as scanners and converters store them: phase in scanner
integers, real/imaginary parts, no magnitude, NaN/Inf, scl_slope, int16."""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np
import pytest
from _chain import CHI, centered_affine, data, load_run, run_chain, sphere_signal, write_run

from qsmprep.config import Config
from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import check_methods, collect_data

TE = (0.004, 0.008, 0.012)
SHAPE = (24, 24, 24)
AFFINE = centered_affine(np.diag([2.5, 2.5, 2.5]), SHAPE)


@pytest.fixture(scope="module")
def signal():
    sig, chi, brain = sphere_signal(AFFINE, SHAPE, TE)
    return sig


def _wrap(x):
    return np.angle(np.exp(1j * x))


def _collect(root):
    return collect_data(root, validate=False)["01"][0]


@pytest.mark.parametrize("encoding, units", [
    ("signed", "arbitrary"), ("signed", None), ("unsigned", "arbitrary"), ("unsigned", None),
])
def test_phase_in_scanner_integers(tmp_path, signal, caplog, encoding, units):
    """-4096..4095 (Siemens) or 0..4095, stored as int16, with or without Units."""
    def encode(part, vol):
        if part != "phase":
            return vol
        if encoding == "signed":  # -pi..pi -> -4096..4095
            return np.round(vol * 4096 / np.pi).clip(-4096, 4095).astype(np.int16)
        return (np.round((vol + np.pi) * 4096 / (2 * np.pi)) % 4096).astype(np.int16)

    write_run(tmp_path / "bids", signal, AFFINE, TE, meta={"Units": units}, encode=encode)
    run = _collect(tmp_path / "bids")
    assert run.phase_units == units
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        out = load_run(run, tmp_path / "load")
    assert out.phase_units == "arbitrary"
    assert ("no Units" in caplog.text) == (units is None)
    error = _wrap(data(out.phase) - np.angle(signal))
    assert np.abs(error).max() < 1.01 * np.pi / 4096  # half a step of 0..4095


def test_real_and_imaginary_parts_give_the_magnitude_phase_result(tmp_path, signal):
    write_run(tmp_path / "mp", signal, AFFINE, TE)
    write_run(tmp_path / "ri", signal, AFFINE, TE, parts=("real", "imag"))
    mp, ri = _collect(tmp_path / "mp"), _collect(tmp_path / "ri")
    assert ri.complex_parts and "part-real" in str(ri.magnitude[0])
    assert "part-imag" in str(ri.phase[0])
    a, b = run_chain(mp, tmp_path / "w_mp"), run_chain(ri, tmp_path / "w_ri")
    np.testing.assert_allclose(data(b["load"].magnitude), data(a["load"].magnitude), atol=1e-5)
    np.testing.assert_allclose(data(b["total_field"].total_field),
                               data(a["total_field"].total_field), atol=1e-4)  # ppm
    # chi: the same up to the iterative inversion's sensitivity to rounding (CG stopped
    # at a fixed count); a wrong phase from the complex parts would differ by ~100 %
    chi_a, chi_b = data(a["referencing"].chi), data(b["referencing"].chi)
    assert np.linalg.norm(chi_b - chi_a) < 0.05 * np.linalg.norm(chi_a)


def test_real_without_imaginary_part_is_an_error(tmp_path, signal):
    write_run(tmp_path, signal, AFFINE, TE, parts=("real",))
    with pytest.raises(QSMPrepInputError, match="part-real.*has no part-imag partner"):
        _collect(tmp_path)


def test_phase_only_run_uses_the_quality_mask(tmp_path, caplog):
    sig, chi, brain = sphere_signal(AFFINE, SHAPE, TE)
    write_run(tmp_path / "bids", sig, AFFINE, TE, parts=("phase",))
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        data_ = collect_data(tmp_path / "bids", validate=False)
    run = data_["01"][0]
    assert run.magnitude == () and "no part-mag partner" in caplog.text
    with pytest.raises(QSMPrepInputError, match="--masking quality"):
        check_methods(data_, Config().workflow)
    config = Config()
    config.workflow.masking = "quality"
    check_methods(data_, config.workflow)
    out = run_chain(run, tmp_path / "work", config)
    assert np.all(data(out["load"].magnitude) == 1)
    # the phase-quality mask finds the object without any magnitude...
    mask = data(out["masking"].mask) > 0
    assert (mask & brain).sum() > 0.9 * brain.sum() and mask.sum() < 2 * brain.sum()
    # ...and the sphere's susceptibility is recovered (within 50 %: a 2.4-voxel
    # sphere, and the looser mask keeps noisy rim voxels)
    result, final = data(out["referencing"].chi), data(out["bf_removal"].mask) > 0
    sphere = result[final & (chi > 0)].mean() - result[final & (chi == 0)].mean()
    assert 0.5 * CHI < sphere < 1.5 * CHI


def test_nan_and_inf_voxels(tmp_path, signal, caplog):
    def encode(part, vol):
        vol = vol.copy()
        vol[3, 4, 5] = np.nan if part == "phase" else np.inf
        return vol

    files = write_run(tmp_path / "bids", signal, AFFINE, TE, encode=encode)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        out = run_chain(_collect(tmp_path / "bids"), tmp_path / "work")
    assert files["phase"][0].name in caplog.text and "NaN/Inf" in caplog.text
    for step, field in (("load", "phase"), ("load", "magnitude"), ("referencing", "chi")):
        assert np.isfinite(data(getattr(out[step], field))).all()
    assert not data(out["load"].valid)[3, 4, 5]
    assert not data(out["masking"].mask)[3, 4, 5]


def test_scl_slope_and_integer_storage(tmp_path, signal):
    """int16 phase with scl_slope (rad per unit) and int16 magnitude load like float32."""
    write_run(tmp_path / "float", signal, AFFINE, TE)
    files = write_run(tmp_path / "int", signal, AFFINE, TE)
    for path in files["phase"] + files["mag"]:
        img = nb.load(path)
        vol = img.get_fdata()
        slope = np.pi / 4096 if "phase" in path.name else np.abs(vol).max() / 30000
        out = nb.Nifti1Image(np.round(vol / slope).astype(np.int16), img.affine)
        out.header.set_slope_inter(slope, 0)
        out.to_filename(path)
    a = load_run(_collect(tmp_path / "float"), tmp_path / "la")
    b = load_run(_collect(tmp_path / "int"), tmp_path / "lb")
    assert b.phase_units == "rad"
    np.testing.assert_allclose(data(b.phase), data(a.phase), atol=np.pi / 4096)
    scale = data(a.magnitude).max()
    np.testing.assert_allclose(data(b.magnitude), data(a.magnitude), atol=scale / 20000)
