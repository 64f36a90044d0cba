"""Total field inversion (qsmprep.qsm.tfi): chi from the total field, background
sources fitted with it, on the analytic phantom of the classical-method tests."""

import numpy as np
import pytest

from qsmprep.qsm import metrics
from qsmprep.qsm.inversion import medi, tkd
from qsmprep.qsm.tfi import edge_weights, tfi

from _qsm_phantom import VOX, background_field, brain_phantom, local_field

B0 = (0.0, 0.2, 0.98)


@pytest.fixture(scope="module")
def head():
    chi, brain = brain_phantom()
    b0 = np.asarray(B0) / np.linalg.norm(B0)
    local = local_field(chi, b0)
    return chi, brain, local, local + background_field(b0), b0


def test_tfi_on_the_total_field_matches_medi_on_the_true_local_field(head):
    chi, brain, local, total, b0 = head
    ref = medi(np.where(brain, local, 0), brain, VOX, b0_dir=b0, max_outer=5)
    got = tfi(total, brain, VOX, b0_dir=b0, edge_mm=0.0, max_outer=5)
    err_ref, err = (metrics.nrmse(x - x[brain].mean(), chi - chi[brain].mean(), brain)
                    for x in (ref, got))
    # the background (spheres of -9 ppm, ~100 times the brain's field) is fitted away
    # and the brain's chi comes out as well as from the true local field
    assert err < err_ref + 5.0, (err, err_ref)
    assert np.abs(total[brain]).max() > 20 * np.abs(local[brain]).max()
    # without the fit of outside sources the background turns into chi
    naive = tkd(np.where(brain, total, 0), brain, VOX, b0_dir=b0)
    assert metrics.nrmse(naive - naive[brain].mean(), chi - chi[brain].mean(), brain) > 3 * err


def test_tfi_puts_no_chi_in_the_brain_for_a_background_only_field(head):
    chi, brain, _, _, b0 = head
    bg = background_field(b0)
    got = tfi(bg, brain, VOX, b0_dir=b0, edge_mm=0.0, max_outer=3)
    # a field from sources outside the mask: (almost) nothing inside, against the
    # 0.05-0.3 ppm of the phantom's structures
    assert np.percentile(np.abs(got[brain]), 99) < 0.01


def test_edge_field_gets_no_weight_but_its_chi_is_estimated(head):
    chi, brain, _, total, b0 = head
    corrupted = total.copy()
    w = edge_weights(brain.astype(np.float32), brain, VOX, 2.0)
    rim = brain & (w == 0)
    assert 0.1 < rim.sum() / brain.sum() < 0.4 and np.all(w[brain & ~rim] == 1)
    # the rim's field is garbage (a random ±0.5 ppm), as the truncated phase of a rim
    # mixing cortex, CSF and skull can be
    corrupted[rim] += np.random.default_rng(0).uniform(-0.5, 0.5, rim.sum())
    trusting = tfi(corrupted, brain, VOX, b0_dir=b0, edge_mm=0.0, max_outer=5)
    sceptical = tfi(corrupted, brain, VOX, b0_dir=b0, edge_mm=2.0, max_outer=5)
    errs = [metrics.nrmse(x - x[brain].mean(), chi - chi[brain].mean(), brain)
            for x in (trusting, sceptical)]
    assert errs[1] < 0.5 * errs[0], errs
    assert np.all(sceptical[rim] != 0)  # scored as chi there, not dropped


def test_edge_weights_refuse_a_mask_thinner_than_the_edge():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 9:11] = True
    with pytest.raises(ValueError, match="edge_mm=3.0"):
        edge_weights(mask.astype(np.float32), mask, (1.0, 1.0, 1.0), 3.0)
