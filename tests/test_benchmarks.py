"""The benchmark scripts: accuracy scoring and Markdown/JSON writing on a tiny case, and the
classical-method timing harness."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import accuracy  # noqa: E402


@pytest.fixture
def tiny_results():
    shape = (12, 12, 12)
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, bool)
    mask[2:10, 2:10, 2:10] = True
    chi = np.where(mask, rng.normal(0, 0.05, shape), 0).astype(np.float32)
    zeros4 = np.zeros(shape + (2,), np.float32)
    case = accuracy.Case("tiny", "a tiny cube", (1.0,) * 3, (0.0, 0.0, 1.0), 3.0, (0.004, 0.008),
                         mask, None, chi, chi, chi, zeros4, zeros4)

    def broken():
        raise RuntimeError("did not converge")

    rows = [
        accuracy.score_row("inversion", "tkd", case, lambda: 0.5 * chi, chi),
        accuracy.score_row("inversion", "broken", case, broken, chi),
        accuracy.score_row("bf_removal", "vsharp", case, lambda: (chi, mask), chi),
    ]
    return {"quick": True, "hardware": _common.hardware(), "seed": 0, "rows": rows,
            "phantoms": [{"name": "tiny", "description": "a tiny cube", "shape": list(shape)}]}


def test_rows_are_scored_and_failures_kept(tiny_results):
    ok, failed, bfr = tiny_results["rows"]
    assert ok["status"] == "ok" and ok["metrics"]["nrmse"] == pytest.approx(50.0, rel=1e-5)
    assert ok["runtime_s"] >= 0
    assert failed["status"] == "failed" and "did not converge" in failed["error"]
    assert bfr["metrics"]["nrmse"] == pytest.approx(0.0, abs=1e-6)


def test_section_replaced_and_others_kept(tmp_path, tiny_results):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n\n<!-- unwrap:start -->\nUNWRAP TABLE\n"
                    "<!-- unwrap:end -->\n\n<!-- accuracy:start -->\nOLD\n<!-- accuracy:end -->\n"
                    "\ntrailer\n")
    json_path = tmp_path / "accuracy.json"
    full = {**tiny_results, "quick": False}
    for _ in range(2):  # rewriting must not duplicate the section
        accuracy.write_outputs(full, docs, json_path)
    text = docs.read_text()
    assert "UNWRAP TABLE" in text and "intro" in text and "trailer" in text
    assert "OLD" not in text
    assert text.count("<!-- accuracy:start -->") == 1 == text.count("<!-- accuracy:end -->")
    section = text.split("<!-- accuracy:start -->")[1].split("<!-- accuracy:end -->")[0]
    assert "| tkd | tiny | 50.0 |" in section
    assert "- **broken** on tiny: `RuntimeError: did not converge`" in section
    assert "36.3" in section  # the QSM-CI leaderboard value for TKD sits beside it
    saved = json.loads(json_path.read_text())
    assert [r["status"] for r in saved["rows"]] == ["ok", "failed", "ok"]
    # the --quick (2 mm) tables get their own section beside the full ones
    accuracy.write_outputs(tiny_results, docs, tmp_path / "quick.json")
    text = docs.read_text()
    assert text.count("<!-- accuracy-quick:start -->") == 1
    assert text.count("<!-- accuracy:start -->") == 1 and "| tkd | tiny | 50.0 |" in section
    assert "(2 mm, quick mode)" in text.split("<!-- accuracy-quick:start -->")[1]


def test_section_created_when_absent(tmp_path, tiny_results):
    docs = tmp_path / "new.md"
    accuracy.write_outputs(tiny_results, docs, tmp_path / "a.json")
    assert docs.read_text().startswith("# Benchmarks")
    _common.replace_section(docs, "other", "x")
    assert "<!-- accuracy-quick:start -->" in docs.read_text()
    docs.write_text("<!-- accuracy:start -->\nunterminated\n")
    with pytest.raises(ValueError, match="only one of the markers"):
        _common.replace_section(docs, "accuracy", "y")


def test_json_has_no_nan(tmp_path):
    path = tmp_path / "x.json"
    _common.write_json(path, {"a": float("nan"), "b": [np.float32(1.5), np.inf]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None]}


def test_classical_speed_covers_every_classical_method_and_reads_its_own_peak():
    import classical_speed

    methods = classical_speed.classical_methods()
    names = {name for _, name in methods}
    assert {"pdf", "medi", "ilsqr", "vsharp", "tv", "nonlinear", "bet"} <= names
    assert not names & {"nextqsm", "unet", "ir2qsm"}  # timed by dl_speed.py
    # a fresh child's peak excludes this (bigger) process's memory
    ballast = np.ones(2**27, np.uint8)  # 128 MB held here
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import classical_speed; print(classical_speed.peak_rss_gb())",
                          str(Path(classical_speed.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert 0 < float(out.stdout) < classical_speed.peak_rss_gb() and ballast.sum() == 2**27
    row = {"method": "pdf", "wall_s": 100.0, "peak_rss_gb": 5.0}
    assert classical_speed.verdict(row) == ("met", "missed")
    assert classical_speed.verdict({**row, "method": "tv"})[0].startswith("missed")


def test_update_replaces_only_the_rerun_rows(tmp_path, tiny_results):
    old = tiny_results["rows"][0]
    rerun = {**old, "metrics": {**old["metrics"], "nrmse": 10.0}}
    new_row = {**rerun, "method": "unet"}
    merged = accuracy.merge(tiny_results, {"rows": [rerun, new_row], "phantoms": []})
    assert [(r["stage"], r["method"]) for r in merged["rows"]] == [
        ("inversion", "tkd"), ("inversion", "broken"), ("bf_removal", "vsharp"),
        ("inversion", "unet")]
    assert merged["rows"][0]["metrics"]["nrmse"] == 10.0
    assert tiny_results["rows"][0]["metrics"]["nrmse"] == pytest.approx(50.0, rel=1e-5)
    merged["updates"] = [{"date": "2026-11-26", "methods": ["tkd", "unet"], "wall_s": 60.0}]
    merged["rows"].append({**rerun, "stage": "joint", "method": "nextqsm + nextqsm"})
    text = accuracy.render(merged)
    assert "| nextqsm + nextqsm | tiny | 10.0 |" in text and "| 70.3 |" in text  # QSM-CI
    assert "Re-run on 2026-11-26 with `--update` (rows of tkd, unet; 1.0 min)" in text
    merged["updates"].append({"date": "2026-11-27", "methods": None, "skip": ["nextqsm"],
                              "stages": ["bf_removal", "joint"], "wall_s": 120.0,
                              "note": "phantoms fixed"})
    assert ("Re-run on 2026-11-27 with `--update` (rows of every method but nextqsm in the "
            "background field removal, background removal + dipole inversion stages; 2.0 min; "
            "phantoms fixed)") in accuracy.render(merged)


def test_update_of_a_whole_stage_drops_its_stale_rows(tiny_results):
    """A stage re-run with every method replaces that stage's rows on the
    re-run phantoms, also those whose labels are gone (a pipeline variant named
    after an older default), and keeps other stages and phantoms."""
    tkd, broken, vsharp = tiny_results["rows"]
    other = {**tkd, "phantom": "other"}
    saved = {**tiny_results, "rows": [tkd, broken, vsharp, other]}
    new_tkd = {**tkd, "metrics": {**tkd["metrics"], "nrmse": 10.0}}
    new = {"rows": [new_tkd], "phantoms": [{"name": "tiny"}]}
    merged = accuracy.merge(saved, new, whole_stages=["inversion"])
    assert [(r["stage"], r["method"], r["phantom"]) for r in merged["rows"]] == [
        ("bf_removal", "vsharp", "tiny"), ("inversion", "tkd", "other"),
        ("inversion", "tkd", "tiny")]
    assert merged["rows"][-1]["metrics"]["nrmse"] == 10.0
    # by method (the default), the stale "broken" row stays
    assert ("inversion", "broken", "tiny") in {
        (r["stage"], r["method"], r["phantom"]) for r in accuracy.merge(saved, new)["rows"]}


def test_joint_pairs_run_when_one_of_their_methods_is_kept():
    from qsmprep.qsm.kernels import dipole_convolve

    shape = (24, 24, 24)
    grid = np.stack(np.meshgrid(*[np.arange(n) - 11.5 for n in shape], indexing="ij"))
    mask = (grid**2).sum(0) <= 10**2
    chi = np.where((grid**2).sum(0) <= 4**2, 0.1, 0).astype(np.float32)
    local = np.where(mask, dipole_convolve(chi, (1, 1, 1)), 0).astype(np.float32)
    case = accuracy.Case("sphere", "", (1.0,) * 3, (0.0, 0.0, 1.0), 3.0, (0.004,), mask, None,
                         chi, local + 0.01 * grid[0] / 12, local, None, None)
    rows = accuracy.run_case(case, ["joint"], keep=accuracy.selection(["vsharp"]))
    assert [r["method"] for r in rows] == ["vsharp + tv"]
    assert rows[0]["stage"] == "joint" and rows[0]["status"] == "ok", rows[0].get("error")
    assert rows[0]["metrics"]["nrmse"] < 80  # a linear background is removed, chi recovered
    assert [r["method"] for r in accuracy.run_case(
        case, ["joint"], keep=accuracy.selection(["pdf+ilsqr"]))] == ["pdf + ilsqr"]
    # a pair with a skipped method is left out, whatever else is kept
    keep = accuracy.selection(["vsharp", "pdf"], skip=["tv"])
    assert [r["method"] for r in accuracy.run_case(case, ["joint"], keep=keep)] == ["pdf + ilsqr"]


def test_pipeline_variants_selected_by_the_methods_they_change():
    from qsmprep.config import DEFAULT_METHODS

    variants = accuracy.pipeline_variants(True)
    labels = list(variants)
    assert labels[0].startswith("default:")
    assert variants[labels[0]] == {s: DEFAULT_METHODS[s] for s in accuracy.PIPELINE_STAGES}
    classical, ir2qsm = "bf_removal=pdf, inversion=ilsqr", "bf_removal=vsharp, inversion=ir2qsm"
    assert classical in labels and ir2qsm in labels
    assert variants[classical] == {**variants[labels[0]], "bf_removal": "pdf", "inversion": "ilsqr"}
    dl = accuracy.selected_variants(variants, accuracy.selection(["ir2qsm"]))
    assert list(dl) == [ir2qsm]
    pdf = accuracy.selected_variants(variants, accuracy.selection(["pdf"]))
    assert list(pdf) == [v for v in labels if "bf_removal=pdf" in v]
    assert classical in pdf and f"{classical}, masking={accuracy.TRUE_MASK}" in pdf
    # the default is selected by its own methods, not by those it shares
    default_only = accuracy.selected_variants(
        variants, accuracy.selection([DEFAULT_METHODS["referencing"]]))
    assert list(default_only) == [labels[0]]
    assert accuracy.selected_variants(variants, lambda m: True) == variants
    no_tv = accuracy.selected_variants(variants, accuracy.selection(skip=["tv"]))
    assert list(no_tv) == [v for v in labels if "inversion=tv" not in v]


def test_invivo_high_pass_rms_sees_noise_not_smooth_fields():
    import invivo_echo

    rng = np.random.default_rng(0)
    shape = (24, 24, 24)
    mask = np.zeros(shape, bool)
    mask[3:21, 3:21, 3:21] = True
    x = np.arange(24, dtype=np.float32)[:, None, None]
    smooth = 5.0 + 0.1 * (x - 12) ** 2 / 12 + np.zeros(shape, np.float32)
    noise = rng.normal(0, 1.0, shape).astype(np.float32)
    # a constant is exactly zero, also at the mask edge (smoothing inside the mask only)
    assert invivo_echo.high_pass_rms(np.full(shape, 7.0, np.float32), mask) < 1e-5
    assert invivo_echo.high_pass_rms(smooth, mask) < 0.05
    # white noise of std 1: its high-pass part keeps most of the variance
    assert 0.7 < invivo_echo.high_pass_rms(smooth + noise, mask) < 1.0


def test_invivo_dipole_misfit_is_the_unexplained_fraction_of_the_field():
    import invivo_pipelines
    from qsmprep.sim.forward import dipole_convolve

    grid = np.indices((24, 24, 24)) - 11.5
    r2 = (grid**2).sum(0)
    mask = r2 <= 10**2
    chi = np.where(r2 <= 4**2, 0.1, 0.0).astype(np.float32)
    field = np.where(mask, dipole_convolve(chi, (1, 1, 1), invivo_pipelines.B0_DIR), 0.0)
    misfit = invivo_pipelines.dipole_misfit
    assert misfit(chi, field, mask, (1, 1, 1)) < 1e-3  # the source explains its field
    assert misfit(np.zeros_like(chi), field, mask, (1, 1, 1)) == pytest.approx(1.0)
    assert misfit(-chi, field, mask, (1, 1, 1)) == pytest.approx(2.0, abs=1e-3)  # sign error
    # the field along another axis is not explained: B0 is along the voxel z axis
    side = np.where(mask, dipole_convolve(chi, (1, 1, 1), (1, 0, 0)), 0.0)
    assert misfit(chi, side, mask, (1, 1, 1)) > 0.5


# --- the independent suite (benchmarks/independent.py) ---------------------------------------

import independent  # noqa: E402
import independent_heads  # noqa: E402


def test_independent_field_is_qsm_forwards_forward_model():
    """The memory-lean field of the independent heads is qsm-forward's
    ``generate_field`` (both demeaned in the mask; qsm-forward keeps D(0) = 1/3)."""
    qsm_forward = pytest.importorskip("qsm_forward")
    rng = np.random.default_rng(3)
    chi = np.zeros((18, 20, 16), np.float32)
    chi[4:14, 5:15, 3:13] = rng.normal(0, 0.1, (10, 10, 10))
    chi[1:3, 2:6, 1:4] = 9.2
    mask = chi != 0
    for tilt, tol in ((0.0, 1e-6), (20.0, 1e-2)):
        # oblique: the two differ only in the Nyquist planes, where a real FFT
        # takes +k_N and qsm-forward's grid -k_N (both valid samplings)
        b0 = independent_heads.tilted_b0(tilt)
        ours = independent_heads.dipole_field(chi, (1.0, 1.0, 1.0), b0)
        ref = qsm_forward.generate_field(chi.astype(np.float64), mask, voxel_size=[1, 1, 1],
                                         B0_dir=b0)
        ours -= ours[mask].mean()
        assert np.linalg.norm(ours - ref) < tol * np.linalg.norm(ref)


def test_independent_oblique_affine_gives_b0_back():
    from qsmprep.qsm.units import b0_dir_from_affine

    b0 = independent_heads.tilted_b0(25.0, azimuth_deg=40.0)
    affine = independent_heads.oblique_affine((1.25, 1.25, 1.25), b0, (-90.0, -100.0, -80.0))
    np.testing.assert_allclose(b0_dir_from_affine(affine), b0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.25)


def test_harmonic_shim_removes_only_harmonic_fields():
    """A 2nd-order harmonic field is shimmed away; what the shim removes from
    any field is harmonic (its discrete Laplacian vanishes), so the local field
    of the truth is untouched."""
    shape = (24, 26, 22)
    x, y, z = np.indices(shape, dtype=np.float64)
    mask = np.zeros(shape, bool)
    mask[4:20, 5:21, 4:18] = True
    harmonic = 0.3 + 0.01 * x - 0.02 * z + 1e-3 * (x * y - 2 * y * z + x * x - y * y)
    assert np.abs(independent_heads.harmonic_shim(harmonic.astype(np.float32), mask)).max() < 1e-4
    rng = np.random.default_rng(0)
    field = rng.normal(size=shape).astype(np.float32)
    removed = field - independent_heads.harmonic_shim(field, mask)
    lap = sum(np.gradient(np.gradient(removed, axis=a), axis=a) for a in range(3))
    assert np.abs(lap[2:-2, 2:-2, 2:-2]).max() < 1e-4 * np.abs(removed).max()


def test_challenge_head_model_has_the_challenges_values_with_csf_at_zero():
    """The held-out head of real geometry (R28-3): the Challenge 2.0 labels with
    their reference χ less CSF's (the suite's zero), the brain's χ zero outside
    the brain, the air's kept where the 1-voxel partial volume does not reach,
    and a clear error for a model grid the segmentation is not on."""
    from _data import shared_data_dir
    from scipy import ndimage

    source = shared_data_dir() / "challenge2-head"
    rng = np.random.default_rng(0)
    labels, chi, brain, brain_chi = independent_heads.challenge_model(
        0.64, rng, chi_texture=False, source=source)
    assert labels.shape == brain.shape == chi.shape == (256, 320, 320)
    h = independent_heads
    assert np.all(brain_chi[brain & (labels == h.CSF)] == 0)
    np.testing.assert_allclose(brain_chi[brain & (labels == h.WM)], -0.03 - 0.019, atol=1e-6)
    np.testing.assert_allclose(brain_chi[brain & (labels == h.PALLIDUM)], 0.1305 - 0.019,
                               atol=1e-6)
    assert not brain_chi[~brain].any()
    np.testing.assert_array_equal(chi[brain], brain_chi[brain])
    # beyond the blur's support (a 1-voxel Gaussian truncated at 4 voxels per axis)
    deep_air = ndimage.binary_erosion(labels == h.AIR, np.ones((3, 3, 3)), iterations=4)
    np.testing.assert_allclose(chi[deep_air], 9.2 - 0.019, atol=1e-5)
    with pytest.raises(ValueError, match="1.28 mm"):
        independent_heads.challenge_model(0.5, rng, source=source)


@pytest.mark.slow
def test_independent_phantom_texture_spares_csf():
    """The truth's zero is CSF (water): the χ texture goes only into the
    tissue share of a voxel (version 1 gave the ventricles +0.02 ppm)."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    t1 = rng.normal(1.0, 0.2, shape).astype(np.float32)
    wm = np.zeros(shape, np.float32)
    gm = np.zeros(shape, np.float32)
    wm[:20], gm[20:30] = 1.0, 0.5                # x >= 30: pure CSF
    brain = np.ones(shape, bool)
    tex = independent_heads.tissue_texture(t1, wm, gm, brain, 0.5, rng)
    assert np.all(tex[30:] == 0)
    assert np.std(tex[:20]) > 0.005
    assert np.std(tex[20:30]) == pytest.approx(0.5 * np.std(tex[:20]), rel=0.3)


