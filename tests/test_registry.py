"""The static method registry (qsmprep/data/methods.toml): its defaults are the
functions' signatures', listing imports neither torch nor numba, every
methods-text placeholder is a parameter."""

from __future__ import annotations

import inspect
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qsmprep
from qsmprep.dl import LEARNED_METHODS
from qsmprep.qsm import registry

ALL = [(s, n) for s in registry.STAGES for n in registry.names(s)]


@pytest.mark.parametrize("stage,name", ALL, ids=[f"{s}-{n}" for s, n in ALL])
def test_registry_defaults_equal_the_signature_defaults(stage, name):
    """The one place this imports the implementations (and torch): the
    defaults the registry reads from the source are those Python binds."""
    method = registry.get(stage, name)
    func = method.func  # imports the module: the table's "module:function" exists
    assert callable(func) and method.module == func.__module__
    from_source = registry.source_defaults(method.target)
    assert from_source is not None, (
        f"{method.target}: a default is neither a literal nor a module constant, so the "
        "registry has to import the module to read it")
    params = inspect.signature(func).parameters
    expected = {k: p.default for k, p in params.items()
                if p.default is not p.empty and k not in registry.STAGE_INPUTS[stage]}
    assert method.defaults == expected
    assert list(method.defaults) == list(expected)  # sidecar order as in the signature


@pytest.mark.parametrize("stage,name", ALL, ids=[f"{s}-{n}" for s, n in ALL])
def test_methods_text_placeholders_are_parameters(stage, name):
    """A renamed parameter would leave its ``{placeholder}`` unfilled (the
    sentence is then kept with braces): each must be a default."""
    method = registry.get(stage, name)
    fields = {f for _, f, _, _ in string.Formatter().parse(method.description) if f}
    assert fields <= set(method.defaults), (stage, name, fields - set(method.defaults))
    assert method.summary and method.description


