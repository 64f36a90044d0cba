"""One registry of algorithms, selected by name.

The CLI, the workflow, the benchmarks and the report all list the choices
from here. Each stage has one call signature:

``unwrapping``
    ``f(phase_rad[X,Y,Z,E], *, magnitude=None, echo_times_s, mask=None, **params)
    -> (unwrapped_rad[X,Y,Z,E], quality[X,Y,Z] or None)``
``echo_combination``
    ``f(unwrapped_rad[X,Y,Z,E], magnitude[X,Y,Z,E] or None, echo_times_s, **params)
    -> (b0_hz[X,Y,Z], noise_std_hz[X,Y,Z])`` (N_std: std of the B0 estimate, Hz)
``bf_removal``
    ``f(total_field_ppm, mask, voxel_size_mm, *, b0_dir, **params)
    -> (local_field_ppm, mask_out)``
``inversion``
    ``f(local_field_ppm, mask, voxel_size_mm, *, b0_dir, **params) -> chi_ppm``
``masking``
    ``f(magnitude[X,Y,Z], *, quality=None, **params) -> bool mask``
``referencing``
    ``f(chi_ppm, mask, **params) -> chi_ppm``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

STAGES = ("unwrapping", "echo_combination", "bf_removal", "inversion", "masking",
          "referencing")


@dataclass(frozen=True)
class Method:
    """A registered algorithm."""

    stage: str
    name: str
    func: Callable
    summary: str
    citations: tuple = ()
    defaults: dict = field(default_factory=dict)
    description: str = ""
    provides: tuple = ()


_REGISTRY: dict[str, dict[str, Method]] = {s: {} for s in STAGES}


def register(stage, name, *, summary, citations=(), defaults=None, description="",
             provides=()):
    """Decorator registering ``func`` as method ``name`` of ``stage``.

    ``description`` is a sentence for the report's methods text; it may use
    ``{param}`` placeholders filled from the parameters actually used.
    ``provides`` names optional outputs the method always gives (e.g.
    ``("quality",)`` for an unwrapper returning a quality map).
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}")

    def deco(func):
        _REGISTRY[stage][name] = Method(
            stage, name, func, summary, tuple(citations), dict(defaults or {}), description,
            tuple(provides),
        )
        return func

    return deco


def _load_all():
    # Importing the modules runs their @register decorators.
    from . import bet, bgremove, echo, inversion, mask, reference, unwrap  # noqa: F401
    from ..dl import methods as _dl_methods  # noqa: F401  (torch is a hard dependency)


def methods(stage):
    """All methods of a stage, name -> :class:`Method`."""
    _load_all()
    return dict(_REGISTRY[stage])


def names(stage):
    """Sorted method names of a stage."""
    return sorted(methods(stage))


def get(stage, name):
    """The :class:`Method` called ``name`` in ``stage``, or a clear error."""
    table = methods(stage)
    if name not in table:
        raise KeyError(
            f"Unknown {stage.replace('_', ' ')} method {name!r}; the registered methods "
            f"are: {', '.join(sorted(table))}"
        )
    return table[name]


def run(stage, name, *args, **params):
    """Call method ``name`` of ``stage`` with its defaults updated by ``params``."""
    method = get(stage, name)
    kwargs = {**method.defaults, **params}
    return method.func(*args, **kwargs)
