"""Group level with regions: long table, processing metadata, HTML report in Chromium."""

from __future__ import annotations

import csv
import json
import time

import pytest

from qsmprep.cli.run import main
from qsmprep.reports import browser
from qsmprep.sim.group_outputs import write_synthetic_outputs
from qsmprep.workflows.group import write_group_outputs


@pytest.fixture(scope="module")
def group_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("group") / "out"
    ids = write_synthetic_outputs(out, 12, runs_per_subject=2, outliers=("sub-005_run-2",),
                                  changed_settings=("sub-011_run-1",))
    paths = write_group_outputs(out)
    return out, ids, paths


def test_regions_table_is_long_format_with_the_outlier_flagged(group_outputs):
    out, ids, paths = group_outputs
    with open(paths["regions"]) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(ids) * 7
    assert {(r["subject"], r["run"]) for r in rows} == {
        (i.split("_")[0][4:], i.split("_")[1][4:]) for i in ids}
    flagged = [(r["subject"], r["run"], r["region"]) for r in rows if r["outlier"] == "true"]
    assert flagged == [("005", "2", "caudate")]
    caudate = [float(r["mean_ppm"]) for r in rows if r["region"] == "caudate"]
    assert len(caudate) == len(ids)


def test_processing_metadata_flags_runs_with_other_settings(group_outputs):
    out, ids, paths = group_outputs
    meta = json.loads(paths["processing"].read_text())
    assert meta["consistent"] is False
    assert list(meta["differing_settings"]) == ["QSMMethods.inversion"]
    groups = {r["run"]: r["settings_group"] for r in meta["runs"]}
    assert groups.pop("sub-011_run-1") == 2 and set(groups.values()) == {1}
    assert meta["versions"] == ["0.0.0-synthetic"]


def test_group_cli_writes_everything(group_outputs, tmp_path):
    out, ids, _ = group_outputs
    assert main([str(tmp_path), str(out), "group"]) == 0
    for name in ("qsmprep_runs.tsv", "qsmprep_regions.tsv", "qsmprep_regions.json",
                 "qsmprep_processing.json", "qsmprep_group.html"):
        assert (out / "group" / name).is_file(), name


def test_group_report_opens_in_chromium_and_shows_every_subject(group_outputs):
    if browser.find_chromium() is None:
        pytest.skip("Chromium not found: install it with "
                    "`apt-get install -y chromium chromium-driver` to run the browser check")
    out, ids, paths = group_outputs
    seen = browser.check_report(paths["report"])
    assert not seen["console"], seen["console"]
    assert seen["figures_total"] == seen["figures_loaded"] == len(ids)
    for run_id in ids:
        assert run_id in seen["text"], run_id
    assert seen["dom"].count('class="outlier"') == 1
    assert 'href="../sub-005.html"' in seen["dom"]
    assert "settings differ" in seen["text"]


def test_group_level_of_500_runs_takes_under_a_minute(tmp_path):
    out = tmp_path / "out"
    write_synthetic_outputs(out, 500, shape=(16, 16, 8))
    start = time.perf_counter()
    paths = write_group_outputs(out)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    assert paths["report"].read_text().count('class="run"') >= 500
