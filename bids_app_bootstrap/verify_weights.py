#!/usr/bin/env python3
"""Build-time check of the shipped network weights (run by the Dockerfile).

Every file of ``qsmprep/data/models/manifest.json`` is checked against its sha256
and size, and every ``.pt`` file is loaded with :func:`qsmprep.dl.weights.load_weights`
(which checks the hash again and the tensor layout). Exit code 1 and one line per bad
file otherwise, so a corrupted or LFS-pointer checkout never becomes an image.
"""

from __future__ import annotations

import sys


def main(models_dir=None):
    from qsmprep.dl.weights import (MODELS_DIR, WeightsError, load_weights, read_manifest,
                                    verify)

    models_dir = models_dir or MODELS_DIR
    manifest = read_manifest(models_dir)
    if not manifest:
        print(f"verify_weights: no manifest.json in {models_dir}", file=sys.stderr)
        return 1
    bad = []
    for name, entry in sorted(manifest.items()):
        try:
            path = verify(name, models_dir)
            if path.stat().st_size != entry["bytes"]:
                raise WeightsError(f"{path}: {path.stat().st_size} bytes, manifest says "
                                   f"{entry['bytes']}")
            if name.endswith(".pt"):
                load_weights(name[:-3], models_dir)
        except Exception as err:  # noqa: BLE001 - report every bad file, then fail
            bad.append(f"{name}: {err}")
            continue
        print(f"verify_weights: {name} ok (sha256 {entry['sha256'][:12]}..., "
              f"{entry['bytes']} bytes)")
    for line in bad:
        print(f"verify_weights: FAILED {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
