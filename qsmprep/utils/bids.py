"""Finding and checking the multi-echo GRE runs of a BIDS dataset.

Everything here runs before any processing starts, so that a problem with
the input stops qsmprep at once with a message naming the file and the fix
(:class:`QSMPrepInputError`) instead of a crash deep in the Nipype graph.
Only NIfTI headers and JSON sidecars are read here; the voxel data are read
by :func:`qsmprep.utils.images.load_echoes` inside the workflow.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nb
import numpy as np

from ..qsm.units import (
    b0_direction_from_affine,
    field_strength_from_frequency,
    voxel_size_from_affine,
)

LOGGER = logging.getLogger("qsmprep")

#: BIDS suffixes of multi-echo gradient-echo images
GRE_SUFFIXES = ("MEGRE", "T2starw")
#: entities that tell runs of one subject apart
RUN_ENTITIES = ("session", "acquisition", "reconstruction", "run")
#: the key of each run entity in file names
ENTITY_KEYS = {"session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
_NIFTI = (".nii", ".nii.gz")
#: field of view (mm) below which a slab gets a warning: the dipole field of
#: sources outside it cannot be told apart from that of the tissue inside
THIN_SLAB_MM = 32.0


class QSMPrepInputError(ValueError):
    """The input dataset cannot be processed; the message says what to fix."""


@dataclass(frozen=True)
class QSMRun:
    """One multi-echo acquisition: magnitude and phase files and their metadata.

    ``magnitude`` and ``phase`` list the files in the order their volumes are
    stacked (one 3-D file per echo sorted by echo time, or one 4-D file);
    ``echo_times`` and ``magnitude_echo_times`` (s) follow that same stacking
    order; :attr:`sorted_echo_times` is the order used for processing.
    ``magnitude`` is empty for a phase-only run. With ``complex_parts``,
    ``magnitude`` and ``phase`` list the ``part-real`` and ``part-imag`` files
    (magnitude and phase are computed from them when loading). ``mask`` is a
    user-supplied brain mask on the run's grid, set by :func:`attach_masks`.
    """

    subject: str
    entities: tuple  # ((name, value), ...) of RUN_ENTITIES present, plus suffix
    magnitude: tuple
    phase: tuple
    echo_times: tuple
    magnitude_echo_times: tuple
    field_strength: float  # T, used for the ppm conversion (see field_strength())
    phase_units: str | None  # "rad", "arbitrary" or None (infer from the range)
    b0_dir: tuple | None  # from the sidecar's B0_dir, else None (use the affine)
    complex_parts: bool = False  # magnitude/phase hold the part-real/part-imag files
    mask: str | None = None  # user-supplied brain mask (--mask / --derivatives), checked
    mask_source: str | None = None  # how to cite it: the path, or bids:<name>:<relative path>
    #: sidecar key the field strength came from: "ImagingFrequency" or "MagneticFieldStrength"
    field_strength_source: str = "MagneticFieldStrength"
    #: the sidecar's nominal MagneticFieldStrength (T), None when it has none
    nominal_field_strength: float | None = None
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
    def b0_direction(self):
        """Unit B0 direction in voxel axes: the sidecar's ``B0_dir`` if given,
        else from the affine of the first phase image."""
        if self.b0_dir is not None:
            return self.b0_dir
        affine, _ = b0_affine(nb.load(self.phase[0]).header)
        return tuple(float(v) for v in b0_direction_from_affine(affine))

    @property
    def b0_direction_source(self):
        """Where :attr:`b0_direction` comes from, in words (``B0DirectionSource``)."""
        if self.b0_dir is not None:
            return "sidecar B0_dir"
        return b0_affine(nb.load(self.phase[0]).header)[1]

    @property
    def sorted_echo_times(self):
        return tuple(sorted(self.echo_times))

    @property
    def sources(self):
        return tuple(self.magnitude) + tuple(self.phase)


def check_output_dir(bids_dir, output_dir):
    """Refuse an output folder that would write into the input dataset.

    Allowed: anywhere outside ``bids_dir``, or under ``bids_dir/derivatives/``.
    """
    bids_dir = Path(bids_dir).resolve()
    output_dir = Path(output_dir).resolve()
    if output_dir == bids_dir or bids_dir.is_relative_to(output_dir):
        raise QSMPrepInputError(
            f"The output folder {output_dir} contains the input dataset {bids_dir}; "
            f"choose a folder outside it, e.g. {bids_dir}/derivatives/qsmprep"
        )
    if output_dir.is_relative_to(bids_dir):
        rel = output_dir.relative_to(bids_dir)
        if rel.parts[0] != "derivatives" or len(rel.parts) < 2:
            raise QSMPrepInputError(
                f"The output folder {output_dir} is inside the input dataset; qsmprep "
                f"never writes into it. Use {bids_dir}/derivatives/qsmprep or a "
                "folder outside the dataset."
            )


def check_writable_dir(folder, what="output folder"):
    """Check, without writing anything, that ``folder`` can be written (or created):
    the folder, or else its nearest existing parent, must be writable by this user.
    :class:`QSMPrepInputError` naming the folder and the fix otherwise (a read-only
    mount, a container user without permission)."""
    import os

    folder = Path(folder).absolute()
    existing = folder
    while not os.path.exists(existing) and existing != existing.parent:  # never raises
        existing = existing.parent
    if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK):
        return
    where = "" if existing == folder else f" (its parent {existing} cannot be written)"
    raise QSMPrepInputError(
        f"The {what} {folder} is not writable{where}: give a folder this user "
        f"(uid {os.getuid()}) may write to; in a container, mount it without ':ro' and "
        "run as the folder's owner (docker run --user $(id -u):$(id -g) ...)"
    )


def collect_data(bids_dir, *, participant_label=(), session_label=(), bids_filters=None,
                 validate=True):
    """All GRE runs to process, as ``{subject: [QSMRun, ...]}``.

    Raises :class:`QSMPrepInputError` when a requested subject does not exist,
    when nothing can be processed, or when a run fails :func:`check_run`.
    """
    from bids import BIDSLayout

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise QSMPrepInputError(
            f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json; "
            f"check the path, or create {bids_dir}/dataset_description.json with at least "
            '{"Name": "<dataset name>", "BIDSVersion": "1.9.0"}'
        )
    try:
        layout = BIDSLayout(str(bids_dir), validate=validate)
    except Exception as err:  # pybids raises several types for a broken dataset
        raise QSMPrepInputError(
            f"pybids could not index the dataset {bids_dir}: {err}") from err

    available = layout.get_subjects()
    if participant_label:
        missing = sorted(set(participant_label) - set(available))
        if missing:
            raise QSMPrepInputError(
                f"No subject matches --participant-label {' '.join(missing)} in {bids_dir}; "
                f"subjects found: {', '.join(sorted(available)) or 'none'}"
            )
        subjects = list(participant_label)
    else:
        subjects = sorted(available)

    data = {}
    for subject in subjects:
        runs = collect_runs(layout, subject, session_label=session_label,
                            bids_filters=bids_filters)
        if runs:
            data[subject] = runs
        elif participant_label:
            raise QSMPrepInputError(_no_data_message(bids_dir, subject, session_label,
                                                     validate))
        else:
            LOGGER.warning("sub-%s has no multi-echo GRE (MEGRE/T2starw) images; skipped",
                           subject)
    if not data:
        raise QSMPrepInputError(
            f"No multi-echo GRE images (anat/*_MEGRE or *_T2starw with part-phase) in "
            f"{bids_dir} for the subjects and filters given"
        )
    return data


def _no_data_message(bids_dir, subject, session_label, validate):
    where = f" in session(s) {', '.join(session_label)}" if session_label else ""
    msg = (
        f"sub-{subject} has no MEGRE or T2starw images{where} in {bids_dir}; "
        "expected e.g. sub-{0}/anat/sub-{0}_echo-1_part-phase_MEGRE.nii.gz".format(subject)
    )
    ignored = sorted(Path(bids_dir, f"sub-{subject}").glob("**/anat/*_part-phase_*.nii*"))
    if validate and ignored:
        msg += (
            f". BIDS validation left out {ignored[0].name}"
            f"{f' and {len(ignored) - 1} more' if len(ignored) > 1 else ''} (e.g. a 4-D "
            "MEGRE file without echo- entity); rename it or add --skip-bids-validation"
        )
    return msg


def collect_runs(layout, subject, *, session_label=(), bids_filters=None):
    """The checked :class:`QSMRun` of one subject, grouped by ses/acq/rec/run."""
    query = {"subject": subject, "datatype": "anat", "suffix": list(GRE_SUFFIXES),
             "extension": list(_NIFTI), **(bids_filters or {})}
    if session_label:
        query["session"] = list(session_label)
    try:
        found = layout.get(**query)
    except ValueError as err:  # an entity pybids does not know, from --bids-filter-file
        raise QSMPrepInputError(
            f"The BIDS filters {bids_filters} cannot be used: {err}. Use pybids entity "
            "names, e.g. {\"acquisition\": \"highres\"}"
        ) from None
    patterns = bidsignore_patterns(layout.root)
    kept = [f for f in found if not is_bidsignored(f.path, layout.root, patterns)]
    if len(kept) < len(found):
        LOGGER.info("sub-%s: %d file(s) left out by %s/.bidsignore", subject,
                    len(found) - len(kept), layout.root)
    groups = {}
    for f in kept:
        ents = f.get_entities()
        key = tuple((k, str(ents[k])) for k in RUN_ENTITIES if k in ents)
        key += (("suffix", ents["suffix"]),)
        groups.setdefault(key, []).append((f.path, ents, f.get_metadata()))
    runs = []
    for key, files in sorted(groups.items()):
        run = _make_run(subject, key, files)
        check_run(run)
        runs.append(run)
    return runs


def bidsignore_patterns(bids_dir):
    """The patterns of ``<bids_dir>/.bidsignore`` (none when it does not exist)."""
    path = Path(bids_dir) / ".bidsignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def is_bidsignored(path, bids_dir, patterns):
    """Whether ``path`` matches a ``.bidsignore`` pattern (gitignore-style: a
    pattern without ``/`` matches any file or folder name, one with ``/`` the
    path from the dataset root, a trailing ``/`` a folder and all it holds)."""
    from fnmatch import fnmatchcase

    rel = Path(path).absolute().relative_to(Path(bids_dir).absolute()).parts
    for pattern in patterns:
        pat = pattern.strip("/")
        if "/" in pat or pattern.startswith("/"):
            if any(fnmatchcase("/".join(rel[:n]), pat) for n in range(1, len(rel) + 1)):
                return True
        elif any(fnmatchcase(part, pat) for part in rel):
            return True
    return False


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
    phase_files, echo_times = _order_echoes(second, names[1])
    mag_files, mag_times = _order_echoes(first, names[0]) if first else ([], [])
    if first:
        unpaired = _unpaired_echoes(first, mag_files, mag_times, second, phase_files,
                                    echo_times, names)
        if unpaired:
            raise QSMPrepInputError(
                f"{'; '.join(unpaired)}. Each echo needs its {names[0]} and its {names[1]} "
                "file, with the same EchoTime: add the missing file (or correct the EchoTime "
                "in its sidecar), or remove the unpaired one"
            )
    meta = second[0][2]
    strength, strength_source = field_strength(meta, second[0][0], with_source=True)
    return QSMRun(
        subject=subject,
        entities=key,
        magnitude=tuple(mag_files),
        phase=tuple(phase_files),
        echo_times=tuple(echo_times),
        magnitude_echo_times=tuple(mag_times),
        field_strength=strength,
        field_strength_source=strength_source,
        nominal_field_strength=_optional_number(meta, "MagneticFieldStrength", second[0][0]),
        imaging_frequency_mhz=_optional_number(meta, "ImagingFrequency", second[0][0]),
        phase_units="rad" if complex_parts else phase_units({p: m for p, _, m in second}),
        b0_dir=b0_dir_from_sidecar(meta, second[0][0]),
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
        times = echo_times(meta, path)
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
        times = echo_times(meta, path)
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


def _number(value, key, path):
    """A float from a sidecar value, accepting numbers written as strings."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QSMPrepInputError(
            f"{key} in the sidecar of {path} is {value!r}, not a number"
        ) from None


