import numpy as np
import pytest
import torch

from qsmprep.qsm import registry
from qsmprep.qsm import torch_ops as T
from qsmprep.qsm.ilsqr import _cone, _ilsqr
from qsmprep.qsm.inversion import tkd, tv_admm
from qsmprep.qsm.kernels import dipole_convolve, dipole_kernel, sphere_field

from _qsm_phantom import VOX, brain_phantom, local_field


def nrmse(x, truth, mask):
    """Percent NRMSE in the mask after removing each map's mean."""
    x = x[mask] - x[mask].mean()
    y = truth[mask] - truth[mask].mean()
    return 100 * np.linalg.norm(x - y) / np.linalg.norm(y)


@pytest.fixture(scope="module")
def noisy_phantom():
    chi, brain = brain_phantom()
    b0 = (0.0, np.sin(0.3), np.cos(0.3))
    rng = np.random.default_rng(0)
    field = (local_field(chi, b0) + rng.normal(0, 0.002, chi.shape).astype(np.float32)) * brain
    return chi, brain, field, b0


@pytest.mark.parametrize("b0_dir", [(0.0, 0.0, 1.0), (np.sin(0.4), 0.0, np.cos(0.4))])
def test_tkd_recovers_sphere_chi(b0_dir):
    shape, chi = (64, 64, 64), 0.2
    _, sphere = sphere_field(shape, VOX, 8.0, chi, b0_dir)
    mask = sphere_field(shape, VOX, 24.0, chi, b0_dir)[1]
    field = dipole_convolve(sphere * np.float32(chi), VOX, b0_dir) * mask
    out = tkd(field, mask, VOX, b0_dir=b0_dir, threshold=0.15)
    core = sphere_field(shape, VOX, 5.0, chi, b0_dir)[1]
    contrast = out[core].mean() - out[mask & ~sphere].mean()
    # TKD underestimates by the truncation (~10-20 % at t = 0.15), never overshoots much
    assert 0.7 * chi < contrast < 1.05 * chi
    assert np.all(out[~mask] == 0)


def test_tkd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        tkd(np.zeros((8, 8, 8)), np.ones((8, 8, 9), bool), VOX, b0_dir=(0, 0, 1))


def test_tv_beats_tkd_on_piecewise_constant_phantom(noisy_phantom):
    chi, brain, field, b0 = noisy_phantom
    err_tkd = nrmse(registry.run("inversion", "tkd", field, brain, VOX, b0_dir=b0), chi, brain)
    out_tv = registry.run("inversion", "tv", field, brain, VOX, b0_dir=b0)
    err_tv = nrmse(out_tv, chi, brain)
    assert err_tv < 0.5 * err_tkd
    assert err_tv < 20.0
    # the recovered values of the big sources are close to the truth
    for value in (0.1, 0.2):
        region = np.isclose(chi, value) & brain
        assert abs(np.median(out_tv[region]) - np.median(out_tv[brain & (chi == 0)]) - value) < 0.25 * value


def test_every_inversion_is_registered():
    assert {"tkd", "tv", "tikhonov", "lsqr", "ilsqr", "rts", "medi"} <= set(
        registry.names("inversion"))


# percent NRMSE bounds on the noisy piecewise-constant phantom; the order follows the
# Challenge 2.0 ranking (QSM_NOTES.md): TV/MEDI/RTS < TKD/Tikhonov < LSQR
# (iLSQR, LSQR with its streaking removed, lands near TKD here: 38 %, TKD 43 %)
@pytest.mark.parametrize(
    "name, bound",
    [("tikhonov", 45.0), ("lsqr", 65.0), ("ilsqr", 45.0), ("rts", 25.0), ("medi", 15.0)],
)
def test_inversion_recovers_phantom(noisy_phantom, name, bound):
    chi, brain, field, b0 = noisy_phantom
    out = registry.run("inversion", name, field, brain, VOX, b0_dir=b0)
    assert out.shape == chi.shape and out.dtype == np.float32
    assert np.all(out[~brain] == 0)
    assert nrmse(out, chi, brain) < bound


def test_medi_uses_magnitude_edges_and_noise_weights(noisy_phantom):
    chi, brain, field, b0 = noisy_phantom
    rng = np.random.default_rng(1)
    magnitude = (1.0 - 2.0 * chi) * brain + rng.normal(0, 0.02, chi.shape)
    plain = nrmse(registry.run("inversion", "medi", field, brain, VOX, b0_dir=b0), chi, brain)
    edges = nrmse(registry.run("inversion", "medi", field, brain, VOX, b0_dir=b0,
                               magnitude=magnitude), chi, brain)
    assert edges < 0.7 * plain  # the edges of the sources are not smoothed away
    # a slab of very noisy field is discounted when its noise level is given
    noisy = field.copy()
    slab = brain & (np.arange(chi.shape[0])[:, None, None] < 28)
    noisy[slab] += rng.normal(0, 0.05, slab.sum())
    std = np.where(slab, 0.05, 0.002)
    unweighted = nrmse(registry.run("inversion", "medi", noisy, brain, VOX, b0_dir=b0,
                                    max_outer=4), chi, brain)
    weighted = nrmse(registry.run("inversion", "medi", noisy, brain, VOX, b0_dir=b0,
                                  noise_std_ppm=std, max_outer=4), chi, brain)
    assert weighted < 0.8 * unweighted


