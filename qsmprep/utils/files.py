"""Writing files so that a reader never sees a partial one.

Every file qsmprep writes (images, sidecars, settings, the dataset
description) goes through :func:`atomic_write`: written under a unique
hidden temporary name in the same folder, then renamed over the final name
(``os.replace`` is atomic on POSIX). So a killed run, a full disk or two
jobs writing the same file at once leave either the previous complete file
or the new complete file, never a mix, and no temporary file behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from uuid import uuid4

#: errno values meaning "no room to write": disk full, quota, file-size limit
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutputSpaceError(OSError):
    """Writing an output failed for lack of space; the message says what to free."""


def atomic_write(path, write):
    """Call ``write(tmp)`` to write a temporary file, then rename it to ``path``.

    The temporary name keeps the file's extension (nibabel picks the format
    from it) and is unique per call, so concurrent writers never share one.
    On any failure the temporary file is removed and ``path`` is left as it
    was; a full disk raises :class:`OutputSpaceError` naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid4().hex[:8]}.{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise OutputSpaceError(
                err.errno,
                f"No space to write the file {path} ({os.strerror(err.errno)}): free space on that "
                "disk (or raise the quota / file-size limit) and run the same command "
                "again; files written before are intact",
            ) from err
        raise
    return path


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