def test_independent_head_cache_rebuilds_another_phantom_version(tmp_path, monkeypatch):
    """A cached head of an older phantom (a version-1 pickle has no version
    field) is rebuilt, not reused; one of this version is reused; a file
    holding another head is an error."""
    import dataclasses
    import pickle

    fields = {f.name: None for f in dataclasses.fields(independent_heads.Head)
              if f.name not in ("name", "version")}
    built = []

    def build(name, description, **kwargs):
        built.append(name)
        return independent_heads.Head(name=name, **fields)

    monkeypatch.setattr(independent, "build_head", build)
    old = independent_heads.Head(name="h", **fields)
    del old.version                                  # as pickled by version 1
    (tmp_path / "h.pkl").write_bytes(pickle.dumps(old))
    head, seconds = independent.cached_head(tmp_path, "h", "")
    assert built == ["h"] and seconds is not None and vars(head)["version"] == 2
    head, seconds = independent.cached_head(tmp_path, "h", "")   # now cached, this version
    assert built == ["h"] and seconds is None
    (tmp_path / "g.pkl").write_bytes((tmp_path / "h.pkl").read_bytes())
    with pytest.raises(ValueError, match="holds head 'h'"):
        independent.cached_head(tmp_path, "g", "")


def test_independent_quick_suite(tmp_path):
    """``independent.py --quick`` builds a head with qsm-forward, runs the
    default chain and the stage methods, and writes its section. The truth is
    consistent: TKD on the true local field scores as on our own heads
    (≈ 32–35 %), far below 60 %."""
    docs, json_path = tmp_path / "benchmarks.md", tmp_path / "independent.json"
    independent.main(["--quick", "--docs", str(docs), "--json", str(json_path),
                      "--head-cache", str(tmp_path / "heads")])
    results = json.loads(json_path.read_text())
    rows = {(r["stage"], r["method"]): r for r in results["rows"]}
    tkd = rows[("inversion", "tkd")]
    assert tkd["status"] == "ok" and tkd["metrics"]["nrmse"] < 45
    default = rows[("pipeline", "default")]
    assert default["status"] == "ok"
    assert set(default["depth"]) == {"0-3", "3-6", "6-12", "12-20", ">20"}
    # the edge is where the pipeline's error is: its outer band is worse than its core
    assert default["depth"]["0-3"] > default["depth"][">20"]
    text = docs.read_text()
    assert "<!-- independent-quick:start -->" in text and "Selection rule" in text
    # a re-run of chosen rows (--stages, --variants, --methods) runs those rows only
    (name, description, _), = independent.head_specs("quick")
    head, seconds = independent.cached_head(tmp_path / "heads", name, description)
    assert seconds is None
    rows = independent.run_head(independent.as_case(head), "quick", ("pipeline", "inversion"),
                                variants=["vsharp + tv"], methods=["tkd"])
    assert [(r["stage"], r["method"]) for r in rows] == [("pipeline", "vsharp + tv"),
                                                         ("inversion", "tkd")]


