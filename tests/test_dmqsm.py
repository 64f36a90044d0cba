"""DM-QSM: the diffusion prior, its posterior sampler, operators and app wiring.

Small grids (16^3 to 48^3): each test takes seconds on a CPU.
"""

import numpy as np
import pytest
import torch

from qsmprep.dl import dmqsm
from qsmprep.dl.dmqsm_prior import ScoreUNet, dsm_loss
from qsmprep.dl.dmqsm_sampler import (Composed, Downsample, Masked, MaskedDipole, ddim_times,
                                      patch_average, patch_grid)
from qsmprep.dl.inference import to_numpy, to_tensor
from qsmprep.dl.weights import MODELS_DIR, read_manifest
from qsmprep.qsm.kernels import dipole_convolve
from qsmprep.qsm.metrics import nrmse

SMALL = {"base": 4, "levels": 2, "time_dim": 16, "groups": 2}
SHIPPED = "dmqsm.pt" in read_manifest()


def _phantom(n=32):
    """(chi_ppm, brain mask, local field ppm): spheres in an ellipsoid, B0 along z."""
    g = np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2
    r = n / 32
    brain = (g[0] / (13 * r)) ** 2 + (g[1] / (11 * r)) ** 2 + (g[2] / (10 * r)) ** 2 <= 1
    chi = np.zeros(brain.shape, np.float32)
    for c, rad, v in [((-4, 0, 0), 4, 0.1), ((5, 3, -2), 3, -0.05), ((1, -5, 4), 2.5, 0.2)]:
        chi[sum((g[i] - c[i] * r) ** 2 for i in range(3)) < (rad * r) ** 2] = v
    chi *= brain
    field = dipole_convolve(chi, (1, 1, 1), (0, 0, 1)).astype(np.float32) * brain
    return chi, brain, field


def _random_model(seed=0):
    """A small score network whose output depends on its input (random head)."""
    torch.manual_seed(seed)
    model = ScoreUNet(SMALL)
    torch.nn.init.normal_(model.head.weight, std=0.3)
    return model.eval()


def test_sampler_is_deterministic_for_a_fixed_seed():
    chi, brain, field = _phantom(16)
    kwargs = dict(device="cpu", model=_random_model(), steps=3, t_start=400, eta=0.5, patch=12,
                  overlap=4)
    a = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), seed=3, **kwargs)
    b = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), seed=3, **kwargs)
    c = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), seed=4, **kwargs)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4  # the seed matters
    assert np.all(a[~brain] == 0) and np.isfinite(a).all()