def echo_times(meta, path):
    """Echo time(s) in seconds from a sidecar (``EchoTime``: number, string or list)."""
    if "EchoTime" not in meta:
        raise QSMPrepInputError(
            f"{path} has no EchoTime in its JSON sidecar; add \"EchoTime\": <seconds> "
            "(a list, one per volume, for a 4-D file)"
        )
    value = meta["EchoTime"]
    values = value if isinstance(value, (list, tuple)) else [value]
    times = [_number(v, "EchoTime", path) for v in values]
    for t in times:
        if t >= 1:
            raise QSMPrepInputError(
                f"EchoTime {t:g} in the sidecar of {path} is not in seconds: it looks like "
                f"milliseconds: write {t / 1000:g} (divide every EchoTime by 1000)"
            )
        if not t > 0:
            raise QSMPrepInputError(
                f"EchoTime {t:g} in the sidecar of {path} is not a positive time; give "
                "the echo time in seconds, e.g. 0.004 for 4 ms"
            )
    return times


#: relative difference between ImagingFrequency / gamma_bar and the nominal
#: MagneticFieldStrength above which the two cannot describe the same scanner
#: (a "3 T" Siemens runs at 2.89 T, 3.6 % below; a frequency of another
#: nucleus, or one in Hz or kHz, is far off)
FIELD_STRENGTH_MISMATCH = 0.10


