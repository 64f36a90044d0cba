import numpy as np
import pytest

from qsmprep.qsm import registry
from qsmprep.qsm.bgremove import default_radii_mm, vsharp
from qsmprep.qsm.mask import erode

from _qsm_phantom import VOX, background_field, brain_phantom, local_field

B0 = (0.0, np.sin(0.3), np.cos(0.3))


@pytest.fixture(scope="module")
def fields():
    chi, brain = brain_phantom()
    local = local_field(chi, B0)
    background = background_field(B0)
    # the background is far stronger than the local field, as in vivo
    assert background[brain].std() > 1.5 * local[brain].std()
    return local, background, brain


def corr(a, b, mask):
    return np.corrcoef(a[mask], b[mask])[0, 1]


def test_vsharp_recovers_local_field(fields):
    local, background, brain = fields
    total = (local + background) * brain
    out, mask_out = registry.run("bf_removal", "vsharp", total, brain, VOX, b0_dir=B0)
    assert mask_out.dtype == bool and np.all(mask_out <= brain)
    assert mask_out.sum() > 0.6 * brain.sum()  # small radii keep most of the brain
    assert np.all(out[~mask_out] == 0)
    residual = np.linalg.norm((out - local)[mask_out])
    assert residual < 0.3 * np.linalg.norm(background[mask_out])
    assert corr(out, local, mask_out) > 0.9
    assert corr(out, local, erode(brain, 8.0)) > 0.98


def test_vsharp_radii_and_errors():
    assert default_radii_mm((1, 1, 1)) == tuple(float(r) for r in range(12, 1, -1))
    assert default_radii_mm((0.5, 0.5, 2.0), 12.0)[-1] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="same shape"):
        vsharp(np.zeros((8, 8, 8)), np.ones((8, 8, 4), bool), VOX)
