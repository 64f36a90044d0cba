"""Writing BIDS derivatives with qsmprep's own file-name patterns."""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path
from uuid import uuid4

from ..regions.templates import templateflow_home, templateflow_templates
from ..utils.files import NO_SPACE, OutputSpaceError


def _niworkflows_sink():
    """niworkflows' ``DerivativesDataSink``, imported with TemplateFlow's
    template list read from the folders of $TEMPLATEFLOW_HOME.

    ``niworkflows.interfaces.bids`` calls ``templateflow.api.templates()`` when
    it is imported (its standard spaces), and that indexes every file of the
    TemplateFlow home with pybids: about 7 s of every qsmprep process on the
    2540 files of TemplateFlow's stub, for a list that its folder names give
    (:func:`~qsmprep.regions.templates.templateflow_templates`; tests/test_workflow.py
    checks the two
    agree). Nothing of the client is called; its ``templates`` is back in place
    once the import is done. Importing templateflow creates the home's stub
    when the home is empty, before the list is read."""
    import templateflow.api as tf_api

    tf_api.templates = lambda: templateflow_templates(templateflow_home())
    try:
        from niworkflows.interfaces.bids import DerivativesDataSink
    finally:
        del tf_api.templates
    return DerivativesDataSink


_NiworkflowsSink = _niworkflows_sink()

#: BIDS path patterns of qsmprep outputs (Chimap, fieldmap, mask, MEGRE, figures)
PATH_PATTERNS = tuple(
    json.loads((resources.files("qsmprep") / "data" / "bids_patterns.json").read_text())[
        "default_path_patterns"
    ]
)

#: hidden folder of the output directory where files are staged before renaming
STAGING = ".qsmprep-staging"


class DerivativesDataSink(_NiworkflowsSink):
    """niworkflows' sink with qsmprep's patterns, writing into ``base_directory``
    itself (no ``qsmprep/`` sub-folder) and atomically: every file is first
    written in a staging folder on the same file system, then renamed into
    place, so a file under its final name is always complete. A full disk
    raises :class:`~qsmprep.utils.files.OutputSpaceError` naming the folder."""

    out_path_base = ""
    _file_patterns = PATH_PATTERNS

    def _run_interface(self, runtime):
        final = Path(self.inputs.base_directory).absolute()
        staging = final / STAGING / uuid4().hex
        self.inputs.base_directory = str(staging)
        try:
            runtime = super()._run_interface(runtime)
            for key in ("out_file", "out_meta"):
                if key not in self._results:
                    continue
                staged = self._results[key]
                moved = [_move(p, staging, final) for p in _listify(staged)]
                self._results[key] = moved if isinstance(staged, list) else moved[0]
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise OutputSpaceError(
                err.errno, f"No space to write the outputs into {final} "
                f"({err.strerror}): free space on that disk (or raise the quota / file-size "
                "limit) and run the same command again; files written before are intact",
            ) from err
        finally:
            self.inputs.base_directory = str(final)
            shutil.rmtree(staging, ignore_errors=True)
        return runtime


def _listify(value):
    return value if isinstance(value, list) else [value]


def _move(path, staging, final):
    target = final / Path(path).relative_to(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return str(target)