def _optional_number(meta, key, path):
    return None if meta.get(key) is None else _number(meta[key], key, path)


def field_strength(meta, path, *, with_source=False):
    """Main field in tesla from a sidecar, and (``with_source``) the key it came from.

    ``ImagingFrequency`` (MHz, the proton resonance the scanner measured) /
    γ̄ is preferred: ``MagneticFieldStrength`` is the nominal value (3, 7),
    and a Siemens "3 T" scanner runs at 2.89 T, so χ from the nominal value
    would be about 3.6 % too low. Without ``ImagingFrequency`` the nominal
    ``MagneticFieldStrength`` is used. Both present but more than
    :data:`FIELD_STRENGTH_MISMATCH` apart is an error (one of them is wrong).
    """
    nominal = _optional_number(meta, "MagneticFieldStrength", path)
    frequency = _optional_number(meta, "ImagingFrequency", path)
    if frequency is not None:
        value, source = field_strength_from_frequency(frequency), "ImagingFrequency"
        if not 0 < value < 30:
            raise QSMPrepInputError(
                f"ImagingFrequency {frequency:g} in the sidecar of {path} gives a field of "
                f"{value:.4g} T; expected the proton frequency in MHz (e.g. 123.25 at 3 T, "
                "297.2 at 7 T): fix or remove it")
        if nominal is not None and abs(value - nominal) > FIELD_STRENGTH_MISMATCH * nominal:
            raise QSMPrepInputError(
                f"The sidecar of {path} has MagneticFieldStrength {nominal:g} T but "
                f"ImagingFrequency {frequency:g} MHz, i.e. {value:.4g} T: they cannot both "
                "be right (a frequency of another nucleus, or not in MHz?). Fix the wrong "
                "one, or remove ImagingFrequency to use the nominal field strength")
    elif nominal is not None:
        value, source = nominal, "MagneticFieldStrength"
    else:
        raise QSMPrepInputError(
            f"{path} has neither MagneticFieldStrength (T) nor ImagingFrequency (MHz) in "
            "its sidecar; add one, e.g. \"MagneticFieldStrength\": 3"
        )
    if not 0 < value < 30:
        raise QSMPrepInputError(
            f"The field strength from the sidecar of {path} is {value} T; expected "
            "MagneticFieldStrength in tesla (e.g. 3 or 7)"
        )
    return (value, source) if with_source else value


