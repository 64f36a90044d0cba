"""Is the phase sign right? A physics check on the measured field.

Vendors and converters disagree on the sign of the phase (``+gamma dB TE`` or
``-gamma dB TE``). With the wrong sign every field and every chi map comes
out inverted: veins and iron-rich nuclei diamagnetic. qsmprep's convention is
that of the signal model ``S = |S| exp(+i 2 pi gamma_bar B0 f TE)``: a
paramagnetic source gives a positive phase (and field) along B0.

The check uses the strongest susceptibility source of any head, the air
outside it and in its sinuses and ear canals: air is about 9.4 ppm more
paramagnetic than tissue (Schenck 1996), an order of magnitude more than any
tissue contrast. Its field inside the brain has a known shape given the
head's outline and the B0 direction: above and below an air cavity (along
B0) the field is raised, beside it lowered. So

1. *tissue* = voxels with signal (magnitude above its noise threshold) or in
   the brain mask, closed by a ball of :data:`BONE_CLOSING_MM`: the skull is
   as dark as air in a gradient echo but close to tissue in susceptibility
   (about 2 ppm more diamagnetic, against 9.4 ppm for air), and as a shell
   5-7 mm thick between scalp and brain (Lynnerup 2001) the closing counts
   it as tissue, while the air around the head and cavities wider than about
   12 mm (frontal and sphenoid sinuses) stay air;
2. the model field is the dipole field of ``chi = -1`` in tissue (the field
   of the air relative to the tissue, per ppm), with the tissue continued
   beyond the faces of the grid that it touches (a slab is cut, not ended);
3. the region compared is the brain mask and the voxels with signal outside
   it deeper than :data:`OUTSIDE_DEPTH_MM` (scalp, face, neck): in the brain
   the field is much that of air cavities enclosed in bone (sinuses, mastoid
   cells), which the magnitude cannot tell from bone, while outside it the
   field is that of the head's outer surface, which the magnitude outlines
   (on the QSM Challenge 2.0 head, r = 0.04 over the brain alone, 0.60 over
   both; docs/usage.md);
4. both the model field and the measured field lose a second-order
   polynomial fitted over that region (what a shim removes);
5. the statistic is their Pearson correlation over the region, in
   ``[-1, 1]``: positive when the phase has qsmprep's sign, negative when it
   is inverted.

The evidence is clear when ``|r| >=`` :data:`CLEAR_CORRELATION` (0.3: the
air model explains at least 9 % of the shim-residual field). It was fixed
from that reading before any data were looked at, not tuned. Where the air
cannot be seen (a thin slab, an image cropped to the brain, a magnitude
without a dark background) the correlation stays low and the check abstains.

References
----------
Schenck JF. The role of magnetic susceptibility in magnetic resonance
imaging: MRI magnetic compatibility of the first and second kinds. Med Phys
1996;23(6):815-850.
Lynnerup N. Cranial thickness in relation to age, sex and general body
build in a Danish forensic sample. Forensic Sci Int 2001;117(1-2):45-51.
Marques JP, Bowtell R. Application of a Fourier-based method for rapid
calculation of field inhomogeneity due to spatial variation of magnetic
susceptibility. Concepts Magn Reson B 2005;25B(1):65-78.
"""

from __future__ import annotations

import numpy as np

from .fft import fast_shape, irfftn, rfftn
from .kernels import dipole_kernel
from .mask import _as_3d_magnitude, close, erode, magnitude_threshold

#: |correlation| from which the sign is taken as shown (see the module docstring)
CLEAR_CORRELATION = 0.3
#: radius (mm) of the closing that turns the skull (dark, between scalp and
#: brain) into tissue: a gap up to twice this wide is closed; human skull is
#: 5-7 mm thick on average (Lynnerup 2001)
BONE_CLOSING_MM = 6.0
#: fewest brain-mask voxels for the check to say anything
MIN_VOXELS = 500
#: voxels with signal outside the brain count when they are deeper than this
#: in the tissue (mm; at least one voxel): the edge voxels' phase is the
#: least reliable and their field the steepest
OUTSIDE_DEPTH_MM = 2.0


def close_bone(tissue, voxel_size_mm, radius_mm=BONE_CLOSING_MM):
    """Morphological closing of ``tissue`` by a ball of ``radius_mm``
    (:func:`qsmprep.qsm.mask.close`; the grid is extended by edge replication
    first, so a cut face stays tissue)."""
    vox = np.asarray(voxel_size_mm, dtype=float)
    r = [max(int(np.ceil(radius_mm / v)), 1) for v in vox]
    padded = np.pad(np.asarray(tissue, bool), [(k, k) for k in r], mode="edge")
    closed = close(padded, radius_mm, vox)
    return closed[tuple(slice(k, k + n) for k, n in zip(r, np.shape(tissue)))]