def test_patch_assembly_leaves_no_seams():
    """Overlapping patches averaged with the overlap count: a constant stays
    exactly constant and a voxel-wise map is reproduced exactly, on shapes
    that do not divide into patches; every voxel is covered."""
    for shape, patch, overlap in [((50, 61, 37), 24, 8), ((48, 48, 48), 48, 8),
                                  ((20, 70, 9), 16, 4)]:
        slices = patch_grid(shape, patch, overlap)
        const = torch.full((1, 1, *shape), 2.5)
        out, count = patch_average(lambda p: p, const, slices)
        assert count.min() >= 1
        assert torch.equal(out, const)
        x = torch.randn(1, 1, *shape)
        out, _ = patch_average(lambda p: 2 * p + 1, x, slices)
        assert torch.allclose(out, 2 * x + 1, atol=1e-6)
        # a patch-wise constant prediction (the patch's own mean) of a constant: constant
        out, _ = patch_average(lambda p: p.mean() * torch.ones_like(p), const, slices)
        assert torch.allclose(out, const, atol=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        patch_grid((10, 10, 10), 8, 8)


def test_operators_are_adjoint_and_keep_constants():
    torch.manual_seed(0)
    shape = (16, 12, 20)
    for mode in ("kspace", "block"):
        down = Downsample(shape, 2, mode)
        x, y = torch.randn(1, 1, *shape), torch.randn(1, 1, *down.shape_lr)
        assert float((down(x) * y).sum()) == pytest.approx(float((x * down.adjoint(y)).sum()),
                                                            rel=1e-4)
        assert torch.allclose(down(torch.full((1, 1, *shape), 3.0)), torch.tensor(3.0))
        assert torch.allclose(down.zero_filled(torch.full((1, 1, *down.shape_lr), 3.0)),
                              torch.tensor(3.0), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the factor"):
        Downsample((15, 16, 16), 2)
    mask_lr = (torch.rand(1, 1, 8, 6, 10) > 0.3).float()
    mask = (torch.rand(1, 1, *shape) > 0.3).float()
    dip = MaskedDipole(shape, (1, 1, 1.2), (0.1, 0.2, 1.0), mask)
    op = Masked(Composed(Downsample(shape, 2), dip.dipole), mask_lr)
    for A, y in ((dip, torch.randn(1, 1, *shape)), (op, torch.randn(1, 1, 8, 6, 10))):
        x = torch.randn(1, 1, *shape)
        assert float((A(x) * y).sum()) == pytest.approx(float((x * A.adjoint(y)).sum()),
                                                        rel=1e-4)


def test_score_network_loss_falls_on_a_tiny_run():
    """Denoising score matching on a few chi patches: the loss on fixed
    timesteps and noise falls well below the untrained network's (which
    predicts zero noise: loss 1)."""
    chi = _phantom(24)[0][6:18, 6:18, 6:18]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(np.stack([chi, np.roll(chi, 3, 0)]))[:, None]
    model = ScoreUNet(SMALL)

    def fixed_loss():
        with torch.no_grad():
            return float(np.mean([dsm_loss(model, batch, np.random.default_rng(99 + i))
                                  for i in range(6)]))

    before = fixed_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = dsm_loss(model, batch, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert before == pytest.approx(1.0, abs=0.05)
    assert after < 0.6 * before


def test_training_task_resumes_exactly(tmp_path):
    """``qsmprep-train dmqsm`` through the shared loop: a run stopped and
    resumed ends with the weights of a straight run (timesteps and noise come
    from the loop's checkpointed generator)."""
    from qsmprep.train.loop import train

    chi, brain, field = _phantom(16)

    def stream(start):
        i = start
        while True:
            k = i % 3
            yield {"chi": np.roll(chi, k, 0), "mask": np.roll(brain, k, 0).astype(np.float32),
                   "local_field": field, "total_field": field,
                   "b0_dir": np.array([0, 0, 1], np.float32),
                   "voxel_size_mm": np.ones(3, np.float32)}
            i += 1

    val = [next(stream(7))]
    kwargs = dict(steps=6, config=SMALL, log_every=1, validate_every=3, progress=False, seed=2,
                  batch_size=2)
    straight, metrics = train("dmqsm", tmp_path / "a", stream, val, **kwargs)
    train("dmqsm", tmp_path / "b", stream, val, stop_at=3, **kwargs)
    resumed, _ = train("dmqsm", tmp_path / "b", stream, val,
                       resume=tmp_path / "b" / "checkpoint.pt", **kwargs)
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key
    assert np.isfinite(metrics["val_nrmse_chi_denoised"])


def test_chi_patches_drop_background_and_follow_the_stride():
    from qsmprep.train.data import chi_patches

    mask = np.zeros((100, 70, 64), bool)
    mask[10:60, 10:60, :] = True
    slices = chi_patches(mask, 32, stride=30, max_background=0.8)
    starts = {tuple(s.start for s in sl) for sl in slices}
    assert all(a % 30 == 0 and b % 30 == 0 and c % 30 == 0 for a, b, c in starts)
    assert all(mask[sl].mean() >= 0.2 for sl in slices)
    assert (60, 30, 0) not in starts and (0, 0, 0) in starts  # 5 % brain: dropped
    # starts 0 and 30 on every axis (30 + 32 <= 64), all with >= 20 % brain
    assert starts == {(a, b, c) for a in (0, 30) for b in (0, 30) for c in (0, 30)}


def test_ddim_times_and_options():
    assert ddim_times(300, 4) == [300, 200, 100, 0]
    assert ddim_times(10, 50)[0] == 10 and ddim_times(10, 50)[-1] == 0
    with pytest.raises(ValueError, match="steps"):
        ddim_times(100, 0)
    chi, brain, field = _phantom(16)
    with pytest.raises(TypeError, match="unknown DM-QSM sampling option"):
        dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), device="cpu", model=_random_model(), step=3)
    with pytest.raises(ValueError, match="mask is empty"):
        dmqsm.invert(field, np.zeros_like(brain), (1, 1, 1), (0, 0, 1), device="cpu",
                     model=_random_model())


@pytest.mark.skipif(not SHIPPED, reason="no shipped dmqsm weights")
def test_data_consistency_falls_during_sampling():
    """With the shipped prior on a small phantom, ||y - A x0_hat|| / ||y``
    falls from the first (noised) step to the last, and the final map is
    closer to the truth and to the data than without the DPS step."""
    from qsmprep.dl.methods import load_model

    chi, brain, field = _phantom(32)
    model = load_model("dmqsm")
    maps, hist = {}, {}
    default = dmqsm.SAMPLING["xi"]
    for xi in (default, 0.0):
        hist[xi] = []
        maps[xi] = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), device="cpu", model=model, steps=8,
                                xi=xi, history=hist[xi])
    h = hist[default]
    assert len(h) == 8 and h[-1] < 0.8 * h[0]
    assert all(b < a + 1e-3 for a, b in zip(h, h[1:]))  # falls at every step
    assert h[-1] < hist[0.0][-1]
    assert nrmse(maps[default], chi, brain) < nrmse(maps[0.0], chi, brain)


