"""Regional statistics of a susceptibility map, and robust outlier scores.

Pure numpy: a chi map (ppm) and a label map in, one row per region out.
"""

from __future__ import annotations

import numpy as np

#: columns of ``*_desc-regions_stats.tsv`` after ``region``/``label``
STAT_COLUMNS = ("voxels", "mean_ppm", "median_ppm", "std_ppm", "p5_ppm", "p95_ppm")


def region_stats(chi_ppm, labels, names, *, mask=None):
    """Statistics of ``chi_ppm`` in each region of ``labels``.

    ``names`` maps label value -> region name (every region is listed, with
    0 voxels and NaN statistics when absent); ``mask`` (optional) restricts
    the regions to where chi is defined (the run's brain mask). The standard
    deviation is the population one (ddof=0); percentiles interpolate
    linearly (numpy's default).
    """
    chi_ppm = np.asarray(chi_ppm, np.float64)
    labels = np.asarray(labels)
    if chi_ppm.shape != labels.shape:
        raise ValueError("region_stats: the chi map and the labels differ in shape: "
                         f"{chi_ppm.shape} vs {labels.shape}")
    valid = np.isfinite(chi_ppm)
    if mask is not None:
        valid &= np.asarray(mask, bool)
    rows = []
    for value, name in names.items():
        sel = chi_ppm[(labels == value) & valid]
        if sel.size:
            p5, median, p95 = np.percentile(sel, [5, 50, 95])
            stats = (int(sel.size), sel.mean(), median, sel.std(), p5, p95)
        else:
            stats = (0,) + (float("nan"),) * 5
        rows.append({"region": name, "label": int(value), **dict(zip(STAT_COLUMNS, stats))})
    return rows


def robust_z(values):
    """Robust z-scores: (x - median) / (1.4826 · MAD) (Iglewicz & Hoaglin 1993,
    whose outlier cut-off is |z| > 3.5). NaN where the MAD is zero or x is NaN."""
    x = np.asarray(values, np.float64)
    finite = np.isfinite(x)
    if finite.sum() < 3:
        return np.full_like(x, np.nan)
    med = np.median(x[finite])
    mad = 1.4826 * np.median(np.abs(x[finite] - med))
    if mad == 0:
        return np.full_like(x, np.nan)
    return (x - med) / mad


def dice(a, b):
    """Dice overlap 2|A∩B|/(|A|+|B|) of two boolean arrays (NaN when both empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")
