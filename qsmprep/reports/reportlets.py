"""Reportlets: arrays in, SVG text out.

Each figure is a mosaic with one row per view (axial, coronal, sagittal) of
slices through the brain, a colour bar with units, and, where given, the
brain-mask contour. Slices are drawn with their physical extent in mm, so
anisotropic voxels keep their true aspect ratio. Images are embedded as PNG
rasters at the data's own resolution (``interpolation="none"``), which keeps
the SVG files small and the pixels honest.

Arrays are ``(X, Y, Z)`` in (approximately) RAS+ voxel order: the interfaces
reorient images to the closest canonical orientation before calling these
functions. No file I/O happens here.
"""

from __future__ import annotations

import io

import numpy as np

#: Fixed chi display window (ppm) shared by all reports, so subjects compare.
CHI_WINDOW_PPM = (-0.1, 0.2)
#: The wider chi window (ppm): veins, calcifications and artefacts.
CHI_WIDE_WINDOW_PPM = (-0.3, 0.6)

_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))
_FIG_WIDTH_IN = 10.0
_ROW_MAX_HEIGHT_IN = 2.2
_MAX_PIXELS = 256  # in-plane pixels per panel; larger slices are decimated


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _bounding_box(mask):
    """Index ranges ``[(lo, hi), ...]`` (inclusive) of the True voxels per axis."""
    idx = np.nonzero(mask)
    if not idx[0].size:
        return [(0, n - 1) for n in mask.shape]
    return [(int(i.min()), int(i.max())) for i in idx]


def slice_positions(extent, n_slices):
    """``n_slices`` evenly spaced indices strictly inside ``extent = (lo, hi)``."""
    lo, hi = extent
    return np.unique(np.linspace(lo, hi, n_slices + 2)[1:-1].round().astype(int))


def robust_window(volume, mask=None, percentiles=(1, 99), symmetric=False):
    """Display window ``(vmin, vmax)`` from percentiles of the finite voxels in ``mask``.

    ``symmetric=True`` centres the window on 0 (for fields in Hz or ppm).
    """
    data = np.asarray(volume, dtype=np.float64)
    sel = np.isfinite(data) if mask is None else (np.asarray(mask, bool) & np.isfinite(data))
    values = data[sel]
    if not values.size:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    lo, hi = np.percentile(values, percentiles)
    if symmetric:
        half = max(abs(lo), abs(hi)) or 1.0
        return (-half, half)
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def _check_volume(volume, name, shape=None):
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{name} must be a 3D (X, Y, Z) array; got shape {volume.shape}")
    if shape is not None and volume.shape != shape:
        raise ValueError(f"{name} has shape {volume.shape}; the reportlet expects {shape}")
    return volume


def _panels(volume, axis, positions, box, step):
    """2D slices ``(u, v)`` of ``volume`` at ``positions`` along ``axis``, cropped to ``box``."""
    u_ax, v_ax = [a for a in range(3) if a != axis]
    crop = (slice(box[u_ax][0], box[u_ax][1] + 1, step), slice(box[v_ax][0], box[v_ax][1] + 1, step))
    return [volume[(slice(None),) * axis + (k,)][crop] for k in positions]