@pytest.mark.skipif(not SHIPPED, reason="no shipped dmqsm weights")
def test_shipped_weights_reproduce_the_cards_sampling_scores():
    """The card's DPS scores on the check case (fixed seed and steps): the
    shipped weights give them again (the denoising score is checked with the
    other models' in test_dl)."""
    from qsmprep.dl.weights import load_weights
    from qsmprep.train.export import dmqsm_check_scores

    expected = load_weights("dmqsm")["meta"]["check_case_sampling_nrmse"]
    got = dmqsm_check_scores()
    assert set(got) == set(expected)
    card = (MODELS_DIR / "dmqsm.md").read_text()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=0.5), key
        assert f"{value:.2f}" in card


@pytest.mark.skipif(not SHIPPED, reason="no shipped dmqsm weights")
def test_registry_method_and_super_resolution_run():
    from qsmprep.qsm import registry

    chi, brain, field = _phantom(24)
    method = registry.get("inversion", "dmqsm")
    assert method.defaults["xi"] == dmqsm.SAMPLING["xi"] and "xiong2024dmqsm" in method.citations
    out = registry.run("inversion", "dmqsm", field, brain, (1, 1, 1), b0_dir=(0, 0, 1),
                       device="cpu", steps=3, patch=16, overlap=8)
    assert out.shape == chi.shape and out.dtype == np.float32 and np.all(out[~brain] == 0)
    down = Downsample(chi.shape, 2)
    lowres = to_numpy(down(to_tensor(chi, "cpu")))
    hr = dmqsm.super_resolve(lowres, 2, mask=brain, device="cpu", steps=3)
    assert hr.shape == chi.shape and np.isfinite(hr).all()
    comb = dmqsm.invert_super_resolve(field[::2, ::2, ::2], brain[::2, ::2, ::2], (2, 2, 2),
                                      (0, 0, 1), device="cpu", steps=3)
    assert comb.shape == chi.shape and np.isfinite(comb).all()


def test_cli_sets_the_sampling_parameters(tmp_path):
    from qsmprep.cli.parser import parse_args

    args = [str(tmp_path), str(tmp_path / "out"), "participant"]
    config = parse_args(args + ["--inversion", "dmqsm", "--dmqsm-steps", "12",
                                "--dmqsm-xi", "0.7", "--dmqsm-seed", "5"])
    assert config.workflow.inversion == "dmqsm"
    assert config.workflow.stage_params("inversion") == {"steps": 12, "xi": 0.7, "seed": 5}
    with pytest.raises(SystemExit, match="only apply to --inversion dmqsm"):
        parse_args(args + ["--inversion", "tv", "--dmqsm-seed", "5"])


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="no shipped dmqsm weights")
def test_app_runs_dmqsm_with_its_cli_settings(tmp_path, synthetic_bids):
    """``qsmprep ... --inversion dmqsm --dmqsm-steps 2 --dmqsm-seed 1`` on a tiny
    real BIDS tree: the map is written and its sidecar records the settings.
    Slow (44 s at load 7, most of it the whole Nipype run, not DM-QSM): the
    only test that runs the method through the app."""
    import json

    from qsmprep.cli.run import main

    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\n")
    out = tmp_path / "out"
    code = main([str(synthetic_bids), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--bf-removal", "pdf", "--inversion", "dmqsm", "--dmqsm-steps", "2",
                 "--dmqsm-seed", "1", "--device", "cpu", "--use-plugin", str(plugin)])
    assert code == 0
    anat = out / "sub-01" / "anat"
    assert (anat / "sub-01_Chimap.nii.gz").exists()
    record = json.loads((anat / "sub-01_Chimap.json").read_text())["QSMMethods"]["inversion"]
    assert record["Name"] == "dmqsm"
    assert record["Parameters"]["steps"] == 2 and record["Parameters"]["seed"] == 1