def test_cli_startup_measures_help_and_renders_the_target_verdict(tmp_path):
    """benchmarks/cli_startup.py: the modules --help loads are read from a real
    subprocess; the verdict follows the median of ``qsmprep --help``."""
    import cli_startup

    assert cli_startup.heavy_modules("--help", cli_startup._env()) == []
    assert list(cli_startup.commands())[:3] == ["python -c pass", "qsmprep --help",
                                                "qsmprep --version"]
    row = {"min_s": 0.1, "max_s": 3.0, "above_python_s": 0.0, "runs": 3}
    results = {"hardware": _common.hardware(), "repeats": 3, "target_s": 1.0,
               "loads": {"--help": [], "--version": ["numpy"]},
               "rows": [{**row, "command": "python -c pass", "median_s": 0.05},
                        {**row, "command": "qsmprep --help", "median_s": 1.5}]}
    text = cli_startup.render(results)
    assert "**not met**" in text and "`--version`: numpy" in text
    results["rows"][1]["median_s"] = 0.4
    assert "(met)" in cli_startup.render(results)


def test_independent_memory_table_reads_old_and_repeated_rows():
    """Fresh-process rows measured once (before repeats and the reference
    workload existed) and rows with a median of several runs render side by side."""
    results = {"quick": False, "hardware": _common.hardware(), "heads": [], "rows": [],
               "memory": [{"head": "old", "grid": "1 × 2 × 3", "peak_rss_gb": 2.6, "wall_s": 126.0},
                          {"head": "new", "grid": "1 × 2 × 3", "peak_rss_gb": 2.9, "wall_s": 110.0,
                           "wall_min_s": 106.0, "wall_max_s": 123.0, "repeats": 3,
                           "reference_ms": 25.0, "wall_per_reference": 4400.0}]}
    text = independent.render(results)
    assert "| old | 1 × 2 × 3 | 2.60 | 126.0 | – | 1 | – | – |" in text
    assert "| new | 1 × 2 × 3 | 2.90 | 110.0 | 106.0–123.0 | 3 | 25.0 | 4400 |" in text


