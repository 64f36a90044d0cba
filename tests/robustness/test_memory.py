"""Deep-learning steps under a memory limit: ``--mem`` caps the voxels of one
network pass (tiled inference), CUDA out-of-memory falls back to tiles and
then to the CPU with a warning.

No GPU is needed: a tiny fully convolutional network registered for the
test simulates a device of limited capacity by raising
``torch.cuda.OutOfMemoryError`` for a pass larger than ``gpu_capacity_voxels``
when asked to run on "cuda" (it computes on the CPU either way).
"""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np
import pytest
import torch
from _chain import centered_affine, sphere_signal, write_run

from qsmprep.config import Config
from qsmprep.dl.inference import run_network, to_numpy, to_tensor
from qsmprep.interfaces.qsm import DL_BYTES_PER_VOXEL, Inversion, max_voxels_for
from qsmprep.qsm import registry
from qsmprep.bids.discover import collect_data
from qsmprep.workflows.qsm import init_qsm_wf

SHAPE = (32, 32, 32)
NAME = "robustness-tiny-net"


def tiny_net(local_field_ppm, mask, voxel_size_mm, *, b0_dir, device="cpu", max_voxels=None,
             gpu_capacity_voxels=None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 1, 3, padding=1))

    def on_device(inp):
        if str(device).startswith("cuda") and inp[0, 0].numel() > (gpu_capacity_voxels or 0):
            raise torch.cuda.OutOfMemoryError(f"simulated: {inp[0, 0].numel()} voxels")
        return net(inp)

    with torch.no_grad():
        out = run_network(lambda xp, apply: apply(on_device, xp),
                          to_tensor(local_field_ppm * mask, "cpu"), multiple=4,
                          max_voxels=max_voxels, tile=16, overlap=8)
    return to_numpy(out) * mask


@pytest.fixture(scope="module")
def method():
    registry.register("inversion", NAME, summary="tiny network (robustness test)")(tiny_net)
    yield NAME
    registry._REGISTRY["inversion"].pop(NAME)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    rng = np.random.default_rng(0)
    field = rng.standard_normal(SHAPE).astype(np.float32)
    mask = np.ones(SHAPE, np.uint8)
    affine = np.eye(4)
    nb.save(nb.Nifti1Image(field, affine), tmp / "local.nii.gz")
    nb.save(nb.Nifti1Image(mask, affine), tmp / "mask.nii.gz")
    return {"local_field": str(tmp / "local.nii.gz"), "mask": str(tmp / "mask.nii.gz"),
            "b0_dir": [0.0, 0.0, 1.0]}


def _close(tiled, whole):
    """Tiles blend at their seams (zero padding at tile faces): close, not equal."""
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.99
    assert np.abs(tiled - whole).mean() < 0.1 * np.abs(whole).mean()


def _invert(method, inputs, tmp_path, **kwargs):
    out = Inversion(method=method, **inputs, **kwargs).run(cwd=str(tmp_path)).outputs
    return np.asanyarray(nb.load(out.chi).dataobj)


@pytest.fixture(scope="module")
def whole(method, inputs, tmp_path_factory):
    return _invert(method, inputs, tmp_path_factory.mktemp("whole"))


def test_mem_caps_the_voxels_of_one_pass(method, inputs, whole, tmp_path, caplog):
    mem_gb = 8000 * DL_BYTES_PER_VOXEL / 2**30  # room for 8000 voxels < 32^3
    assert max_voxels_for(mem_gb) == 8000 and max_voxels_for(0) is None
    with caplog.at_level(logging.INFO, logger="qsmprep"):
        tiled = _invert(method, inputs, tmp_path, mem_gb=mem_gb)
    assert "exceeds 8000 voxels: tiled inference" in caplog.text
    _close(tiled, whole)
    assert not np.array_equal(tiled, whole)  # it really ran in tiles


def test_cuda_out_of_memory_falls_back_to_tiles(method, inputs, whole, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qsmprep"):
        tiled = _invert(method, inputs, tmp_path, device="cuda",
                        params={"gpu_capacity_voxels": 16**3})
    assert "CUDA out of memory" in caplog.text and "on the CPU" not in caplog.text
    _close(tiled, whole)


def test_cuda_out_of_memory_even_in_tiles_falls_back_to_the_cpu(method, inputs, whole,
                                                                tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qsmprep"):
        out = _invert(method, inputs, tmp_path, device="cuda",
                      params={"gpu_capacity_voxels": 1000})
    assert "ran out of GPU memory even in tiles; running it on the CPU" in caplog.text
    np.testing.assert_array_equal(out, whole)


def test_other_errors_are_not_retried_on_the_cpu(method, inputs, tmp_path):
    with pytest.raises(TypeError):
        _invert(method, inputs, tmp_path, device="cuda", params={"no_such_parameter": 1})


def test_mem_option_reaches_every_method_node(tmp_path):
    affine = centered_affine(np.diag([2.0, 2.0, 2.0]), (16, 16, 16))
    write_run(tmp_path / "bids", sphere_signal(affine, (16, 16, 16), (0.004, 0.008))[0],
              affine, (0.004, 0.008))
    run = collect_data(tmp_path / "bids", validate=False)["01"][0]
    config = Config()
    config.nipype.mem_gb = 6.0
    config.execution.bids_dir = str(tmp_path / "bids")
    config.execution.output_dir = str(tmp_path / "out")
    wf = init_qsm_wf(config, run)
    for node in ("unwrap", "mask", "bf_removal", "inversion", "referencing"):
        assert wf.get_node(node).inputs.mem_gb == 6.0