def mosaic_svg(blocks, voxel_size_mm, *, mask=None, n_slices=6, title=None):
    """Draw one or more mosaics into one SVG document.

    Parameters
    ----------
    blocks : list of dict
        One mosaic each, drawn top to bottom, with keys ``volume`` (3D array),
        ``label`` (colour-bar label with units, e.g. ``"B0 (Hz)"``), and
        optionally ``title``, ``cmap`` (default ``"gray"``), ``window``
        (``(vmin, vmax)``, default: robust 1-99 % window in the mask),
        ``contour`` (draw the mask outline, default False) and
        ``mask_outside`` (blank voxels outside the mask, default False).
    voxel_size_mm : sequence of 3 floats
        Voxel size along X, Y, Z (mm); sets the aspect ratio of every panel.
    mask : 3D bool array, optional
        Brain mask: chooses the slices (its bounding box), the default window,
        the contour and the blanked region.
    n_slices : int
        Slices per view.
    title : str, optional
        Figure title.

    Returns
    -------
    str
        The SVG document.
    """
    matplotlib, plt = _matplotlib()
    if not blocks:
        raise ValueError("mosaic_svg needs at least one block to draw")
    shape = _check_volume(blocks[0]["volume"], "volume").shape
    vox = np.asarray(voxel_size_mm, dtype=float)
    if vox.shape != (3,) or np.any(vox <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive numbers (mm); got {voxel_size_mm}")
    if mask is not None:
        mask = _check_volume(mask, "mask", shape).astype(bool)
    support = mask if mask is not None and mask.any() else None
    if support is None:
        first = np.asarray(blocks[0]["volume"])
        support = np.isfinite(first) & (first != 0)
    box = _bounding_box(support)
    # a small margin around the box so that the contour is not clipped
    box = [(max(lo - 2, 0), min(hi + 2, n - 1)) for (lo, hi), n in zip(box, shape)]
    step = max(1, int(np.ceil(max(hi - lo + 1 for lo, hi in box) / _MAX_PIXELS)))

    # Layout in inches, top to bottom.
    rows = []  # (view name, axis, positions, u_ax, v_ax, row height in)
    gap_mm = 2.0
    for view, axis in _VIEWS:
        pos = slice_positions(box[axis], n_slices)
        u_ax, v_ax = [a for a in range(3) if a != axis]
        w_mm = (box[u_ax][1] - box[u_ax][0] + 1) * vox[u_ax]
        h_mm = (box[v_ax][1] - box[v_ax][0] + 1) * vox[v_ax]
        row_w = len(pos) * w_mm + (len(pos) - 1) * gap_mm
        height = min(_ROW_MAX_HEIGHT_IN, (_FIG_WIDTH_IN - 0.9) * h_mm / row_w)
        rows.append((view, axis, pos, u_ax, v_ax, height, w_mm, h_mm, row_w))
    title_h, block_title_h, cbar_h, pad = 0.35, 0.3, 0.7, 0.08
    block_h = sum(r[5] + pad for r in rows) + cbar_h
    total_h = (title_h if title else 0.1) + len(blocks) * (block_h + block_title_h)

    rc = {
        "svg.fonttype": "none",
        "svg.hashsalt": "qsmprep",
        "image.composite_image": False,
        "font.size": 9,
    }
    with matplotlib.rc_context(rc):
        fig = plt.figure(figsize=(_FIG_WIDTH_IN, total_h), facecolor="black")
        try:
            y = total_h
            if title:
                fig.text(0.5, 1 - 0.2 / total_h, title, ha="center", va="center", color="w",
                         fontsize=11, weight="bold")
                y -= title_h
            else:
                y -= 0.1
            for block in blocks:
                y = _draw_block(fig, block, rows, mask, box, step, vox, y, total_h,
                                block_title_h, cbar_h, pad, gap_mm, plt)
            buf = io.StringIO()
            fig.savefig(buf, format="svg", facecolor="black", metadata={"Date": None})
        finally:
            plt.close(fig)
    return buf.getvalue()


def _draw_block(fig, block, rows, mask, box, step, vox, y, total_h, block_title_h, cbar_h,
                pad, gap_mm, plt):
    volume = _check_volume(block["volume"], "volume", mask.shape if mask is not None else None)
    volume = np.asarray(volume, dtype=np.float32)
    if block.get("mask_outside") and mask is not None:
        volume = np.where(mask, volume, np.nan)
    window = block.get("window") or robust_window(volume, mask)
    cmap = plt.get_cmap(block.get("cmap", "gray")).with_extremes(bad="black")
    left_in, usable_w = 0.45, _FIG_WIDTH_IN - 0.9
    fig.text(left_in / _FIG_WIDTH_IN, (y - block_title_h / 2) / total_h,
             block.get("title", ""), ha="left", va="center", color="w", fontsize=10)
    y -= block_title_h
    image = None
    for view, axis, pos, u_ax, v_ax, height, w_mm, h_mm, row_w in rows:
        y -= height + pad
        ax = fig.add_axes([left_in / _FIG_WIDTH_IN, y / total_h,
                           usable_w / _FIG_WIDTH_IN, height / total_h])
        ax.set_facecolor("black")
        ax.set_axis_off()
        slices = _panels(volume, axis, pos, box, step)
        masks = _panels(mask, axis, pos, box, step) if block.get("contour") else None
        for i, sl in enumerate(slices):
            x0 = i * (w_mm + gap_mm)
            extent = (x0, x0 + sl.shape[0] * step * vox[u_ax], 0, sl.shape[1] * step * vox[v_ax])
            image = ax.imshow(sl.T, origin="lower", cmap=cmap, vmin=window[0], vmax=window[1],
                              extent=extent, interpolation="none")
            if masks is not None and masks[i].any() and not masks[i].all():
                ax.contour(masks[i].T.astype(np.float32), levels=[0.5], colors=["#ff4040"],
                           linewidths=0.8, extent=extent, origin="lower")
            for overlay in block.get("overlays", ()):
                over = _panels(np.asarray(overlay["volume"], np.float32), axis, [pos[i]], box,
                               step)[0]
                for level, colour in zip(overlay["levels"], overlay["colors"]):
                    if over.min() < level < over.max():
                        ax.contour(over.T, levels=[level], colors=[colour], linewidths=0.8,
                                   extent=extent, origin="lower")
        ax.set_xlim(0, row_w)
        ax.set_ylim(0, h_mm)
        ax.set_aspect("equal", anchor="C")
        fig.text(0.15 / _FIG_WIDTH_IN, (y + height / 2) / total_h, view[0].upper(),
                 color="w", ha="center", va="center", fontsize=9)
    y -= cbar_h
    cax = fig.add_axes([0.3, (y + 0.45) / total_h, 0.4, 0.1 / total_h])
    cbar = fig.colorbar(image, cax=cax, orientation="horizontal")
    cbar.set_label(block["label"], color="w")
    cbar.ax.tick_params(colors="w", labelsize=8)
    cbar.outline.set_edgecolor("w")
    return y


def magnitude_svg(magnitude, mask, voxel_size_mm, *, n_slices=6):
    """Magnitude (first echo, arbitrary units) with the brain-mask contour in red."""
    block = {"volume": magnitude, "label": "magnitude (a.u.)", "contour": True,
             "title": "Magnitude with brain mask",
             "window": robust_window(magnitude, None, percentiles=(0.5, 99.5))}
    return mosaic_svg([block], voxel_size_mm, mask=mask, n_slices=n_slices)


def phase_svg(wrapped_rad, unwrapped_rad, voxel_size_mm, *, mask=None, echo=1, n_slices=6):
    """Wrapped (−π..π) next to unwrapped phase (rad) of one echo."""
    blocks = [
        {"volume": wrapped_rad, "label": "wrapped phase (rad)", "window": (-np.pi, np.pi),
         "title": f"Echo {echo}: wrapped phase"},
        {"volume": unwrapped_rad, "label": "unwrapped phase (rad)", "mask_outside": True,
         "title": f"Echo {echo}: unwrapped phase (ROMEO)"},
    ]
    return mosaic_svg(blocks, voxel_size_mm, mask=mask, n_slices=n_slices)


def quality_svg(quality, voxel_size_mm, *, mask=None, n_slices=6):
    """ROMEO voxel quality map (0 = unreliable .. 1 = reliable), with the mask contour."""
    block = {"volume": quality, "label": "ROMEO quality (0-1)", "window": (0.0, 1.0),
             "cmap": "viridis", "contour": mask is not None, "title": "ROMEO quality map"}
    return mosaic_svg([block], voxel_size_mm, mask=mask, n_slices=n_slices)


def b0_svg(b0_hz, voxel_size_mm, *, mask=None, n_slices=6):
    """B0 map (Hz) in a window symmetric about 0."""
    block = {"volume": b0_hz, "label": "B0 (Hz)", "cmap": "RdBu_r", "mask_outside": True,
             "window": robust_window(b0_hz, mask, symmetric=True), "title": "B0 field map"}
    return mosaic_svg([block], voxel_size_mm, mask=mask, n_slices=n_slices)


def local_field_svg(local_ppm, voxel_size_mm, *, mask=None, n_slices=6):
    """Local field after background removal (ppm) in a window symmetric about 0."""
    block = {"volume": local_ppm, "label": "local field (ppm)", "cmap": "gray",
             "mask_outside": True, "window": robust_window(local_ppm, mask, symmetric=True),
             "title": "Local field (background removed)"}
    return mosaic_svg([block], voxel_size_mm, mask=mask, n_slices=n_slices)


def chi_svg(chi_ppm, voxel_size_mm, *, mask=None, csf=None, n_slices=6,
            window=CHI_WINDOW_PPM, wide_window=CHI_WIDE_WINDOW_PPM):
    """Susceptibility χ (ppm) in the fixed window and in a wider one; the
    outline of ``csf`` (the run's ventricular CSF core), when it has voxels, in
    cyan on the first."""
    first = {"volume": chi_ppm, "label": "χ (ppm)", "window": tuple(window),
             "mask_outside": True, "title": f"χ map, window {window[0]:+g}..{window[1]:+g} ppm"}
    if csf is not None and np.any(csf):
        first["overlays"] = [{"volume": np.asarray(csf, np.float32), "levels": [0.5],
                              "colors": [CSF_COLOUR]}]
        first["title"] += " (cyan: the ventricular CSF core)"
    blocks = [
        first,
        {"volume": chi_ppm, "label": "χ (ppm)", "window": tuple(wide_window),
         "mask_outside": True,
         "title": f"χ map, wide window {wide_window[0]:+g}..{wide_window[1]:+g} ppm"},
    ]
    return mosaic_svg(blocks, voxel_size_mm, mask=mask, n_slices=n_slices)


#: outline colour of the ventricular CSF core on the χ reportlet
CSF_COLOUR = "#00e5ff"

#: one colour per deep grey matter label (1..7) of the regions reportlet
LABEL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#17becf")


def registration_svg(reference, warped_template, voxel_size_mm, *, mask=None, n_slices=6):
    """The run's GRE reference (mean magnitude) with contours of the template
    brought onto it (two iso-levels: head outline and tissue boundaries)."""
    inside = warped_template[warped_template > 0]
    levels = list(np.percentile(inside, [10, 60])) if inside.size else []
    block = {"volume": reference, "label": "GRE magnitude, mean over echoes (a.u.)",
             "title": "Registration: template contours (yellow, cyan) on the run",
             "window": robust_window(reference, None, percentiles=(0.5, 99.5)),
             "overlays": [{"volume": warped_template, "levels": levels,
                           "colors": ["#ffd700", "#00e5ff"]}]}
    return mosaic_svg([block], voxel_size_mm, mask=mask, n_slices=n_slices)


def regions_svg(chi_ppm, labels, voxel_size_mm, *, mask=None, n_slices=6,
                window=CHI_WINDOW_PPM):
    """χ with the outline of each deep grey matter region (colours: LABEL_COLOURS)."""
    labels = np.asarray(labels)
    support = labels > 0
    overlays = [{"volume": (labels == k).astype(np.float32), "levels": [0.5],
                 "colors": [LABEL_COLOURS[(k - 1) % len(LABEL_COLOURS)]]}
                for k in range(1, int(labels.max()) + 1) if (labels == k).any()]
    block = {"volume": chi_ppm, "label": "χ (ppm)", "window": tuple(window),
             "title": "Deep grey matter regions over χ", "overlays": overlays}
    return mosaic_svg([block], voxel_size_mm, mask=support if support.any() else mask,
                      n_slices=n_slices)