def phase_units(metas):
    """``Units`` of the phase files: "rad", "arbitrary" or None (not given).

    ``metas`` maps each phase file to its sidecar; all must agree.
    """
    found = {}
    for path, meta in metas.items():
        unit = meta.get("Units")
        unit = None if unit is None else str(unit).strip().lower()
        if unit in ("radian", "radians"):
            unit = "rad"
        if unit not in (None, "rad", "arbitrary"):
            raise QSMPrepInputError(
                f"Phase Units {meta['Units']!r} in the sidecar of {path} is not supported; "
                "use \"rad\" or \"arbitrary\" (rescaled to -pi..pi)"
            )
        found.setdefault(unit, path)
    if len(found) > 1:
        raise QSMPrepInputError(
            "The phase files of one run disagree on Units: "
            + "; ".join(f"{Path(p).name}: {u}" for u, p in found.items())
        )
    return next(iter(found))


def b0_dir_from_sidecar(meta, path):
    """``B0_dir`` (unit vector in voxel axes) from a sidecar, or None."""
    if meta.get("B0_dir") is None:
        return None
    try:
        b = np.asarray(meta["B0_dir"], dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise QSMPrepInputError(
            f"B0_dir in the sidecar of {path} is {meta['B0_dir']!r}; expected three numbers"
        ) from None
    norm = np.linalg.norm(b)
    if not norm > 0:
        raise QSMPrepInputError(f"B0_dir in the sidecar of {path} is the zero vector")
    return tuple(float(v) for v in b / norm)


def check_run(run):
    """Check the files of a run from their NIfTI headers.

    Every file must be a complete NIfTI image (not empty, not truncated) and
    all echoes, magnitude and phase, must share shape and affine. A header
    whose qform and sform disagree gets a warning (:func:`b0_affine` says which
    one gives the B0 direction).
    """
    ref_path = run.phase[0]
    ref = read_header(ref_path)
    check_orientation(ref, ref_path)
    check_extent(ref, ref_path)
    for part, files in (("phase", run.phase), ("magnitude", run.magnitude)):
        for path in files:
            img = read_header(path)
            what = "magnitude and phase" if part == "magnitude" else "phase echoes"
            if img.shape[:3] != ref.shape[:3]:
                raise QSMPrepInputError(
                    f"{path} has shape {img.shape[:3]}, not the shape {ref.shape[:3]} of "
                    f"{ref_path}: the {what} of a run must share one voxel grid"
                    f"{_grid_fix(part)}"
                )
            if not np.allclose(img.affine, ref.affine, atol=1e-4):
                raise QSMPrepInputError(
                    f"{path} and {ref_path} have different affines (voxel-to-world "
                    f"matrices): the {what} of a run must share one voxel grid"
                    f"{_grid_fix(part)}"
                )
    if len(run.magnitude) == 1:
        n_mag = nb.load(run.magnitude[0]).shape[3:4] or (1,)
        if n_mag[0] != len(run.echo_times):
            raise QSMPrepInputError(
                f"{run.magnitude[0]} holds {n_mag[0]} echoes but the phase has "
                f"{len(run.echo_times)}; magnitude and phase need the same echoes"
            )


def read_header(path):
    """The NIfTI image at ``path`` (header only), checked to be complete.

    Raises :class:`QSMPrepInputError` naming the file for an empty, unreadable
    or truncated file. Truncation is detected from the file size (``.nii``) or
    the gzip trailer's uncompressed size (``.nii.gz``), confirmed by reading
    the stream to its end, so a complete file is never read whole here.
    """
    fix = "re-export it from the scanner/converter or copy it again"
    try:
        img = nb.load(path)
    except Exception as err:  # nibabel raises several types for a broken file
        size = Path(path).stat().st_size
        what = "is empty (0 bytes)" if size == 0 else f"is not a readable NIfTI file ({err})"
        raise QSMPrepInputError(f"{path} {what}; {fix}") from None
    header = img.header
    offset = getattr(img.dataobj, "offset", None) or header.get_data_offset()
    expected = int(offset) + int(
        np.prod(img.shape, dtype=np.int64) * header.get_data_dtype().itemsize)
    if not str(path).endswith(".gz"):
        if Path(path).stat().st_size < expected:
            raise QSMPrepInputError(
                f"{path} is truncated: {Path(path).stat().st_size} bytes for an image of "
                f"{expected} bytes (shape {img.shape}); {fix}")
        return img
    with open(path, "rb") as f:
        f.seek(-4, 2)
        isize = int.from_bytes(f.read(4), "little")
    if isize != expected % 2**32 and not _gzip_complete(path):
        raise QSMPrepInputError(
            f"{path} is truncated or corrupt (its compressed stream ends early, before "
            f"the {expected} bytes of an image of shape {img.shape}); {fix}")
    return img


def _gzip_complete(path):
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error):
        return False
    return True