def test_independent_held_out_heads_share_nothing_with_the_decision_heads():
    """R26-0 and R28-3: the held-out heads are other heads (seed, voxel, field, echoes, tilt all
    differ from every full-mode head's), inside #22's ranges, and run the rows the rule
    names in their own section."""
    full = [kw for _, _, kw in independent.head_specs("full")]
    held = [kw for _, _, kw in independent.head_specs("held-out")]
    assert len(held) == 3
    for kw in held:
        assert 1.0 <= kw["voxel_size_mm"] <= 1.5 and 0 <= kw["b0_tilt_deg"] <= 25
        assert 3 <= len(kw["echo_times_s"]) <= 6
        for other in full:
            assert kw["seed"] != other["seed"]
            assert (kw["voxel_size_mm"], kw["field_strength_t"], kw["b0_tilt_deg"]) != (
                other["voxel_size_mm"], other["field_strength_t"], other["b0_tilt_deg"])
    variants = independent.pipeline_variants("held-out")
    assert list(variants) == ["default", "vsharp + tv", *independent.HELD_OUT_VARIANTS]
    assert variants["referencing=mean"]["referencing"] == "mean"   # the default is csf
    assert variants["default, true mask"]["masking"] == independent.TRUE_MASK
    assert sorted(independent.stage_methods("inversion", "held-out")) == ["tfi", "tv"]
    assert independent.stage_methods("bf_removal", "held-out") == []
    assert independent.section("held-out") == "independent-heldout"
    # results files written before the suites had names still render as what they were
    assert independent.suite_of({"quick": True}) == "quick"
    assert independent.suite_of({"quick": False}) == "full"
    text = independent.render({"suite": "held-out", "hardware": _common.hardware(),
                               "heads": [], "rows": [], "memory": []})
    assert "(held-out heads)" in text and "R26-0" in text and "--held-out" in text