@pytest.mark.skipif(not SHIPPED, reason="no shipped dmqsm weights")
def test_super_resolution_band_weight_scales_only_the_band_above_the_data():
    """``band_weight`` 0 is the k-space zero-filled up-sampling, 1 the projected
    sample, and a weight in between scales only what the sample adds to it."""
    chi, _, _ = _phantom(24)
    brain = np.ones(chi.shape, bool)
    down = Downsample(chi.shape, 2)
    lowres = to_numpy(down(to_tensor(chi, "cpu")))
    zero_filled = to_numpy(down.zero_filled(to_tensor(lowres, "cpu")))
    maps = {w: dmqsm.super_resolve(lowres, 2, mask=brain, device="cpu", steps=3, band_weight=w)
            for w in (0.0, 0.25, 1.0)}
    np.testing.assert_allclose(maps[0.0], zero_filled, atol=1e-6)
    added = maps[1.0] - zero_filled
    assert np.abs(added).max() > 1e-3  # the prior adds a band
    np.testing.assert_allclose(maps[0.25], zero_filled + 0.25 * added, atol=1e-6)


def test_super_resolution_averages_samples_of_consecutive_seeds():
    """``samples=n`` is the mean of the samples of seeds seed .. seed + n - 1
    (then projected): different seeds give different samples, and their mean
    is what is projected."""
    chi, _, _ = _phantom(24)
    brain = np.ones(chi.shape, bool)
    down = Downsample(chi.shape, 2)
    lowres = to_numpy(down(to_tensor(chi, "cpu")))
    one = {s: dmqsm.super_resolve(lowres, 2, mask=brain, device="cpu", steps=3, samples=1,
                                  band_weight=1.0, seed=s) for s in (5, 6)}
    assert np.abs(one[5] - one[6]).max() > 1e-4
    two = dmqsm.super_resolve(lowres, 2, mask=brain, device="cpu", steps=3, samples=2,
                              band_weight=1.0, seed=5)
    np.testing.assert_allclose(two, (one[5] + one[6]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="samples"):
        dmqsm.super_resolve(lowres, 2, mask=brain, device="cpu", steps=3, samples=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not SHIPPED, reason="no shipped dmqsm weights")
def test_shipped_sampler_on_cuda_gives_the_cpu_map():
    """On CUDA the shipped prior samples the CPU's map for the same seed (the
    noise is drawn on the CPU, so only float rounding, TF32 convolutions
    included, may differ), and the same map twice (the CLI's promise: the same
    seed gives the same map)."""
    chi, brain, field = _phantom(32)
    kwargs = dict(steps=3, seed=5, patch=24, overlap=8)
    cpu = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), device="cpu", **kwargs)
    gpu = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), device="cuda", **kwargs)
    again = dmqsm.invert(field, brain, (1, 1, 1), (0, 0, 1), device="cuda", **kwargs)
    assert gpu.dtype == np.float32 and np.all(gpu[~brain] == 0)
    assert np.linalg.norm(again - gpu) <= 1e-4 * np.linalg.norm(gpu)
    assert np.linalg.norm(gpu - cpu) < 0.05 * np.linalg.norm(cpu), (
        np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
    assert abs(nrmse(gpu, chi, brain) - nrmse(cpu, chi, brain)) < 2.0