#: NIfTI ``qform_code``/``sform_code`` of scanner coordinates (NIFTI_XFORM_SCANNER_ANAT)
XFORM_SCANNER = 1


def _forms_disagree(header):
    qform, _ = header.get_qform(coded=True)
    sform, _ = header.get_sform(coded=True)
    return qform is not None and sform is not None and not np.allclose(qform, sform, atol=1e-3)


def b0_affine(header):
    """The affine whose rotation gives the B0 direction, and its source in words.

    B0 lies along the scanner's z axis, which only the scanner-coordinate
    transform knows. The sform is used when set (as by nibabel and FSL),
    except when it disagrees with a qform whose ``qform_code`` is 1
    (scanner): then the sform was most likely rewritten by a registration
    or resampling (to a template, another session, a T1w) and its rotation
    is no longer the scanner's, so the qform's is used. Without either, the
    nibabel fallback (B0 along the third voxel axis) is returned.
    """
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if sform is not None:
        if qform is not None and int(qcode) == XFORM_SCANNER and _forms_disagree(header):
            return qform, (f"qform of the header (qform_code {int(qcode)}; the sform, "
                           f"sform_code {int(scode)}, disagrees with it)")
        return sform, f"sform of the header (sform_code {int(scode)})"
    if qform is not None:
        return qform, f"qform of the header (qform_code {int(qcode)})"
    return header.get_base_affine(), "none in the header: assumed along the third voxel axis"


