"""One multi-echo GRE run (:class:`QSMRun`) and how the files pybids found
are grouped into it: pairs of magnitude and phase (or real and imaginary)
files, one per echo sorted by ``EchoTime``, or one 4-D file."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from ..qsm.units import b0_dir_from_affine
from . import QSMPrepInputError
from .metadata import (
    _optional_number,
    b0_affine,
    b0_dir_from_sidecar,
    echo_times_s_from_sidecar,
    field_strength_t_from_sidecar,
    phase_units,
)

LOGGER = logging.getLogger("qsmprep")

#: BIDS suffixes of multi-echo gradient-echo images
GRE_SUFFIXES = ("MEGRE", "T2starw")
#: entities that tell runs of one subject apart
RUN_ENTITIES = ("session", "acquisition", "reconstruction", "run")
#: the key of each run entity in file names
ENTITY_KEYS = {"session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
_NIFTI = (".nii", ".nii.gz")


@dataclass(frozen=True)
class QSMRun:
    """One multi-echo acquisition: magnitude and phase files and their metadata.

    ``magnitude`` and ``phase`` list the files in the order their volumes are
    stacked (one 3-D file per echo sorted by echo time, or one 4-D file);
    ``echo_times_s`` and ``magnitude_echo_times_s`` follow that same stacking
    order; :attr:`sorted_echo_times_s` is the order used for processing.
    ``magnitude`` is empty for a phase-only run. With ``complex_parts``,
    ``magnitude`` and ``phase`` list the ``part-real`` and ``part-imag`` files
    (magnitude and phase are computed from them when loading). ``mask`` is a
    user-supplied brain mask on the run's grid, set by :func:`attach_masks`.
    """

    subject: str
    entities: tuple  # ((name, value), ...) of RUN_ENTITIES present, plus suffix
    magnitude: tuple
    phase: tuple
    echo_times_s: tuple
    magnitude_echo_times_s: tuple
    field_strength_t: float  # used for the ppm conversion (see field_strength_t_from_sidecar)
    phase_units: str | None  # "rad", "arbitrary" or None (infer from the range)
    #: the sidecar's B0_dir (unit vector, voxel axes), None when it has none; the
    #: direction to use is :attr:`b0_dir` (this, else from the affine)
    b0_dir_sidecar: tuple | None
    complex_parts: bool = False  # magnitude/phase hold the part-real/part-imag files
    mask: str | None = None  # user-supplied brain mask (--mask / --derivatives), checked
    mask_source: str | None = None  # how to cite it: the path, or bids:<name>:<relative path>
    #: sidecar key the field strength came from: "ImagingFrequency" or "MagneticFieldStrength"
    field_strength_source: str = "MagneticFieldStrength"
    #: the sidecar's nominal MagneticFieldStrength, None when it has none
    nominal_field_strength_t: float | None = None
    #: the sidecar's ImagingFrequency (MHz), None when it has none
    imaging_frequency_mhz: float | None = None

    @property
    def entity_dict(self):
        return dict(self.entities)

    @property
    def suffix(self):
        return self.entity_dict["suffix"]

    @property
    def name(self):
        """Short identifier, e.g. ``ses-1_acq-fast_run-2`` (``MEGRE`` if no entity)."""
        parts = [f"{ENTITY_KEYS[k]}-{v}" for k, v in self.entities if k in ENTITY_KEYS]
        return "_".join(parts) or self.suffix

    @property
    def label(self):
        """``sub-<label> <name> (<first phase file>)``: the run in messages."""
        return f"sub-{self.subject} {self.name} ({Path(self.phase[0]).name})"

    @property
    def b0_dir(self):
        """Unit B0 direction in voxel axes, the one processing uses: the
        sidecar's ``B0_dir`` (:attr:`b0_dir_sidecar`) if given, else from the
        affine of the first phase image."""
        if self.b0_dir_sidecar is not None:
            return self.b0_dir_sidecar
        affine, _ = b0_affine(nb.load(self.phase[0]).header)
        return tuple(float(v) for v in b0_dir_from_affine(affine))

    @property
    def b0_dir_source(self):
        """Where :attr:`b0_dir` comes from, in words (``B0DirectionSource``)."""
        if self.b0_dir_sidecar is not None:
            return "sidecar B0_dir"
        return b0_affine(nb.load(self.phase[0]).header)[1]

    @property
    def sorted_echo_times_s(self):
        """The echo times in processing order (ascending)."""
        return tuple(sorted(self.echo_times_s))

    @property
    def sources(self):
        return tuple(self.magnitude) + tuple(self.phase)


def _make_run(subject, key, files):
    _check_duplicates(files)
    by_part = {}
    for f in files:
        by_part.setdefault(f[1].get("part", "mag"), []).append(f)
    label = f"sub-{subject} " + (" ".join(f"{k}={v}" for k, v in key))
    complex_parts = "phase" not in by_part and ("real" in by_part or "imag" in by_part)
    if complex_parts:
        first, second = by_part.get("real", []), by_part.get("imag", [])
        if not first or not second:
            have, need = ("real", "imag") if first else ("imag", "real")
            raise QSMPrepInputError(
                f"{Path((first or second)[0][0]).name} (part-{have}) has no part-{need} "
                f"partner for {label}; add the part-{need} files of the same echoes, or "
                "give magnitude and phase (part-mag, part-phase) instead"
            )
        names = ("real", "imaginary")
    else:
        first, second = by_part.get("mag", []), by_part.get("phase", [])
        names = ("magnitude", "phase")
        if not second:
            raise QSMPrepInputError(
                f"No phase images for {label} (found only {Path(files[0][0]).name}); QSM "
                "needs the phase: add the part-phase files, e.g. "
                "*_echo-1_part-phase_MEGRE.nii.gz (or part-real and part-imag files)"
            )
        if not first:
            LOGGER.warning(
                "%s: %s has no part-mag partner; processing this run from the phase "
                "only (no magnitude weighting; needs --masking quality)",
                label, Path(second[0][0]).name,
            )
    phase_files, echo_times_s = _order_echoes(second, names[1])
    mag_files, mag_times_s = _order_echoes(first, names[0]) if first else ([], [])
    if first:
        unpaired = _unpaired_echoes(first, mag_files, mag_times_s, second, phase_files,
                                    echo_times_s, names)
        if unpaired:
            raise QSMPrepInputError(
                f"{'; '.join(unpaired)}. Each echo needs its {names[0]} and its {names[1]} "
                "file, with the same EchoTime: add the missing file (or correct the EchoTime "
                "in its sidecar), or remove the unpaired one"
            )
    meta = second[0][2]
    strength_t, strength_source = field_strength_t_from_sidecar(meta, second[0][0], with_source=True)
    return QSMRun(
        subject=subject,
        entities=key,
        magnitude=tuple(mag_files),
        phase=tuple(phase_files),
        echo_times_s=tuple(echo_times_s),
        magnitude_echo_times_s=tuple(mag_times_s),
        field_strength_t=strength_t,
        field_strength_source=strength_source,
        nominal_field_strength_t=_optional_number(meta, "MagneticFieldStrength", second[0][0]),
        imaging_frequency_mhz=_optional_number(meta, "ImagingFrequency", second[0][0]),
        phase_units="rad" if complex_parts else phase_units({p: m for p, _, m in second}),
        b0_dir_sidecar=b0_dir_from_sidecar(meta, second[0][0]),
        complex_parts=complex_parts,
    )


def _unpaired_echoes(first, first_files, first_times, second, second_files, second_times,
                     names):
    """One phrase per echo found in one part only, e.g. ``echo 3 (0.012 s) has a
    magnitude but no phase: <path>``, in echo-time order.

    Echo times match within a relative 1e-4 (absolute 1e-7 s). An echo is
    numbered by its ``echo-`` entity, or by its position in echo-time order
    in a 4-D file.
    """
    def numbers(files, found):
        entity = {str(path): ents.get("echo") for path, ents, _ in found}
        if len(files) == 1 and entity.get(str(files[0])) is None:  # one 4-D file
            return None
        return [entity.get(str(path)) for path in files]

    def unmatched(times, other):
        return [i for i, t in enumerate(times)
                if not np.any(np.isclose(t, other, rtol=1e-4, atol=1e-7))]

    part = {"real": "real part", "imaginary": "imaginary part"}
    phrases = []
    for have, files, times, found, other, missing in (
            (names[0], first_files, first_times, first, second_times, names[1]),
            (names[1], second_files, second_times, second, first_times, names[0])):
        echo_numbers = numbers(files, found)
        for i in unmatched(times, other):
            number = i + 1 if echo_numbers is None else echo_numbers[i]
            path = files[0] if echo_numbers is None else files[i]
            phrases.append((times[i], f"echo {number} ({times[i]:g} s) has a "
                                      f"{part.get(have, have)} but no "
                                      f"{part.get(missing, missing)}: {path}"))
    return [phrase for _, phrase in sorted(phrases, key=lambda item: item[0])]


def _check_duplicates(files):
    """Refuse one image stored twice (``.nii`` and ``.nii.gz`` of the same name)."""
    seen = {}
    for path, _, _ in files:
        stem = Path(path).name.split(".nii")[0]
        if stem in seen:
            raise QSMPrepInputError(
                f"{path} and {seen[stem]} are the same image stored twice (.nii and "
                ".nii.gz); delete one of them"
            )
        seen[stem] = path


def _order_echoes(files, part):
    """Files in stacking order and their echo times (s).

    One 3-D file per echo: sorted by ``EchoTime`` (never by name). One file
    without an ``echo`` entity: a 4-D (or single-echo 3-D) image whose sidecar
    lists the echo times in volume order.
    """
    with_echo = [f for f in files if "echo" in f[1]]
    if with_echo and len(with_echo) != len(files):
        names = ", ".join(Path(p).name for p, e, _ in files if "echo" not in e)
        raise QSMPrepInputError(
            f"{names} has no echo- entity but other {part} files of the same run do; "
            "use either one file per echo (echo-1, echo-2, ...) or one 4-D file"
        )
    if not with_echo:
        if len(files) != 1:
            raise QSMPrepInputError(
                f"Several {part} files without an echo- entity for one run: "
                f"{', '.join(Path(p).name for p, _, _ in files)}; add echo-<n> entities "
                "or use acq-/run- to tell the runs apart"
            )
        path, _, meta = files[0]
        times = echo_times_s_from_sidecar(meta, path)
        img = nb.load(path)
        n_vols = img.shape[3] if len(img.shape) > 3 else 1
        if len(img.shape) > 4 or n_vols != len(times):
            raise QSMPrepInputError(
                f"{path} holds {n_vols} echo volume(s) (shape {img.shape}) but its "
                f"sidecar lists {len(times)} EchoTime value(s) {_fmt(times)}; give one "
                "EchoTime per volume, in volume order"
            )
        return [path], times
    timed = []
    for path, ents, meta in files:
        times = echo_times_s_from_sidecar(meta, path)
        if len(times) != 1:
            raise QSMPrepInputError(
                f"{path} (echo-{ents['echo']}) lists {len(times)} EchoTime values; a "
                "one-echo file needs a single EchoTime in seconds"
            )
        timed.append((times[0], path))
    timed.sort()
    for (t1, p1), (t2, p2) in zip(timed, timed[1:]):
        if math.isclose(t1, t2, rel_tol=1e-6):
            raise QSMPrepInputError(
                f"{p1} and {p2} have the same EchoTime {t1} s; each echo of a run "
                "needs its own echo time (or tell the runs apart with run-/acq-)"
            )
    return [p for _, p in timed], [t for t, _ in timed]


def _fmt(values):
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
