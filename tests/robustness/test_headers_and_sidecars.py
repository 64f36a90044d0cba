"""Damaged files, inconsistent headers and sloppy sidecars are caught before
processing, with a message naming the file and the fix."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from _chain import centered_affine, sphere_signal, write_run

from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T
from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import collect_data

TE = (0.004, 0.008)
SHAPE = (16, 16, 16)
AFFINE = centered_affine(np.diag([2.0, 2.0, 2.0]), SHAPE)


@pytest.fixture(scope="module")
def signal():
    return sphere_signal(AFFINE, SHAPE, TE)[0]


@pytest.fixture
def dataset(tmp_path, signal):
    files = write_run(tmp_path, signal, AFFINE, TE)
    return tmp_path, files


def _collect(root):
    return collect_data(root, validate=False)["01"][0]


def _error(root):
    with pytest.raises(QSMPrepInputError) as err:
        collect_data(root, validate=False)
    return str(err.value)


def _sidecar(path, **changes):
    sidecar = Path(str(path).replace(".nii.gz", ".json"))
    meta = json.loads(sidecar.read_text())
    meta.update(changes)
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_zero_size_file(dataset):
    root, files = dataset
    files["phase"][1].write_bytes(b"")
    msg = _error(root)
    assert str(files["phase"][1]) in msg and "is empty (0 bytes)" in msg and "re-export" in msg


def test_truncated_gzip_file(dataset):
    root, files = dataset
    raw = files["mag"][0].read_bytes()
    files["mag"][0].write_bytes(raw[: len(raw) // 2])
    msg = _error(root)
    assert str(files["mag"][0]) in msg and "truncated" in msg and "re-export" in msg


def test_truncated_uncompressed_file(dataset):
    root, files = dataset
    path = files["phase"][0]
    plain = path.with_name(path.name.replace(".nii.gz", ".nii"))
    plain.write_bytes(gzip.decompress(path.read_bytes())[:-100])
    path.unlink()
    msg = _error(root)
    assert str(plain) in msg and "truncated" in msg and "bytes" in msg


def test_complete_multi_member_gzip_is_accepted(dataset):
    """A gzip trailer that does not give the size (concatenated members) is
    checked by reading the stream, not rejected."""
    root, files = dataset
    path = files["phase"][0]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert _collect(root).phase[0] == str(path)


def _tilt_sform(files, qform_code):
    for path in files["phase"] + files["mag"]:
        img = nb.load(path)
        tilted = img.affine.copy()
        tilted[:3, :3] = tilted[:3, :3] @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])
        img.set_sform(tilted, code=2)
        img.set_qform(AFFINE, code=qform_code)
        img.to_filename(path)


def test_qform_sform_mismatch_warns_and_uses_the_scanner_qform(dataset, caplog):
    # a registered/resampled sform beside the scanner's qform (qform_code 1):
    # the qform gives B0 (issue 24)
    root, files = dataset
    _tilt_sform(files, qform_code=1)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        run = _collect(root)
    assert "qform and sform" in caplog.text and files["phase"][0].name in caplog.text
    assert "the qform is used for the B0 direction" in caplog.text
    np.testing.assert_allclose(run.b0_dir, (0, 0, 1), atol=1e-6)  # the qform's
    assert run.b0_dir_source.startswith("qform of the header (qform_code 1")


def test_qform_sform_mismatch_uses_the_sform_when_the_qform_is_not_the_scanners(
        dataset, caplog):
    root, files = dataset
    _tilt_sform(files, qform_code=2)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        run = _collect(root)
    assert "qform and sform" in caplog.text and files["phase"][0].name in caplog.text
    assert "fslorient -copyqform2sform" in caplog.text
    np.testing.assert_allclose(run.b0_dir, (0, 0.6, 0.8), atol=1e-6)  # the sform's
    assert run.b0_dir_source.startswith("sform")


def test_header_without_orientation_warns(dataset, caplog):
    root, files = dataset
    for path in files["phase"] + files["mag"]:
        img = nb.load(path)
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
        img.to_filename(path)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        _collect(root)
    assert "neither qform nor sform" in caplog.text and "B0_dir" in caplog.text


def test_numbers_written_as_strings(dataset):
    root, files = dataset
    for path in files["phase"] + files["mag"]:
        te = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())["EchoTime"]
        _sidecar(path, EchoTime=f"{te}", MagneticFieldStrength="3")
    run = _collect(root)
    assert run.echo_times_s == TE and run.field_strength_t == 3.0


def test_text_where_a_number_is_expected(dataset):
    root, files = dataset
    _sidecar(files["phase"][0], MagneticFieldStrength="3 Tesla")
    msg = _error(root)
    assert "MagneticFieldStrength" in msg and "'3 Tesla'" in msg and "not a number" in msg


def test_echo_time_in_milliseconds_is_detected_and_converted_in_the_message(dataset):
    root, files = dataset
    for path, te in zip(files["phase"], TE):
        _sidecar(path, EchoTime=te * 1000)
    msg = _error(root)
    assert files["phase"][0].name in msg and "looks like milliseconds" in msg
    assert "write 0.004" in msg


def test_missing_field_strength_falls_back_to_imaging_frequency(dataset):
    root, files = dataset
    for path in files["phase"] + files["mag"]:
        _sidecar(path, MagneticFieldStrength=None, ImagingFrequency=7 * GAMMA_BAR_MHZ_PER_T)
    assert _collect(root).field_strength_t == pytest.approx(7.0)


def test_missing_field_strength_without_imaging_frequency(dataset):
    root, files = dataset
    for path in files["phase"] + files["mag"]:
        _sidecar(path, MagneticFieldStrength=None)
    msg = _error(root)
    assert files["phase"][0].name in msg and '"MagneticFieldStrength": 3' in msg