def check_orientation(img, path):
    """Warn when the qform and sform of ``img`` disagree or neither is set."""
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None and sform is None:
        LOGGER.warning(
            "%s has neither qform nor sform set: its orientation is unknown and B0 is "
            "assumed along the third voxel axis. Fix the header (e.g. re-convert with "
            "dcm2niix) or give \"B0_dir\" in the sidecar", path)
    elif _forms_disagree(header) and int(qcode) == XFORM_SCANNER:
        LOGGER.warning(
            "%s: the qform and sform of the header disagree and the qform is the scanner's "
            "(qform_code 1): the qform is used for the B0 direction (a registered or "
            "resampled sform would give the wrong dipole kernel), the sform for the voxel "
            "grid. If the sform is the scanner's, copy it to the qform (e.g. fslorient "
            "-copysform2qform) or give \"B0_dir\" in the sidecar", path)
    elif _forms_disagree(header):
        LOGGER.warning(
            "%s: the qform and sform of the header disagree; the sform is used (as by "
            "nibabel and FSL) for the voxel size and the B0 direction (the qform, "
            "qform_code %d, is not the scanner's). If the qform is the right one, copy it "
            "to the sform (e.g. fslorient -copyqform2sform)", path, int(qcode))


def check_extent(img, path):
    """Warn when the image is a slab thinner than :data:`THIN_SLAB_MM` along an axis."""
    extent = np.asarray(img.shape[:3]) * voxel_size_from_affine(img.affine)
    axis = int(np.argmin(extent))
    if extent[axis] < THIN_SLAB_MM:
        LOGGER.warning(
            "%s is a thin slab (%d voxels, %.3g mm along axis %d): QSM of so few slices is "
            "unreliable near its faces, and eroding background removal (V-SHARP, SHARP) "
            "may leave no voxel; prefer --bf-removal pdf or lbv, or acquire a thicker slab",
            path, img.shape[axis], extent[axis], axis)


def check_learned_voxel_size(run, label, workflow):
    """Warn when a learned method runs on voxels outside the sizes its networks
    were trained or validated on (:data:`qsmprep.dl.VALIDATED_VOXEL_SIZE_MM`)."""
    from ..dl import LEARNED_METHODS, VALIDATED_VOXEL_SIZE_MM

    learned = [m for m in dict.fromkeys((workflow.bf_removal, workflow.inversion))
               if m in LEARNED_METHODS]
    if not learned:
        return
    vox = np.asarray(voxel_size_from_affine(nb.load(run.phase[0]).affine))
    low, high = VALIDATED_VOXEL_SIZE_MM
    if vox.min() < low or vox.max() > high:
        LOGGER.warning(
            "%s has %s mm voxels, outside the %g-%g mm on which the %s network(s) were "
            "trained and validated: the map is unvalidated there. Prefer --pipeline classical "
            "(PDF + iLSQR) for such data, or compare both", label,
            " x ".join(f"{v:.3g}" for v in vox), low, high, " and ".join(learned))


def check_methods(data, workflow):
    """Refuse method settings that some runs of ``data`` cannot use.

    Phase-only runs (no magnitude) need the phase-quality mask, which ROMEO's
    quality map provides; bipolar phase-offset correction needs >= 3 echoes;
    the nonlinear echo combination needs >= 2 echoes. Learned methods on
    voxels they were not trained for get a warning
    (:func:`check_learned_voxel_size`).
    """
    for runs in data.values():
        for run in runs:
            label = f"sub-{run.subject} {run.name} ({Path(run.phase[0]).name})"
            if not run.magnitude and run.mask is None and (
                    workflow.masking != "quality" or workflow.unwrapping != "romeo"):
                raise QSMPrepInputError(
                    f"{label} has no magnitude images: process it with --masking quality "
                    "--unwrapping romeo (a phase-quality mask), or add the part-mag files"
                )
            if workflow.echo_combination == "nonlinear" and len(run.echo_times) < 2:
                raise QSMPrepInputError(
                    f"{label} has one echo but the nonlinear echo combination fits a phase "
                    "offset and the field, which needs 2 echoes or more; use "
                    "--echo-combination romeo (or linear) for single-echo data"
                )
            check_learned_voxel_size(run, label, workflow)
            bipolar = workflow.stage_params("phase_offset").get("bipolar", False)
            if (bipolar and workflow.phase_offset == "mcpc3ds"
                    and len(run.echo_times) < 3):
                raise QSMPrepInputError(
                    f"{label} has {len(run.echo_times)} echo(es) but the bipolar phase-offset "
                    "correction needs 3 or more; set bipolar = false under "
                    "[workflow.params.phase_offset] or use --phase-offset none"
                )


# ---------------------------------------------------------------------------
# User-supplied brain masks: --mask FILE, --derivatives NAME=PATH
# ---------------------------------------------------------------------------

#: affine tolerance (mm) between a user-supplied mask and the GRE grid
MASK_AFFINE_ATOL_MM = 1e-3


