"""Deep-learning infrastructure and networks: padding, tiling, dipole operator,
determinism, weights registry, shipped weights."""

import json
import shutil

import numpy as np
import pytest
import torch

from qsmprep.dl.dipole import DipoleOperator
from qsmprep.dl.inference import pad_to_multiple, predict_tiled, run_network, select_device
from qsmprep.dl.ir2qsm import IR2QSM, ir2qsm_loss
from qsmprep.dl.nextqsm import NeXtQSM
from qsmprep.dl.unet import UNet, UNetQSM, field_inputs
from qsmprep.dl.weights import MODELS_DIR, WeightsError, load_weights, read_manifest, save_weights
from qsmprep.qsm.kernels import dipole_convolve

SMALL = {"base": 4, "levels": 3}


def _field(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn((1, 1) + tuple(shape), generator=g)


def test_select_device_cpu_and_errors():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto"):
        select_device("tpu")


def test_cuda_steps_run_in_forked_workers_after_the_device_is_resolved():
    """``--device auto`` is resolved in the CLI's process, and Nipype's
    MultiProc workers are forked from it. torch's default CUDA check starts
    the CUDA runtime, after which a forked child cannot use CUDA ("Cannot
    re-initialize CUDA in forked subprocess"): every CUDA step of a run on a
    GPU would fail. In a fresh process (pytest's own has asked torch about
    CUDA already), a forked child runs a step on the resolved device, and the
    check is the fork-safe NVML one. Without a GPU the device is the CPU.
    Here, beside the device tests, so the lent GPU's ``pytest -k cuda`` runs it
    (this module needs neither pybids nor Nipype)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import multiprocessing as mp, os
        from qsmprep.execution import resolve_device

        device = resolve_device("auto")

        def step(x):
            import torch
            return float(torch.full((4,), x, device=device).sum())

        with mp.get_context("fork").Pool(1) as pool:
            total = pool.apply(step, (1.5,))
        print(device, total, os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    device, total, nvml_check = out.stdout.split()
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert float(total) == 6.0 and nvml_check == "1"


@pytest.mark.parametrize("shape", [(17, 20, 9), (16, 16, 16), (1, 33, 8)])
def test_pad_to_multiple_roundtrip(shape):
    x = _field(shape)
    xp, sl = pad_to_multiple(x, 8)
    assert all(n % 8 == 0 and n >= m for n, m in zip(xp.shape[-3:], shape))
    assert torch.equal(xp[sl], x)
    assert float(xp.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-6)


@pytest.mark.parametrize("shape", [(19, 22, 13), (24, 24, 24)])
def test_unet_runs_on_any_size(shape):
    net = UNet(1, 2, **SMALL).eval()
    with torch.no_grad():
        y = run_network(lambda xp, apply: apply(net, xp), _field(shape), multiple=net.multiple)
    assert y.shape == (1, 2) + shape


def test_predict_tiled_is_exact_for_pointwise_maps():
    x = _field((37, 30, 21))
    y = predict_tiled(lambda t: 3 * t - 1, x, tile=16, overlap=6)
    assert torch.allclose(y, 3 * x - 1, atol=1e-6)


def test_tiled_network_matches_whole_volume():
    torch.manual_seed(0)
    net = UNet(1, 1, base=4, levels=2).eval()  # receptive field ~ 18 voxels
    x = _field((48, 40, 32))
    with torch.no_grad():
        whole = run_network(lambda xp, apply: apply(net, xp), x, multiple=2)
        tiled = run_network(lambda xp, apply: apply(net, xp), x, multiple=2, max_voxels=1000,
                            tile=24, overlap=12)
    err = float((tiled - whole).norm() / whole.norm())
    assert err < 0.02
    # and the tiles really were used: tiles without overlap leave seams
    with torch.no_grad():
        seams = predict_tiled(net, x, tile=16, overlap=0)
    assert float((seams - whole).norm() / whole.norm()) > err


def test_dipole_operator_matches_numpy_forward_model():
    rng = np.random.default_rng(0)
    chi = rng.standard_normal((20, 17, 14)).astype(np.float32)
    vox, b0 = (1.0, 0.8, 1.3), (0.2, -0.3, 0.93)
    ref = dipole_convolve(chi, vox, b0, pad_factor=2.0)
    op = DipoleOperator(chi.shape, vox, b0, pad_factor=2.0)
    out = op(torch.from_numpy(chi)[None, None])[0, 0].numpy()
    assert np.allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_tikhonov_init_matches_numpy_filter():
    from qsmprep.qsm.fft import fast_shape, fftn, ifftn, pad
    from qsmprep.qsm.kernels import dipole_kernel

    rng = np.random.default_rng(3)
    f = rng.standard_normal((18, 15, 12)).astype(np.float32)
    vox, b0, eps = (1.0, 1.0, 1.2), (0.0, 0.3, 0.95), 0.02
    shape = fast_shape(f.shape, factor=1.5)
    d = dipole_kernel(shape, vox, b0)
    padded, sl = pad(f, shape)
    ref = np.real(ifftn(d / (d**2 + eps) * fftn(padded)))[sl]
    out = DipoleOperator(f.shape, vox, b0).tikhonov(torch.from_numpy(f)[None, None], eps)
    assert np.allclose(out[0, 0].numpy(), ref, atol=1e-5 * np.abs(ref).max())


def test_dipole_operator_is_self_adjoint_and_per_item():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 1, 12, 14, 10, generator=g), torch.randn(2, 1, 12, 14, 10, generator=g)
    dirs = [(0, 0, 1), (0.6, 0, 0.8)]
    op = DipoleOperator(x.shape[-3:], (1, 1, 1), dirs)
    assert float((op(x) * y).sum()) == pytest.approx(float((x * op(y)).sum()), rel=1e-4)
    single = DipoleOperator(x.shape[-3:], (1, 1, 1), dirs[1])
    assert torch.allclose(op(x)[1:], single(x[1:]), atol=1e-6)
    assert not torch.allclose(op(x)[:1], single(x[:1]), atol=1e-3)


def test_data_term_gradient_matches_autograd():
    g = torch.Generator().manual_seed(2)
    shape = (14, 12, 10)
    x = torch.randn((1, 1) + shape, generator=g, dtype=torch.float64, requires_grad=True)
    f = torch.randn((1, 1) + shape, generator=g, dtype=torch.float64)
    mask = (torch.rand((1, 1) + shape, generator=g) > 0.4).double()
    op = DipoleOperator(shape, (1.0, 1.2, 0.9), (0.1, 0.2, 0.97))
    op.kernel = op.kernel.double()
    lam = 0.7
    energy = 0.5 * lam * (mask * (op(x) - f)).pow(2).sum()
    (auto,) = torch.autograd.grad(energy, x)
    assert torch.allclose(lam * op.data_gradient(x.detach(), f, mask), auto, rtol=1e-9, atol=1e-12)


def test_nextqsm_shapes_and_data_consistency_steps():
    torch.manual_seed(0)
    model = NeXtQSM({"bfr": SMALL, "vn": {**SMALL, "steps": 2}}).eval()
    shape = (20, 24, 16)
    total, mask = _field(shape), torch.ones((1, 1) + shape)
    mask[..., :3] = 0
    op = DipoleOperator(shape, (1, 1, 1), (0, 0, 1))
    with torch.no_grad():
        local, chi = model(total, mask, op)
        chi2, steps = model.invert(local, mask, op, return_steps=True)
    assert local.shape == chi.shape == (1, 1) + shape
    assert len(steps) == 2 and torch.equal(steps[-1], chi2) and torch.equal(chi, chi2)
    assert float(chi[mask == 0].abs().max()) == 0.0


def _perturb(model, seed=0):
    """Random weights everywhere (the shipped init zeroes the output convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_ir2qsm_deterministic_in_eval_and_loss_weights():
    torch.manual_seed(0)
    model = _perturb(IR2QSM({"base": 4, "levels": 3})).eval()
    shape = (16, 20, 12)
    x = field_inputs(_field(shape), torch.ones((1, 1) + shape), (0.0, 0.3, 1.0), (1, 1, 1.2))
    assert x.shape == (1, 7) + shape
    assert torch.allclose(x[0, 2:5].norm(dim=0), torch.ones(shape))  # unit B0 channels
    s = float(x[0, 5].pow(2).mean().sqrt())  # the scale channel: RMS of TKD in the mask
    assert torch.allclose(x[0, 6], torch.full(shape, s))
    with torch.no_grad():
        a, outs = model(x, return_iterations=True)
        b = model(x)
        chi = torch.zeros_like(a)
        loss = ir2qsm_loss(model, x, chi)
    assert torch.equal(a, b) and len(outs) == 4
    expected = (a / s).pow(2).mean() + sum(
        w * (o / s).pow(2).mean() for w, o in zip(model.config["aux_weights"], outs))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def _tkd_case(shape=(20, 16, 12), seed=4):
    rng = np.random.default_rng(seed)
    field = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    mask = np.ones(shape, bool)  # bounding box = the volume, as tkd's MaskBox sees it
    mask[:3, :4, :] = False
    mask[-2:, -3:, -4:] = False
    return field, mask


@pytest.mark.parametrize("vox, b0", [((1, 1, 1), (0, 0, 1)), ((1.0, 0.8, 1.3), (0.2, -0.3, 0.93))])
def test_tkd_channel_equals_classical_tkd(vox, b0):
    from qsmprep.qsm.inversion import tkd

    field, mask = _tkd_case()
    x = field_inputs(torch.from_numpy(field)[None, None],
                     torch.from_numpy(mask.astype(np.float32))[None, None], b0, vox, 0.15)
    ref = tkd(field, mask, vox, b0_dir=b0, threshold=0.15)
    assert np.abs(x[0, 5].numpy() - ref).max() < 1e-5 * np.abs(ref).max()
    assert torch.equal(x[0, 0], torch.from_numpy(field * mask))
    # per-item voxel sizes and B0 directions in one batch
    both = field_inputs(torch.from_numpy(np.stack([field, field]))[:, None],
                        torch.from_numpy(np.stack([mask, mask]).astype(np.float32))[:, None],
                        [(0, 0, 1), b0], [(1, 1, 1), vox], 0.15)
    assert torch.allclose(both[1:], x, atol=1e-6)


def test_tv_channel_equals_classical_tv_per_batch_item():
    """``init_tv``: the estimate the networks correct is the registry's TV-ADMM
    of each item's field, with that item's voxel size and B0 direction."""
    from qsmprep.qsm.inversion import tv_admm

    field, mask = _tkd_case()
    options = {"lam": 2e-4, "max_iter": 8, "tol": 1e-4}
    vox, b0 = (1.0, 0.8, 1.3), (0.2, -0.3, 0.93)
    both = field_inputs(torch.from_numpy(np.stack([field, 2 * field]))[:, None],
                        torch.from_numpy(np.stack([mask, mask]).astype(np.float32))[:, None],
                        [(0, 0, 1), b0], [(1, 1, 1), vox], 0.15, init_tv=options)
    for i, (f, v, b) in enumerate([(field, (1, 1, 1), (0, 0, 1)), (2 * field, vox, b0)]):
        ref = tv_admm(f, mask, v, b0_dir=b, **options) * mask
        assert np.abs(both[i, 5].numpy() - ref).max() < 1e-5 * np.abs(ref).max()
        assert np.isclose(both[i, 6][mask].mean().item(), np.sqrt(np.mean(ref[mask] ** 2)),
                          rtol=1e-5)
    tkd_input = field_inputs(torch.from_numpy(field)[None, None],
                             torch.from_numpy(mask.astype(np.float32))[None, None], (0, 0, 1))
    assert not torch.allclose(tkd_input[0, 5], both[0, 5], atol=1e-3)
    # an untrained model with the TV channel is exactly TV
    model = UNetQSM({**SMALL, "init_tv": options}).eval()
    with torch.no_grad():
        assert torch.allclose(model(both), both[:, 5:6], atol=1e-7)


@pytest.mark.parametrize("cls", [UNetQSM, IR2QSM])
def test_zero_residual_model_is_tkd(cls):
    field, mask = _tkd_case((16, 16, 12))
    x = field_inputs(torch.from_numpy(field)[None, None],
                     torch.from_numpy(mask.astype(np.float32))[None, None], (0.1, 0.2, 0.97),
                     (1.1, 0.9, 1.0))
    torch.manual_seed(0)
    model = cls(SMALL).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), x[:, 5:6], atol=1e-7)  # untrained = TKD
        _perturb(model)
        assert not torch.allclose(model(x), x[:, 5:6], atol=1e-4)
        nets = model.iterations if cls is IR2QSM else [model.net]
        for net in nets:  # zero the residual: the output convs
            net.head.weight.zero_()
            net.head.bias.zero_()
        if cls is IR2QSM:  # a fusion whose weights sum to 1: the iterations and TKD
            model.fuse.weight.fill_(0.125)
            model.fuse.weight[0, -1] = 0.5
            model.fuse.bias.zero_()
        assert torch.allclose(model(x), x[:, 5:6], atol=1e-6)


