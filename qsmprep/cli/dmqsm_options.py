"""Command-line options of DM-QSM's sampling (``--inversion dmqsm``).

``--dmqsm-steps``, ``--dmqsm-xi`` and ``--dmqsm-seed`` set the inversion
stage's parameters (``[workflow.params.inversion]`` ``steps``, ``xi``,
``seed`` in the config file; the command line wins). Kept in their own module
so that the main parser only calls :func:`add_options` and
:func:`apply_options`.
"""

from __future__ import annotations

import argparse


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


#: option -> (parameter of the ``dmqsm`` inversion, type, help)
OPTIONS = {
    "--dmqsm-steps": ("steps", _positive_int,
                      "reverse diffusion (DDIM) steps of DM-QSM's posterior sampling; run time "
                      "grows linearly"),
    "--dmqsm-xi": ("xi", _non_negative_float,
                   "DM-QSM's data-consistency step xi on ||y - A x0||^2, chi in units of "
                   "0.1 ppm"),
    "--dmqsm-seed": ("seed", int, "seed of DM-QSM's noise: the same seed gives the same map"),
}


def add_options(parser):
    """Add the DM-QSM options to ``parser`` (their own group); the defaults
    shown are those of the ``dmqsm`` inversion's signature (read by the
    registry without importing torch)."""
    from ..qsm import registry

    defaults = registry.get("inversion", "dmqsm").defaults
    g = parser.add_argument_group("DM-QSM sampling (with --inversion dmqsm)")
    for flag, (param, kind, text) in OPTIONS.items():
        g.add_argument(flag, dest=f"dmqsm_{param}", type=kind, metavar=param.upper(),
                       help=f"{text} (default: {defaults[param]})")


def apply_options(opts, config):
    """Write the given DM-QSM options into ``config.workflow.params["inversion"]``;
    an error when they are given for another inversion method."""
    given = {flag: getattr(opts, f"dmqsm_{param}") for flag, (param, _, _) in OPTIONS.items()
             if getattr(opts, f"dmqsm_{param}", None) is not None}
    if not given:
        return
    if config.workflow.inversion != "dmqsm":
        raise SystemExit(
            f"qsmprep: error: {', '.join(given)} only apply to --inversion dmqsm, but the "
            f"inversion is {config.workflow.inversion!r}; add --inversion dmqsm or drop them")
    params = config.workflow.params.setdefault("inversion", {})
    for flag, value in given.items():
        params[OPTIONS[flag][0]] = value
