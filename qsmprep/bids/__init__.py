"""The BIDS input of qsmprep: finding, reading and checking the GRE runs.

Everything here runs before any processing starts, so that a problem with
the input stops qsmprep at once with a message naming the file and the fix
(:class:`QSMPrepInputError`) instead of a crash deep in the Nipype graph.
Only NIfTI headers and JSON sidecars are read here; the voxel data are read
by :func:`qsmprep.utils.images.load_echoes` inside the workflow.

- :mod:`.discover`: pybids queries (:func:`~.discover.collect_data`), ``.bidsignore``,
  the output/work folder checks and the method-vs-run checks;
- :mod:`.runs`: :class:`~.runs.QSMRun` and how the files of one run are grouped
  and ordered by echo time;
- :mod:`.metadata`: sidecars (echo times, field strength, phase units, ``B0_dir``)
  and NIfTI headers (complete files, one grid per run, orientation, slab extent);
- :mod:`.masks`: user-supplied brain masks (``--mask``, ``--derivatives``).
"""


class QSMPrepInputError(ValueError):
    """The input dataset cannot be processed; the message says what to fix."""
