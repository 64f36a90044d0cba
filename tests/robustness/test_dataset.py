"""Dataset-level problems: subjects without GRE data, duplicates, unrelated
and .bidsignore'd files, no dataset_description.json, read-only input."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from _chain import centered_affine, sphere_signal, write_run

from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import collect_data

TE = (0.004, 0.008)
SHAPE = (12, 12, 12)
AFFINE = centered_affine(np.diag([3.0, 3.0, 3.0]), SHAPE)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Two subjects with a two-echo run each."""
    root = tmp_path_factory.mktemp("template")
    sig = sphere_signal(AFFINE, SHAPE, TE)[0]
    for subject in ("01", "02"):
        write_run(root, sig, AFFINE, TE, subject=subject)
    return root


@pytest.fixture
def dataset(template, tmp_path):
    return Path(shutil.copytree(template, tmp_path / "bids"))


def _names(data):
    return {s: [run.name for run in runs] for s, runs in data.items()}


@pytest.mark.parametrize("validate", [True, False])
def test_subject_without_gre_data_is_skipped_with_a_warning(dataset, caplog, validate):
    anat = dataset / "sub-03" / "anat"
    anat.mkdir(parents=True)
    shutil.copy(dataset / "sub-01" / "anat" / "sub-01_echo-1_part-mag_MEGRE.nii.gz",
                anat / "sub-03_T1w.nii.gz")
    (anat / "sub-03_T1w.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        data = collect_data(dataset, validate=validate)
    assert sorted(data) == ["01", "02"]
    assert "sub-03 has no multi-echo GRE" in caplog.text and "skipped" in caplog.text
    with pytest.raises(QSMPrepInputError, match="sub-03 has no MEGRE or T2starw"):
        collect_data(dataset, participant_label=["03"], validate=validate)


def test_same_image_as_nii_and_nii_gz(dataset):
    gz = dataset / "sub-01" / "anat" / "sub-01_echo-2_part-phase_MEGRE.nii.gz"
    gz.with_name(gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    with pytest.raises(QSMPrepInputError) as err:
        collect_data(dataset, validate=False)
    assert gz.name in str(err.value) and "stored twice" in str(err.value)
    assert "delete one" in str(err.value)


def test_repeated_runs_are_processed_separately(dataset):
    anat = dataset / "sub-01" / "anat"
    for f in list(anat.iterdir()):
        shutil.copy(f, anat / f.name.replace("sub-01_", "sub-01_run-2_"))
        f.rename(anat / f.name.replace("sub-01_", "sub-01_run-1_"))
    assert _names(collect_data(dataset)) == {"01": ["run-1", "run-2"], "02": ["MEGRE"]}


def test_unrelated_files_are_ignored(dataset):
    (dataset / "README").write_text("a dataset")
    (dataset / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    (dataset / "sub-01" / "anat" / "notes.txt").write_text("scanner crashed twice")
    (dataset / "sub-01" / "anat" / "sub-01_T2w.nii.gz").write_bytes(b"not even an image")
    func = dataset / "sub-01" / "func"
    func.mkdir()
    (func / "sub-01_task-rest_bold.nii.gz").write_bytes(b"")
    (dataset / "sourcedata" / "dicoms").mkdir(parents=True)
    (dataset / "sourcedata" / "dicoms" / "x.dcm").write_bytes(b"\0" * 10)
    for validate in (True, False):
        assert _names(collect_data(dataset, validate=validate)) == {"01": ["MEGRE"],
                                                                    "02": ["MEGRE"]}


@pytest.mark.parametrize("pattern", ["*_acq-old_*", "sub-01/anat/*_acq-old_*",
                                     "/sub-01/", "old/"])
def test_bidsignored_files_are_left_out(dataset, pattern):
    anat = dataset / "sub-01" / "anat"
    if pattern == "old/":  # a folder of old exports inside anat
        (anat / "old").mkdir()
        target = anat / "old"
    else:
        target = anat
    for f in list(anat.glob("sub-01_echo-*")):
        shutil.copy(f, target / f.name.replace("sub-01_", "sub-01_acq-old_"))
    (dataset / ".bidsignore").write_text(f"# old exports\n{pattern}\n")
    data = collect_data(dataset, validate=False)
    expected = {"02": ["MEGRE"]} if pattern == "/sub-01/" else {"01": ["MEGRE"],
                                                                  "02": ["MEGRE"]}
    assert _names(data) == expected


def test_missing_dataset_description_names_the_fix(dataset):
    (dataset / "dataset_description.json").unlink()
    with pytest.raises(QSMPrepInputError) as err:
        collect_data(dataset)
    assert str(dataset) in str(err.value) and '"BIDSVersion": "1.9.0"' in str(err.value)


def _snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in Path(root).rglob("*")}


def test_read_only_input_dataset(dataset):
    """Collection reads the dataset without writing anything into it (not even
    a pybids database). Run as root the mode bits do not stop writes, so the
    snapshot comparison is what proves it."""
    paths = [dataset, *dataset.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = _snapshot(dataset)
        data = collect_data(dataset)
        assert _names(data) == {"01": ["MEGRE"], "02": ["MEGRE"]}
        assert _snapshot(dataset) == before
        assert not os.access(dataset, os.W_OK) or os.geteuid() == 0
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert json.loads((dataset / "dataset_description.json").read_text())["Name"]