@pytest.mark.parametrize("cls", [UNetQSM, IR2QSM])
def test_networks_are_scale_equivariant(cls):
    """Dipole inversion is linear: a field with k times the contrast gives
    exactly k times the map (the networks work in units of the input's RMS)."""
    field, mask = _tkd_case((16, 16, 16))
    torch.manual_seed(0)
    model = _perturb(cls(SMALL)).eval()
    chis = []
    for k in (1.0, 7.0):
        x = field_inputs(torch.from_numpy(k * field)[None, None],
                         torch.from_numpy(mask.astype(np.float32))[None, None], (0.1, 0.2, 0.97))
        with torch.no_grad():
            chis.append(model(x))
    assert not torch.allclose(chis[0], field_inputs(
        torch.from_numpy(field)[None, None], torch.from_numpy(mask.astype(np.float32))[None, None],
        (0.1, 0.2, 0.97))[:, 5:6], atol=1e-4)  # a real correction of TKD
    assert torch.allclose(7.0 * chis[0], chis[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [UNetQSM, IR2QSM])
def test_feedforward_tiling_matches_whole_volume(cls):
    """The TKD channel is computed on the whole volume, the networks are tiled."""
    torch.manual_seed(0)
    model = _perturb(cls({"base": 4, "levels": 2})).eval()
    shape = (40, 36, 32)
    field, mask = _field(shape), torch.ones((1, 1) + shape)
    x = field_inputs(field, mask, (0.0, 0.26, 0.97), (1.0, 1.0, 1.0))
    with torch.no_grad():
        whole = run_network(lambda xp, apply: apply(model, xp), x, multiple=2)
        tiled = run_network(lambda xp, apply: apply(model, xp), x, multiple=2, max_voxels=1000,
                            tile=24, overlap=12)
    assert float((tiled - whole).norm() / whole.norm()) < 0.02


def test_weights_registry_checks_sha256(tmp_path):
    model = UNetQSM(SMALL)
    save_weights("unet", model, {"note": "test"}, tmp_path)
    blob = load_weights("unet", tmp_path)
    assert blob["config"] == model.config and blob["meta"] == {"note": "test"}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(blob["state_dict"][k], v, atol=1e-3 * max(1, v.abs().max()))
    data = bytearray((tmp_path / "unet.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "unet.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_weights("unet", tmp_path)
    with pytest.raises(WeightsError, match="qsmprep-train ir2qsm"):
        load_weights("ir2qsm", tmp_path)


SHIPPED = sorted(n[:-3] for n in read_manifest() if n.endswith(".pt"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_reproduce_their_card(name, tmp_path):
    from qsmprep.dl.methods import load_model
    from qsmprep.train.export import check_nrmse

    blob = load_weights(name)
    expected = blob["meta"]["check_case_nrmse"]
    model = load_model(name)
    got = check_nrmse(name, model)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=0.5), key
        assert f"{value:.2f}" in (MODELS_DIR / f"{name}.md").read_text()
    # a corrupted copy is refused with a clear error
    for f in (f"{name}.pt", "manifest.json"):
        shutil.copy(MODELS_DIR / f, tmp_path / f)
    raw = bytearray((tmp_path / f"{name}.pt").read_bytes())
    raw[-100] ^= 0x01
    (tmp_path / f"{name}.pt").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupted"):
        load_model(name, models_dir=tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())[f"{name}.pt"]["bytes"] < 8e6


def test_registry_lists_dl_methods_with_device_param():
    from qsmprep.qsm import registry

    for stage, name, cite in [("bf_removal", "nextqsm", "cognolato2023nextqsm"),
                              ("inversion", "nextqsm", "cognolato2023nextqsm"),
                              ("inversion", "ir2qsm", "li2025ir2qsm"),
                              ("inversion", "unet", "ronneberger2015unet")]:
        method = registry.get(stage, name)
        assert method.defaults["device"] == "auto" and cite in method.citations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("stage,name", [("bf_removal", "nextqsm"), ("inversion", "nextqsm"),
                                        ("inversion", "ir2qsm"), ("inversion", "unet")])
def test_shipped_networks_on_cuda_match_the_cpu(stage, name):
    """The CUDA path of every shipped network (registry call: padding, dipole
    operator, float32 back in numpy) gives the CPU's map."""
    from qsmprep.qsm import registry

    rng = np.random.default_rng(0)
    shape, vox, b0 = (40, 44, 36), (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    chi = np.zeros(shape, np.float32)
    chi[8:-8, 8:-8, 6:-6] = rng.normal(0, 0.05, (24, 28, 24)).astype(np.float32)
    mask = (chi != 0).astype(np.float32)
    field = dipole_convolve(chi, vox).astype(np.float32) * mask
    cpu = registry.run(stage, name, field, mask, vox, b0_dir=b0, device="cpu")
    gpu = registry.run(stage, name, field, mask, vox, b0_dir=b0, device="cuda")
    cpu, gpu = (np.asarray(r[0] if isinstance(r, tuple) else r) for r in (cpu, gpu))
    assert gpu.dtype == np.float32 and gpu.shape == shape
    # TF32 convolutions on the GPU: agreement to ~1e-3, a wrong operator is off by >10 %
    assert np.linalg.norm(gpu - cpu) < 1e-2 * np.linalg.norm(cpu)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("stage,name", [("bf_removal", "nextqsm"), ("inversion", "nextqsm"),
                                        ("inversion", "ir2qsm"), ("inversion", "unet")])
def test_bf16_inference_gives_the_float32_map(stage, name, device):
    """precision="bf16" (bfloat16 convolutions) changes a shipped network's map
    by rounding only: on the check case (a held-out hybrid sample) within 1 %
    of the float32 map and within 0.3 points of its NRMSE to the truth."""
    from qsmprep.dl.inference import bf16_supported
    from qsmprep.qsm import registry
    from qsmprep.qsm.metrics import nrmse
    from qsmprep.train.export import check_case

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not bf16_supported(device):
        pytest.skip(f"no native bfloat16 on {device}")
    case = check_case()
    mask = case["mask"] > 0
    field, truth = ((case["total_field"], case["local_field"]) if stage == "bf_removal"
                    else (case["local_field"], case["chi"]))
    maps = {}
    for precision in ("fp32", "bf16"):
        out = registry.run(stage, name, field, mask, tuple(case["voxel_size_mm"]),
                           b0_dir=tuple(case["b0_dir"]), device=device, precision=precision)
        maps[precision] = np.asarray(out[0] if isinstance(out, tuple) else out)
    assert maps["bf16"].dtype == np.float32
    assert nrmse(maps["bf16"], maps["fp32"], mask) < 1.0
    assert abs(nrmse(maps["bf16"], truth, mask) - nrmse(maps["fp32"], truth, mask)) < 0.3


def test_precision_without_native_bf16(monkeypatch, caplog):
    """bf16 on hardware without it: training refuses, inference warns and runs
    float32 (a more exact map, not a failed subject)."""
    from qsmprep.dl import inference

    monkeypatch.setattr(inference, "bf16_supported", lambda device: False)
    assert inference.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="needs native bfloat16.*use precision 'fp32'"):
        inference.resolve_precision("bf16", "cpu")
    with caplog.at_level("WARNING", logger="qsmprep.dl"):
        assert inference.resolve_precision("bf16", "cpu", strict=False) == "fp32"
    assert "running in float32 instead" in caplog.text
    with pytest.raises(ValueError, match="precision must be"):
        inference.resolve_precision("fp16", "cpu", strict=False)


def _vsharp_case(shape=(44, 40, 36), vox=(1.0, 1.1, 0.9)):
    """Total field (ppm) of two strong spheres outside a spherical brain mask
    (the background, harmonic in the mask) and two weak ones inside (the
    local field), analytic; returns (total, local, background, mask)."""
    from qsmprep.qsm.kernels import sphere_field

    centre = np.array([(n - 1) / 2 for n in shape])
    grid = np.stack(np.meshgrid(*[(np.arange(n) - c) * v for n, c, v in
                                  zip(shape, centre, vox)], indexing="ij"))
    mask = (grid**2).sum(0) <= 14.0**2
    background = sum(sphere_field(shape, vox, 4.0, chi, center=centre + off)[0]
                     for chi, off in ((8.0, (19, 0, 4)), (-5.0, (-3, 17, -12))))
    local = sum(sphere_field(shape, vox, 3.0, chi, center=centre + off)[0]
                for chi, off in ((0.2, (4, -3, 2)), (-0.1, (-5, 4, -1))))
    return (background + local).astype(np.float32), local, background, mask


def test_vsharp_operator_matches_classical_vsharp():
    from qsmprep.qsm.bgremove import default_radii_mm, vsharp

    vox = (1.0, 1.1, 0.9)
    total, local, background, mask = _vsharp_case(vox=vox)
    radii = default_radii_mm(vox, 8.0)
    ref, ref_mask = vsharp(total, mask, vox, max_radius_mm=8.0)
    op = DipoleOperator(mask.shape, vox, (0, 0, 1))
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]  # noqa: E731
    out, covered = op.vsharp(t(total), t(mask), radii)
    out, covered = out[0, 0].numpy(), covered[0, 0].numpy() > 0
    # the same eroded mask (ball inside the mask), up to voxels on the sphere's edge
    assert (covered != ref_mask).sum() <= 0.02 * ref_mask.sum()
    both = covered & ref_mask
    # the same local field up to the FFT grid of the global deconvolution
    assert np.linalg.norm((out - ref)[both]) < 0.05 * np.linalg.norm(ref[both])
    assert float(np.abs(out[~covered]).max()) == 0.0
    # a background ~9x the local field (RMS in the mask) is removed: alone, it
    # leaves < 6 % of the local field's norm
    rms = lambda a: np.sqrt(np.mean(a[mask] ** 2))  # noqa: E731
    assert rms(background) > 8 * rms(local)
    residual = op.vsharp(t(background), t(mask), radii)[0][0, 0].numpy()
    assert np.linalg.norm(residual[covered]) < 0.06 * np.linalg.norm(local[covered])


def test_nextqsm_background_removal_starts_at_vsharp():
    total, local, _, mask = _vsharp_case((32, 32, 32), (1, 1, 1))
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]  # noqa: E731
    op = DipoleOperator(mask.shape, (1, 1, 1), (0, 0, 1))
    torch.manual_seed(0)
    vsharp = {"max_radius_mm": 8.0, "min_radius_mm": None, "threshold": 0.05}
    model = NeXtQSM({"bfr": {**SMALL, "vsharp": vsharp}, "vn": {**SMALL, "steps": 1}}).eval()
    first = next(m for m in model.bfr.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == 4  # total field, mask, SMV high-pass, V-SHARP
    with torch.no_grad():
        prior = model.vsharp(t(total), t(mask), op)
        assert torch.allclose(model.remove_background(t(total), t(mask), op), prior, atol=1e-7)
        _perturb(model)
        a = model.remove_background(t(total), t(mask), op)
    assert not torch.allclose(a, prior, atol=1e-4)  # a real correction
    assert float(a[t(mask) == 0].abs().max()) == 0.0


def _ellipsoids(shape, vox, b0, seed=0):
    """chi of a few flat ellipsoids in a box mask, its local field (ppm)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    chi = np.zeros(shape, np.float32)
    for _ in range(6):
        c, a = rng.uniform(8, np.asarray(shape) - 8), rng.uniform(3, 7, 3)
        chi[(((grid - c) / a) ** 2).sum(-1) <= 1] = rng.uniform(-0.1, 0.2)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    chi *= mask
    return chi, mask, dipole_convolve(chi, vox, b0) * mask


def test_tv_operator_matches_classical_tv_and_starts_the_vn():
    """The batched TV-ADMM of the VN's start is the registry's ``tv`` (up to
    the FFT grid), per batch item; an untrained VN (R = 0) starts there and
    its data-consistency steps are exact gradient steps from it."""
    from qsmprep.dl.nextqsm import TV_START
    from qsmprep.qsm.inversion import tv_admm
    from qsmprep.qsm.metrics import nrmse

    vox, b0, shape = (1.0, 1.1, 0.9), (0.1, 0.2, 0.97), (40, 36, 32)
    chi, mask, local = _ellipsoids(shape, vox, b0)
    ref = tv_admm(local, mask, vox, b0_dir=b0)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]  # noqa: E731
    op = DipoleOperator(shape, vox, b0)
    out = op.tv(t(local), t(mask), **TV_START)[0, 0].numpy()
    # the same solution up to the FFT grid (the classical one pads the mask's
    # bounding box; TV couples the volume to its padding): as close to the
    # truth, and within 10 % of each other
    assert abs(nrmse(out, chi, mask) - nrmse(ref, chi, mask)) < 1.0
    assert nrmse(out, ref, mask) < 10.0
    assert float(np.abs(out[~mask]).max()) == 0.0
    assert nrmse(out, chi, mask) < 0.8 * nrmse(op.tkd(t(local))[0, 0].numpy(), chi, mask)
    # per item: a batch of two fields and two B0 directions gives each one's TV
    other = _ellipsoids(shape, vox, (0.0, 0.0, 1.0), seed=1)[2]
    both = DipoleOperator(shape, vox, [b0, (0.0, 0.0, 1.0)])
    pair = both.tv(torch.cat([t(local), t(other)]), torch.cat([t(mask)] * 2))
    alone = DipoleOperator(shape, vox, (0.0, 0.0, 1.0)).tv(t(other), t(mask))
    assert torch.allclose(pair[:1], op.tv(t(local), t(mask)), atol=1e-6)
    assert torch.allclose(pair[1:], alone, atol=1e-6)

    model = NeXtQSM({"bfr": SMALL, "vn": {**SMALL, "steps": 1}}).eval()
    assert model.config["vn"]["init_tv"] == TV_START
    with torch.no_grad():
        x0 = model.start(t(local), t(mask), op)
        chi1 = model.invert(t(local), t(mask), op)
    assert torch.equal(x0, op.tv(t(local), t(mask), **TV_START))
    alpha, lam = [float(torch.nn.functional.softplus(p[0].detach())) for p in
                  (model.alpha_raw, model.lambda_raw)]
    step = (x0 - alpha * lam * op.data_gradient(x0, t(local), t(mask))) * t(mask)
    assert torch.allclose(chi1, step, atol=1e-6)
    tikhonov = NeXtQSM({"bfr": SMALL, "vn": {**SMALL, "init_tv": None}})
    assert torch.allclose(tikhonov.start(t(local), t(mask), op),
                          op.tikhonov(t(local), 0.01) * t(mask))


def test_learned_method_names_are_the_shipped_models():
    """The input checks' list of learned methods (no torch import there) is the
    models' registry names, each registered for at least one stage."""
    from qsmprep.dl import LEARNED_METHODS
    from qsmprep.dl.methods import MODELS
    from qsmprep.qsm import registry

    assert set(LEARNED_METHODS) == set(MODELS)
    for name in LEARNED_METHODS:
        assert name in registry.names("inversion")


@pytest.mark.parametrize("stage,name", [("inversion", "ir2qsm"), ("inversion", "unet")])
def test_feedforward_networks_do_not_depend_on_the_empty_field_of_view(stage, name):
    """IR2QSM and the U-Net run on the brain mask's bounding box plus
    ``MASK_BOX_MARGIN`` voxels (``inference.on_mask_box``), so a whole-head image
    (the brain a third of its voxels) costs what the brain costs, and the map is
    the same, to the bit, whatever empty field of view surrounds the brain;
    outside the box it is 0. (NeXtQSM keeps the whole image: its FFT data
    terms make its map depend on the box; rule R22-2.)"""
    from qsmprep.dl.inference import MASK_BOX_MARGIN
    from qsmprep.qsm import registry

    rng = np.random.default_rng(1)
    shape, vox, b0 = (24, 28, 20), (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    chi = np.zeros(shape, np.float32)
    chi[4:-4, 4:-4, 4:-4] = rng.normal(0, 0.05, (16, 20, 12)).astype(np.float32)
    mask = chi != 0
    field = (dipole_convolve(chi, vox) * mask).astype(np.float32)
    m = MASK_BOX_MARGIN
    large = [np.zeros((70, 64, 60), np.float32) for _ in range(2)]
    at = (slice(20, 44), slice(10, 38), slice(30, 50))
    large[0][at], large[1][at] = field, mask
    small = [np.pad(a, m) for a in (field, mask)]  # the mask's box plus its margin, exactly
    runs = [registry.run(stage, name, f, mk > 0, vox, b0_dir=b0, device="cpu")
            for f, mk in (small, large)]
    out_small, out_large = (np.asarray(r[0] if isinstance(r, tuple) else r) for r in runs)
    inner = (slice(m, -m),) * 3
    np.testing.assert_array_equal(out_large[at], out_small[inner])
    rest = np.ones(out_large.shape, bool)
    rest[tuple(slice(s.start - m, s.stop + m) for s in at)] = False
    assert not out_large[rest].any()
    assert np.abs(out_large[at][mask]).max() > 1e-3