def test_independent_app_writes_what_the_app_reads_back(tmp_path):
    """benchmarks/independent_app.py writes a head as a scanner would (integer phase
    without units, rounded nominal field beside ImagingFrequency, the oblique affine);
    the app's own readers must get the head's phase (to the integer step), field
    strength, echo times and B0 direction back, or the app-vs-benchmark comparison
    would compare different inputs."""
    import json as _json

    import independent_app
    import nibabel as nb

    from qsmprep.bids.metadata import b0_affine, echo_times_s_from_sidecar, \
        field_strength_t_from_sidecar
    from qsmprep.qsm.units import b0_dir_from_affine
    from qsmprep.utils.images import interpret_phase

    rng = np.random.default_rng(0)
    shape, echoes = (9, 8, 7), (0.004, 0.009, 0.014)
    b0 = independent_heads.tilted_b0(20.0)
    phase = rng.uniform(-np.pi, np.pi, shape + (3,)).astype(np.float32)
    phase[0, 0, 0, :] = -np.pi                       # the stored range's ends
    zeros = np.zeros(shape, np.float32)
    head = independent_heads.Head(
        "h", "", (1.2,) * 3, tuple(b0), 7.0, echoes,
        independent_heads.oblique_affine((1.2,) * 3, b0, (-5.0, -4.0, -3.0)), zeros > 0,
        zeros.astype(np.uint8), zeros, zeros, zeros,
        rng.uniform(0.1, 1.0, shape + (3,)).astype(np.float32), phase)
    anat = independent_app.write_bids(head, tmp_path, "x")
    for e, te in enumerate(echoes, start=1):
        stem = anat / f"sub-x_echo-{e}_part-phase_MEGRE"
        img = nb.load(f"{stem}.nii.gz")
        meta = _json.loads((anat / f"{stem.name}.json").read_text())
        assert img.get_data_dtype() == np.int16 and "Units" not in meta
        assert meta["MagneticFieldStrength"] == 7
        assert abs(field_strength_t_from_sidecar(meta, stem) - 7.0) < 1e-6
        assert echo_times_s_from_sidecar(meta, stem) == pytest.approx([te])
        np.testing.assert_allclose(b0_dir_from_affine(b0_affine(img.header)[0]), b0,
                                   atol=1e-6)
        back, record = interpret_phase(np.asarray(img.dataobj), None, str(stem))
        assert record["convention"] != "rad"
        step = 2 * np.pi / 8192
        diff = np.angle(np.exp(1j * (back - phase[..., e - 1])))
        assert np.abs(diff).max() <= 0.51 * step + 1e-6