def test_listing_and_help_import_neither_torch_nor_numba():
    """``qsmprep --help`` / ``--version`` and listing the methods load no heavy
    library; the choices still name every shipped method."""
    code = """
import contextlib, io, json, sys
import qsmprep.qsm.registry as r
names = r.names("inversion")
from qsmprep.cli.parser import build_parser
choices = sorted(next(a for a in build_parser()._actions if a.dest == "inversion").choices)
from qsmprep.cli.run import main
out = {}
for flag in ("--help", "--version"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([flag])
        except SystemExit:
            pass
    out[flag] = buf.getvalue()
heavy = [m for m in ("torch", "numba", "ants", "nipype") if m in sys.modules]
print(json.dumps({"names": names, "choices": choices, "out": out, "heavy": heavy}))
"""
    root = str(Path(qsmprep.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    shipped = {"tkd", "tv", "tikhonov", "lsqr", "ilsqr", "rts", "medi", "tfi", *LEARNED_METHODS}
    assert set(got["names"]) == shipped and got["choices"] == got["names"]
    assert all(name in got["out"]["--help"] for name in shipped)
    assert got["out"]["--version"].strip().endswith(qsmprep.__version__)


def test_source_defaults_follow_reexports_and_module_constants(tmp_path, monkeypatch):
    """A method whose function moved to a submodule and is re-exported
    (``from .impl import f``), with a default that is a constant imported from
    a third module, still has its defaults read without an import; a default
    that is a call falls back to importing the function."""
    pkg = tmp_path / "regpkg"
    pkg.mkdir()
    never = "raise ImportError('not to be imported')\n"
    (pkg / "__init__.py").write_text("from .impl import invert as inv\n" + never)
    (pkg / "consts.py").write_text("STEPS = (1, 2)\n" + never)
    (pkg / "impl.py").write_text(
        "import math\nfrom .consts import STEPS\nTAG = 'x'\n" + never +
        "def invert(field, mask, vox, *, b0_dir, lam=1e-3, steps=STEPS, tag=TAG):\n"
        "    return lam\n"
        "def computed(field, *, scale=math.sqrt(2)):\n    return scale\n"
        "def unknown(field, *, scale=math.pi):\n    return scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.source_defaults("regpkg:inv") == {"lam": 1e-3, "steps": (1, 2), "tag": "x"}
    assert registry.source_defaults("regpkg.impl:computed") is None
    assert registry.source_defaults("regpkg.impl:unknown") is None
    assert registry.source_defaults("regpkg.impl:missing") is None
    assert not {"regpkg", "regpkg.impl", "regpkg.consts"} & set(sys.modules)


def test_register_at_run_time_uses_the_signature(monkeypatch):
    def tiny(local_field_ppm, mask, voxel_size_mm, *, b0_dir, noise_std_ppm=None, lam=0.5):
        return local_field_ppm * lam

    monkeypatch.setitem(registry._REGISTRY, "inversion", dict(registry._REGISTRY["inversion"]))
    registry.register("inversion", "tiny", summary="test method")(tiny)
    assert registry.get("inversion", "tiny").defaults == {"lam": 0.5}
    assert registry.run("inversion", "tiny", 2.0, None, None, b0_dir=None) == 1.0
    assert registry.run("inversion", "tiny", 2.0, None, None, b0_dir=None, lam=2) == 4.0
    with pytest.raises(KeyError, match="Unknown inversion method 'nope'.*tiny"):
        registry.get("inversion", "nope")
    with pytest.raises(ValueError, match="Unknown stage"):
        registry.register("denoising", "x", summary="")(tiny)


def test_table_typos_are_errors():
    """A typo in the table (a stage, a key) is an error naming the file, not a
    silently missing method or citation."""
    good = '[inversion.x]\nfunction = "m:f"\nsummary = "s"\ncitations = ["a"]\n'
    assert registry.parse_table(good)["inversion"]["x"].citations == ("a",)
    assert registry.parse_table(good)["inversion"]["x"].caution == ""
    cautious = good + 'caution = "it may fail"\n'
    assert registry.parse_table(cautious)["inversion"]["x"].caution == "it may fail"
    for bad, why in ((good.replace("inversion", "inverson"), "unknown stage"),
                     (good.replace("citations", "citation"), "takes only"),
                     (good.replace('"m:f"', '"m.f"'), "module:function")):
        with pytest.raises(ValueError, match=f"methods.toml: .*{why}"):
            registry.parse_table(bad)


def test_total_field_pairs_are_marked_in_the_table_and_tfi_returns_its_local_field():
    passing = [n for n in registry.names("bf_removal") if registry.passes_total_field(n)]
    fitting = [n for n in registry.names("inversion") if registry.fits_background(n)]
    assert passing == ["none"] and fitting == ["tfi"]
    # an inversion that fits the background gives the local field it implies, and the
    # workflow writes that one (a background removal that passes the total field has none)
    assert all("local_field" in registry.get("inversion", n).provides for n in fitting)
    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16, 16), bool)
    mask[4:12, 4:12, 4:12] = True
    field = rng.normal(0, 0.01, mask.shape).astype(np.float32)
    local, kept = registry.run("bf_removal", "none", field, mask, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(local, np.where(mask, field, 0))
    np.testing.assert_array_equal(kept, mask)
    chi, tfi_local = registry.run("inversion", "tfi", local, mask, (1.0, 1.0, 1.0),
                                  b0_dir=(0, 0, 1), edge_mm=0.0, max_outer=1, cg_iter=5)
    assert chi.shape == tfi_local.shape == mask.shape and not np.any(tfi_local[~mask])


def test_bet_mask_is_closed_only_before_an_inversion_that_fits_the_background():
    """TFI gets BET's mask closed (notches at sinuses filled, its rim unweighted);
    a two-step chain gets it unclosed, and a user's setting always wins."""
    from qsmprep.qsm import registry

    assert registry.masking_params("bet", "tfi") == {
        "close_mm": registry.FITTED_BACKGROUND_CLOSE_MM}
    assert registry.masking_params("bet", "tv") == {}
    assert registry.masking_params("bet", "tfi", {"close_mm": 0.0}) == {"close_mm": 0.0}
    # a masking method without the parameter gets nothing it cannot take
    assert registry.masking_params("magnitude", "tfi") == {}
    assert registry.get("masking", "bet").defaults["close_mm"] == 0.0