def attach_masks(data, *, mask_file=None, derivatives=None):
    """``data`` (``{subject: [QSMRun, ...]}``) with each run's user-supplied
    brain mask set (:attr:`QSMRun.mask`), checked before any processing.

    ``mask_file``: one NIfTI for every run. ``derivatives``: ``{name: path}``
    of BIDS derivatives datasets searched in order (pybids, no validation)
    for ``sub-X/[ses-Y/]anat/sub-X[_ses-Y][_acq][_rec][_run][_desc-brain]_mask
    .nii[.gz]`` with the run's entities, e.g. the masks qsmprep writes. A run
    without a mask there keeps the masking method (with a warning); none found
    for any run is an error. Every mask must lie on the run's grid
    (:func:`check_mask`).
    """
    derivatives = dict(derivatives or {})
    if not mask_file and not derivatives:
        return data
    if mask_file and derivatives:
        raise QSMPrepInputError(
            f"Give either --mask ({mask_file}) or --derivatives "
            f"({', '.join(f'{k}={v}' for k, v in derivatives.items())}), not both")
    runs = [run for subject_runs in data.values() for run in subject_runs]
    found = {}
    if mask_file:
        path = str(Path(mask_file).absolute())
        if not Path(path).is_file():
            raise QSMPrepInputError(f"--mask {mask_file}: file not found")
        for run in runs:
            found[id(run)] = (path, path)
        if len(runs) > 1:
            LOGGER.warning("--mask %s is used for all %d runs (%s); use --derivatives for "
                           "one mask per run", path, len(runs),
                           ", ".join(f"sub-{r.subject} {r.name}" for r in runs))
    else:
        layouts = [(name, _derivatives_layout(name, root)) for name, root in derivatives.items()]
        for run in runs:
            for name, layout in layouts:
                hit = find_derivative_mask(layout, run, name)
                if hit:
                    found[id(run)] = hit
                    break
        if not found:
            raise QSMPrepInputError(
                "No brain mask for any run in --derivatives "
                f"{', '.join(f'{k}={v}' for k, v in derivatives.items())}: expected e.g. "
                f"{_expected_mask_name(runs[0])}; check the names (sub-/ses-/acq-/rec-/run- "
                "as in the GRE files, suffix _mask, optional desc-brain)")
        for run in runs:
            if id(run) not in found:
                LOGGER.warning(
                    "sub-%s %s: no brain mask in the --derivatives datasets (expected %s); "
                    "it is computed with the masking method", run.subject, run.name,
                    _expected_mask_name(run))
    out = {}
    for subject, subject_runs in data.items():
        out[subject] = []
        for run in subject_runs:
            if id(run) in found:
                path, source = found[id(run)]
                check_mask(path, run, shared_by=len(runs) if mask_file else 1)
                run = replace(run, mask=path, mask_source=source)
            out[subject].append(run)
    return out


def _derivatives_layout(name, root):
    from bids import BIDSLayout

    root = Path(root)
    if not root.is_dir():
        raise QSMPrepInputError(f"--derivatives {name}={root}: this derivatives folder "
                                "does not exist")
    if not (root / "dataset_description.json").is_file():
        raise QSMPrepInputError(
            f"--derivatives {name}={root} is not a BIDS derivatives dataset: it has no "
            f"dataset_description.json; add one, e.g. {{\"Name\": \"{name}\", "
            '"BIDSVersion": "1.9.0", "DatasetType": "derivative"}')
    try:
        return BIDSLayout(str(root), validate=False, config=["bids", "derivatives"])
    except Exception as err:  # pybids raises several types for a broken dataset
        raise QSMPrepInputError(f"pybids could not index --derivatives {name}={root}: "
                                f"{err}") from err


def find_derivative_mask(layout, run, name="derivatives"):
    """``(path, bids_uri)`` of the brain mask of ``run`` in a derivatives
    layout, or None. Candidates: ``anat`` files with suffix ``mask`` and
    exactly the run's session/acquisition/reconstruction/run entities, and
    ``desc-brain`` or no ``desc`` (other ``desc`` values, e.g. a CSF mask, are
    not brain masks). One without ``space`` (native) is preferred to one in a
    named space, then ``desc-brain`` to no ``desc``. Two equally good
    candidates are an error."""
    found = layout.get(subject=run.subject, datatype="anat", suffix="mask",
                       extension=list(_NIFTI))
    wanted = run.entity_dict
    ranked = []
    for f in found:
        ents = f.get_entities()
        if any(_entity_str(ents.get(k)) != wanted.get(k) for k in RUN_ENTITIES):
            continue
        desc = ents.get("desc")
        if desc not in (None, "brain"):
            continue
        ranked.append((("space" in ents, desc != "brain"), f.path))
    if not ranked:
        return None
    ranked.sort()
    best = [p for rank, p in ranked if rank == ranked[0][0]]
    if len(best) > 1:
        raise QSMPrepInputError(
            f"Several brain masks for sub-{run.subject} {run.name} in --derivatives {name}: "
            f"{', '.join(Path(p).name for p in best)}; keep one, or tell them apart "
            "(desc-brain is preferred)")
    path = best[0]
    rel = Path(path).absolute().relative_to(Path(layout.root).absolute()).as_posix()
    return str(Path(path).absolute()), f"bids:{name}:{rel}"


