#!/usr/bin/env python3
"""Build-time TemplateFlow prefetch (run by the Dockerfile).

Initialises ``$TEMPLATEFLOW_HOME`` from the skeleton shipped with the templateflow
package (no network) and downloads every template listed in ``templates.txt`` (next to
this script, or the file given as first argument). At run time the image sets
``TEMPLATEFLOW_AUTOUPDATE=0`` and the folder is read-only: nothing is fetched then.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def read_templates(path):
    """``[(name, {key: value})]`` from a templates file (``#`` starts a comment;
    digits are integers, ``None`` means the entity must be absent)."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        filters = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or not key or not value:
                raise SystemExit(f"{path}:{number}: expected key=value, got {word!r}")
            filters[key] = (int(value) if value.isdigit()
                            else None if value == "None" else value)
        out.append((words[0], filters))
    return out


def main(templates_file=None):
    home = os.environ.get("TEMPLATEFLOW_HOME")
    if not home:
        print("prefetch_templates: set TEMPLATEFLOW_HOME", file=sys.stderr)
        return 1
    templates = read_templates(templates_file or Path(__file__).with_name("templates.txt"))
    from templateflow import api, conf  # importing conf creates the skeleton

    print(f"prefetch_templates: TemplateFlow home {conf.TF_HOME} "
          f"({len(templates)} template(s) listed)")
    for name, filters in templates:
        files = api.get(name, **filters)
        files = files if isinstance(files, list) else [files]
        if not files:
            print(f"prefetch_templates: nothing matched {name} {filters}", file=sys.stderr)
            return 1
        print(f"prefetch_templates: {name} {filters}: {len(files)} file(s)")
    if not (Path(home) / "tpl-MNI152NLin2009cAsym").is_dir():
        print(f"prefetch_templates: {home} holds no TemplateFlow skeleton", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