def test_independent_app_memory_counts_the_worker_processes():
    """The app's peak memory is that of its whole process tree (Nipype's workers
    hold the arrays): a parent holding 0.4 GB whose child holds 0.24 GB reads as
    their sum, not as the parent alone."""
    import independent_app

    code = ("import numpy as np, subprocess, sys, time; a = np.ones(50_000_000); "
            "c = subprocess.Popen([sys.executable, '-c', 'import numpy as np, time; "
            "b = np.ones(30_000_000); print(1, flush=True); time.sleep(30)'], "
            "stdout=subprocess.PIPE); c.stdout.readline(); print(1, flush=True); c.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()                    # both arrays are allocated
        gb = independent_app.tree_rss_gb(proc.pid)
    finally:
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            subprocess.run(["kill", child], check=False)
        proc.wait(timeout=30)
    assert 0.62 < gb < 1.0
    assert independent_app.tree_rss_gb(proc.pid) == 0


def test_independent_merge_replaces_rerun_rows_and_orders_by_head():
    row = lambda stage, method, head, v: {"stage": stage, "method": method, "phantom": head,
                                          "metrics": {"nrmse": v}}
    old = [row("pipeline", "default", "a", 1), row("pipeline", "default", "b", 2)]
    new = [row("pipeline", "tfi", "a", 3), row("pipeline", "default", "b", 4)]
    merged = independent.merge_rows(old, new, ["a", "b"])
    assert [(r["method"], r["phantom"], r["metrics"]["nrmse"]) for r in merged] == [
        ("default", "a", 1), ("tfi", "a", 3), ("default", "b", 4)]


def test_gpu_check_times_every_stage_and_publishes_each_device(tmp_path):
    """``gpu_check.py``, the prepared run for a lent GPU, on the CPU at 2 mm:
    every stage of the default pipeline is timed, the stage times add up to
    the run's, χ and DM-QSM's map are scored against the truth, and the section
    gets one row per device's JSON (a failing script would waste the device's
    few minutes)."""
    import torch

    import gpu_check

    assert gpu_check.main(["--device", "cpu", "--threads", str(torch.get_num_threads()),
                           "--voxel", "2", "--repeats", "1", "--no-warm-up",
                           "--dmqsm-steps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    run = result["pipeline_runs"][0]
    assert set(run["stages_s"]) == {"mcpc3ds", "unwrapping", "echo_combination", "masking",
                                    "bf_removal", "inversion", "referencing"}
    assert 0.9 * run["wall_s"] < sum(run["stages_s"].values()) <= run["wall_s"]
    assert run["nrmse"] < 50 and result["dmqsm"]["nrmse"] < 50  # measured 37 and 34 %
    assert result["methods"]["inversion"] == "tfi" and result["dmqsm"]["steps"] == 1
    # a device's JSON (as a GPU run writes it) becomes a second row
    cuda = {**result, "device": "cuda", "gpu": "a GPU"}
    (tmp_path / "gpu_check_cuda.json").write_text(json.dumps(cuda))
    # a JSON's note (where a row was run) is printed under the table
    host = {**result, "note": "the CPU of the GPU's machine"}
    (tmp_path / "gpu_check_cpu-gpuhost.json").write_text(json.dumps(host))
    docs = tmp_path / "benchmarks.md"
    gpu_check.publish_section(tmp_path, docs)
    text = docs.read_text()
    assert "<!-- gpu_check:start -->" in text
    assert "| cpu | " in text and "| cuda (a GPU) | " in text
    assert "| cpu-gpuhost | " in text and "Note: the CPU of the GPU's machine." in text
    assert text.count("Note:") == 1


def test_phase_sign_benchmark_tables_the_check_on_the_challenge_geometry(tmp_path):
    """benchmarks/phase_sign.py: on the Challenge head's geometry its rows are the
    check as it runs (a real call gives the same r) beside the brain-only check of
    before, the face removed changes the field and magnitude it sees, and the
    section is rendered with one row per tilt and one column per variant."""
    from _data import shared_data_dir

    import phase_sign

    source = shared_data_dir() / "challenge2-head"
    variants = phase_sign.VARIANTS[:2]                      # as it is, defaced
    rows = phase_sign.geometry_rows(tilts=(30.0,), variants=variants, source=source)
    assert [(r["axis"], r["variant"]) for r in rows] == [
        (1, "as it is"), (1, "defaced"), (2, "as it is"), (2, "defaced")]
    intact = {r["axis"]: r for r in rows if r["variant"] == "as it is"}
    for r in intact.values():   # the right sign; the brain alone shows none
        assert r["r"] >= 0.3 and abs(r["r_brain_only"]) < 0.3, r
    assert all(r["r"] != intact[r["axis"]]["r"] for r in rows if r["variant"] == "defaced")
    from qsmprep.qsm.kernels import dipole_convolve
    from qsmprep.qsm.phase_sign import phase_sign_evidence

    chi, mask, magnitude, vox = independent_heads.challenge_geometry(4, source=source)
    b0 = phase_sign.tilted(1, 30.0)
    direct = phase_sign_evidence(dipole_convolve(chi, vox, b0), magnitude, mask, vox, b0)
    assert direct["correlation"] == intact[2]["r"]
    text = phase_sign.render({"geometry": rows, "heads": []})
    assert "| B0 tilt | as it is | defaced |" in text
    assert f"| 30° towards axis 2 | {intact[2]['r']:.2f} / {intact[2]['r_brain_only']:.2f} |" \
        in text