def _entity_str(value):
    return None if value is None else str(value)


def _expected_mask_name(run):
    ents = run.entity_dict
    stem = f"sub-{run.subject}" + "".join(
        f"_{ENTITY_KEYS[k]}-{ents[k]}" for k in RUN_ENTITIES if k in ents)
    folder = f"sub-{run.subject}/" + (f"ses-{ents['session']}/" if "session" in ents else "")
    return f"{folder}anat/{stem}_desc-brain_mask.nii.gz"


def mask_grid_error(mask_path, mask_img, ref_path, ref_img, *, shared_by=1):
    """The message for a mask whose grid is not the GRE grid, or None."""
    mshape, rshape = tuple(mask_img.shape), tuple(ref_img.shape[:3])
    extra = mshape[3:]
    same_shape = mshape[:3] == rshape and int(np.prod(extra, dtype=int)) == 1
    diff = float(np.abs(mask_img.affine - ref_img.affine).max())
    if same_shape and diff <= MASK_AFFINE_ATOL_MM:
        return None
    what = (f"shape {mshape} vs {rshape}" if not same_shape else
            f"same shape {rshape} but affines differing by up to {diff:.3g} (> "
            f"{MASK_AFFINE_ATOL_MM:g} mm)")
    shared = (f" (--mask gives one mask for all {shared_by} runs: select one run with "
              "--participant-label/--session-label/--bids-filter-file, or give one mask "
              "per run with --derivatives)" if shared_by > 1 else "")
    return (
        f"The brain mask {mask_path} is not on the voxel grid of {ref_path}: {what}; mask "
        f"affine {_affine_str(mask_img.affine)}, GRE affine {_affine_str(ref_img.affine)}"
        f"{shared}. Resample the mask to the GRE grid (nearest neighbour), e.g. "
        f"antsApplyTransforms -d 3 -i {mask_path} -r {ref_path} -o mask_gre.nii.gz "
        f"-n NearestNeighbor (ANTs) or flirt -in {mask_path} -ref {ref_path} -out "
        "mask_gre.nii.gz -applyxfm -usesqform -interp nearestneighbour (FSL), and give "
        "mask_gre.nii.gz"
    )


def _affine_str(affine):
    return str(np.round(np.asarray(affine)[:3], 3).tolist())


def binarize_mask(values):
    """``(bool mask, was_binary)``: values >= 0.5 (NaN counts as 0); a mask
    holding anything but 0 and 1 (e.g. probabilistic) is not binary."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    binary = bool(np.isin(values, (0.0, 1.0)).all())
    return values >= 0.5, binary


def check_mask(path, run, *, shared_by=1):
    """Check a user-supplied mask against ``run`` before processing: same
    shape and affine (within :data:`MASK_AFFINE_ATOL_MM`) as its magnitude
    (phase when there is none), not empty; a non-binary mask gets a warning
    that it is thresholded at 0.5."""
    ref_path = (run.magnitude or run.phase)[0]
    mask_img = read_header(path)
    error = mask_grid_error(path, mask_img, ref_path, read_header(ref_path),
                            shared_by=shared_by)
    if error:
        raise QSMPrepInputError(error)
    values = np.asanyarray(mask_img.dataobj, dtype=np.float32)
    mask, binary = binarize_mask(values)
    if not binary:
        LOGGER.warning(
            "The brain mask %s is not binary (values %.3g to %.3g, e.g. probabilistic); it "
            "is thresholded at 0.5: %d voxels", path, float(np.nanmin(values)),
            float(np.nanmax(values)), int(mask.sum()))
    if not mask.any():
        raise QSMPrepInputError(
            f"The brain mask {path} is empty (no voxel >= 0.5); give a mask with the brain "
            "set to 1, or leave out --mask/--derivatives to compute one")


def _grid_fix(part):
    if part == "magnitude":
        return "; export magnitude and phase from the same reconstruction"
    return "; re-export the echoes of this run together (same matrix and orientation)"


def _fmt(values):
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