def air_model_field(tissue, voxel_size_mm, b0_dir):
    """Dipole field (ppm per ppm of air-tissue contrast) of ``chi = -1`` in
    ``tissue`` and 0 elsewhere (Marques and Bowtell 2005).

    The tissue is continued beyond every face of the grid that it touches
    (edge replication over half the grid on each side, periodic beyond), so
    that the faces where a slab cuts the head do not act as air boundaries.
    """
    tissue = np.asarray(tissue, dtype=np.float32)
    widths = [n // 2 + 1 for n in tissue.shape]
    shape = fast_shape([n + 2 * w for n, w in zip(tissue.shape, widths)], factor=1.0)
    padded = np.pad(tissue, [(w, s - n - w) for w, s, n in zip(widths, shape, tissue.shape)],
                    mode="edge")
    spectrum = rfftn(padded)
    del padded
    spectrum *= dipole_kernel(shape, voxel_size_mm, b0_dir, half=True)
    field = -irfftn(spectrum, shape)
    crop = tuple(slice(w, w + n) for w, n in zip(widths, tissue.shape))
    return np.ascontiguousarray(field[crop], dtype=np.float32)


def remove_polynomial(field, mask, voxel_size_mm, order=2):
    """``field`` in ``mask`` less its least-squares polynomial of ``order``
    in the voxel coordinates (mm): what a scanner shim of that order removes.
    ``field`` may hold several maps along a last axis (one fit for all: the
    basis is built and factorised once); the result is then (voxels, maps)."""
    idx = np.argwhere(mask).astype(np.float64) * np.asarray(voxel_size_mm, float)
    idx = (idx - idx.mean(axis=0)) / max(float(np.abs(idx).max()), 1e-9)
    x, y, z = idx.T
    terms = [np.ones_like(x)]
    if order >= 1:
        terms += [x, y, z]
    if order >= 2:
        terms += [x * x, y * y, z * z, x * y, x * z, y * z]
    basis = np.stack(terms, axis=1)
    values = np.asarray(field)[mask].astype(np.float64)   # only the voxels fitted
    coef, *_ = np.linalg.lstsq(basis, values, rcond=None)
    return values - basis @ coef


def phase_sign_evidence(field, magnitude, mask, voxel_size_mm, b0_dir,
                        outside_mm=OUTSIDE_DEPTH_MM):
    """Correlation of the measured field with the field of the air around and
    inside the head (see the module docstring).

    Parameters
    ----------
    field : ndarray (X, Y, Z), B0 map (Hz) or total field (ppm), any scale
    magnitude : ndarray (X, Y, Z) or (X, Y, Z, echo)
    mask : ndarray of bool (X, Y, Z), brain mask
    voxel_size_mm, b0_dir : geometry (B0 in voxel axes)
    outside_mm : the voxels with signal outside the mask deeper than this (mm;
        at least one voxel) count too; None: the mask only (the check before
        rule R29-6, for comparisons)

    Returns
    -------
    dict with ``correlation`` (float in [-1, 1], None when the mask has fewer
    than :data:`MIN_VOXELS` voxels or nothing varies), ``air_fraction``
    (fraction of the grid taken as air), ``voxels`` (in the mask) and
    ``voxels_outside_brain`` (the tissue outside it that the correlation
    also covers).
    """
    mask = np.asarray(mask, dtype=bool)
    mag = _as_3d_magnitude(magnitude)
    signal = mag > magnitude_threshold(mag)
    tissue = close_bone(signal | mask, voxel_size_mm)
    outside = (np.zeros_like(mask) if outside_mm is None else
               erode(signal, max(outside_mm, min(voxel_size_mm)), voxel_size_mm) & ~mask)
    out = {"statistic": "correlation of the field with the air-tissue model field",
           "correlation": None, "air_fraction": round(float(1 - tissue.mean()), 4),
           "voxels": int(mask.sum()), "voxels_outside_brain": int(outside.sum())}
    if mask.sum() < MIN_VOXELS or tissue.all():
        return out
    region = mask | outside
    model = air_model_field(tissue, voxel_size_mm, b0_dir)
    a, b = remove_polynomial(np.stack([field, model], axis=-1), region, voxel_size_mm).T
    denom = float(np.linalg.norm(a - a.mean()) * np.linalg.norm(b - b.mean()))
    if denom > 0:
        out["correlation"] = round(float(np.dot(a - a.mean(), b - b.mean()) / denom), 4)
    return out


def decide_phase_sign(correlation, threshold=CLEAR_CORRELATION):
    """+1 (sign as stored), -1 (inverted) or 0 (no clear evidence)."""
    if correlation is None or abs(correlation) < threshold:
        return 0
    return 1 if correlation > 0 else -1


def resolve_phase_sign(correlation, setting="auto", source="the phase"):
    """The sign to apply to the phase and the decision in words, for the
    sidecars: ``(sign, decision)``.

    ``setting`` is ``--phase-sign``: "1"/"-1" are used as given (with a warning
    when the check clearly finds the opposite); "auto" gives -1 only when the
    check clearly shows an inverted phase (a warning), else 1. ``correlation``
    is that of :func:`phase_sign_evidence`; ``source`` names the phase file(s)
    in the messages.
    """
    import logging

    logger = logging.getLogger("qsmprep")
    shown = decide_phase_sign(correlation)
    r_text = "n/a" if correlation is None else f"{correlation:+.2f}"
    if setting != "auto":
        sign = int(setting)
        if shown and shown != sign:
            logger.warning(
                "%s: --phase-sign %s was given but the phase sign check finds the "
                "opposite (r = %s with the air model field); check the sign convention of "
                "the scanner/converter", source, setting, r_text)
        return sign, "given (--phase-sign)"
    if shown == -1:
        logger.warning(
            "%s: the phase sign looks inverted (the field correlates with the field "
            "of the air around the head at r = %s, <= -%g): the phase was negated, so "
            "that veins and iron come out paramagnetic. If this is wrong, run again "
            "with --phase-sign 1", source, r_text, CLEAR_CORRELATION)
        return -1, "inverted by the check (auto)"
    if shown == 1:
        return 1, "confirmed by the check (auto)"
    logger.info(
        "%s: the phase sign could not be checked (correlation with the air model "
        "field r = %s, |r| < %g: no clear air-tissue field in the brain, e.g. a "
        "slab); the phase is used as stored. Give --phase-sign 1 or -1 to state it",
        source, r_text, CLEAR_CORRELATION)
    return 1, "not determined by the check (auto): used as stored"