def _cone_error(x, truth, mask, b0):
    """Share of the truth's norm that the error puts in the ill-conditioned cone
    (|D| < 0.1) of the 64^3 grid: the streaking."""
    d = dipole_kernel(truth.shape, VOX, b0)
    err = np.where(mask, x - truth - (x - truth)[mask].mean(), 0.0)
    ref = np.where(mask, truth - truth[mask].mean(), 0.0)
    return np.linalg.norm(np.fft.fftn(err)[np.abs(d) < 0.1]) / np.linalg.norm(np.fft.fftn(ref))


def test_ilsqr_removes_streaking_of_lsqr(noisy_phantom):
    chi, brain, field, b0 = noisy_phantom
    out = {name: registry.run("inversion", name, field, brain, VOX, b0_dir=b0)
           for name in ("tkd", "lsqr", "ilsqr")}
    err = {name: nrmse(x, chi, brain) for name, x in out.items()}
    # measured: iLSQR 38 %, TKD 43 %, LSQR 53 %; cone error 0.19 vs 0.33 (LSQR)
    assert err["ilsqr"] < 0.8 * err["lsqr"]
    assert err["ilsqr"] < err["tkd"]
    streak = {name: _cone_error(x, chi, brain, b0) for name, x in out.items()}
    assert streak["ilsqr"] < 0.7 * streak["lsqr"]


def test_ilsqr_artefact_estimate_is_the_cone_part_of_the_lsqr_error(noisy_phantom):
    chi, brain, field, b0 = noisy_phantom
    grid, parts = _ilsqr(field, brain, VOX, b0, None, 0.1, 10, 1e-2, 30, 1e-2, 1.2, "cpu")
    sa = parts["chi_sa"]
    # chi = M (chi_LSQR - chi_SA), chi_SA lives in the cone |D| < 0.1
    cone = _cone(grid.shape, VOX, b0, 0.1, "cpu") > 0
    sa_k = T.rfft3(sa)
    assert torch.linalg.vector_norm(sa_k[~cone]) < 1e-4 * torch.linalg.vector_norm(sa_k)
    m = torch.as_tensor(grid.pad(brain)) > 0
    assert torch.allclose(parts["chi"][m], (parts["chi_lsqr"] - sa)[m])
    # and it is the streaking: it explains the LSQR error (measured correlation 0.72,
    # norm 0.53 of the error)
    err = (parts["chi_lsqr"] - torch.as_tensor(grid.pad(chi)))[m]
    s = sa[m]
    err, s = err - err.mean(), s - s.mean()
    norm = torch.linalg.vector_norm
    assert float(torch.sum(err * s) / (norm(err) * norm(s))) > 0.6
    assert 0.3 < float(norm(s) / norm(err)) < 1.0


def test_ilsqr_honours_noise_weights(noisy_phantom):
    chi, brain, field, b0 = noisy_phantom
    rng = np.random.default_rng(2)
    noisy = field.copy()
    slab = brain & (np.arange(chi.shape[0])[:, None, None] < 28)
    noisy[slab] += rng.normal(0, 0.05, slab.sum())
    std = np.where(slab, 0.05, 0.002)
    unweighted = nrmse(registry.run("inversion", "ilsqr", noisy, brain, VOX, b0_dir=b0),
                       chi, brain)
    weighted = nrmse(registry.run("inversion", "ilsqr", noisy, brain, VOX, b0_dir=b0,
                                  noise_std_ppm=std), chi, brain)
    # measured: 51 % weighted (38 % without the corruption) vs 513 % unweighted
    assert weighted < 0.3 * unweighted
    assert weighted < 65.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ilsqr_runs_on_cuda(noisy_phantom):
    chi, brain, field, b0 = noisy_phantom
    cpu = registry.run("inversion", "ilsqr", field, brain, VOX, b0_dir=b0)
    gpu = registry.run("inversion", "ilsqr", field, brain, VOX, b0_dir=b0, device="cuda")
    assert gpu.dtype == np.float32
    assert np.linalg.norm(gpu - cpu) < 1e-2 * np.linalg.norm(cpu)


@pytest.mark.parametrize("name", registry.names("inversion"))
def test_inversions_need_an_explicit_b0_direction(name):
    # issue 24: no silent B0 along the third axis in the Python API; the
    # registry/workflow always pass b0_dir, by keyword
    func = registry.get("inversion", name).func
    field = np.zeros((8, 8, 8), np.float32)
    mask = np.ones((8, 8, 8), bool)
    with pytest.raises(TypeError, match="b0_dir"):
        func(field, mask, VOX)
