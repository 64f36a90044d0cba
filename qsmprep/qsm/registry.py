"""One registry of algorithms, selected by name: a static table.

The CLI, the workflow, the benchmarks and the report all list the choices
from here. The table is ``qsmprep/data/methods.toml``: per stage, method
name -> ``"module:function"`` plus its metadata (summary, citations, the
outputs it provides, its sentence of the methods text). Listing names or
metadata imports none of the implementing modules (so neither torch nor
numba: ``qsmprep --help`` stays fast, and this module, the "methods" layer,
depends on neither the physics of :mod:`qsmprep.qsm` nor :mod:`qsmprep.dl`);
:attr:`Method.func` imports the function when a method runs.

A method's default parameters are written in one place, its function's
signature; :attr:`Method.defaults` reads them from the module's source
without importing it.

Each stage has one call signature:

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
    ``f(magnitude[X,Y,Z], *, quality=None, **params) -> bool mask``; ``quality``
    (the unwrapping's quality map) only for a method that ``takes`` it
    (:func:`masks_from_quality`), so that the others need not wait for the
    unwrapping
``referencing``
    ``f(chi_ppm, mask, **params) -> chi_ppm``

Besides these, a function may take the optional inputs of
:data:`STAGE_INPUTS` (e.g. ``noise_std_ppm``, ``magnitude``); they are data the
workflow passes, not parameters, and are not among the defaults.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STAGES = ("unwrapping", "echo_combination", "bf_removal", "inversion", "masking",
          "referencing")

#: arguments of each stage's functions that are data (given by the workflow),
#: not parameters: never part of :attr:`Method.defaults`
STAGE_INPUTS = {
    "unwrapping": ("phase_rad", "magnitude", "echo_times_s", "mask"),
    "echo_combination": ("unwrapped_rad", "magnitude", "echo_times_s"),
    "bf_removal": ("total_field_ppm", "mask", "voxel_size_mm", "b0_dir", "noise_std_ppm"),
    "inversion": ("local_field_ppm", "mask", "voxel_size_mm", "b0_dir", "noise_std_ppm",
                  "magnitude", "magnitude_echoes", "echo_times_s", "csf_region", "source"),
    "masking": ("magnitude", "quality", "voxel_size_mm"),
    "referencing": ("chi_ppm", "mask", "magnitude", "voxel_size_mm", "echo_times_s", "csf",
                    "csf_region", "source"),
}

TABLE = "methods.toml"


@dataclass(frozen=True)
class Method:
    """A registered algorithm.

    ``target`` is ``"module:function"`` (the table) or the function itself
    (:func:`register`, for tests and extensions).
    """

    stage: str
    name: str
    target: Union[str, Callable]
    summary: str
    citations: tuple = ()
    description: str = ""
    provides: tuple = ()
    takes: tuple = ()
    caution: str = ""

    @property
    def module(self):
        """The implementing module's name (no import)."""
        if callable(self.target):
            return self.target.__module__
        return self.target.partition(":")[0]

    @property
    def func(self):
        """The implementing function (imports its module)."""
        return resolve(self.target)

    @property
    def defaults(self):
        """Parameter -> default: the keyword defaults of the function's
        signature, less the stage's data inputs (:data:`STAGE_INPUTS`). Read
        from the module's source when it is there, so without importing it."""
        found = source_defaults(self.target) if isinstance(self.target, str) else None
        if found is None:
            found = signature_defaults(self.func)
        return {k: v for k, v in found.items() if k not in STAGE_INPUTS[self.stage]}


def resolve(target):
    """The function named by ``"module:function"`` (a callable is returned as is)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def signature_defaults(func):
    """Parameter -> default of every argument of ``func`` that has one."""
    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if p.default is not p.empty}


@functools.lru_cache(maxsize=None)
def source_defaults(target):
    """:func:`signature_defaults` of ``"module:function"`` read from the
    module's source with :mod:`ast`, so without importing it: literal
    defaults, or names of literal module constants; ``from .x import name``
    is followed (for the function and for such constants). None where the
    source is not at hand or a default is neither (then
    :attr:`Method.defaults` imports the function)."""
    module, _, name = target.partition(":")
    found = _definition(module, name)
    if found is None or not isinstance(found[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    node, module = found
    args = node.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    out = {arg.arg: _literal(default, module) for arg, default in pairs}
    # a default that is not a literal (a call...): the caller imports instead
    return None if any(v is _NOT_LITERAL for v in out.values()) else out


_NOT_LITERAL = object()


def _literal(node, module):
    """The value of a literal expression, or of a name bound in ``module`` to
    one (``NAME = <literal>``, or imported from where it is); else
    ``_NOT_LITERAL``."""
    if isinstance(node, ast.Name):
        found = _definition(module, node.id)
        if found is None or not isinstance(found[0], ast.Assign):
            return _NOT_LITERAL
        node, module = found[0].value, found[1]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _NOT_LITERAL


def _definition(module, name):
    """``(node, module)``: the top-level ``def name`` or ``name = ...`` of the
    module that defines ``name``, following ``from ... import name`` a few
    modules deep; None where a source is not at hand."""
    for _ in range(4):
        parsed = _parse(module)
        if parsed is None:
            return None
        tree, package = parsed
        node = _find_def(tree, name)
        if not isinstance(node, ast.ImportFrom):
            return None if node is None else (node, module)
        module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        name = next(a.name for a in node.names if (a.asname or a.name) == name)
    return None


@functools.lru_cache(maxsize=None)
def _parse(module):
    """``(ast, package)`` of a module's source, or None."""
    found = _source_file(module)
    if found is None:
        return None
    path, is_package = found
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    return tree, module if is_package else module.rpartition(".")[0]


def _source_file(module):
    """``(path, is_package)`` of a module's ``.py`` source, found on disk from
    its top-level package (``find_spec`` of a submodule would import the
    packages above it), or None."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if spec.submodule_search_locations is None:  # a plain top-level module
        ok = not rest and spec.origin and spec.origin.endswith(".py")
        return (Path(spec.origin), False) if ok else None
    for base in spec.submodule_search_locations:
        path = Path(base).joinpath(*rest)
        if rest and path.with_name(path.name + ".py").is_file():
            return path.with_name(path.name + ".py"), False
        if (path / "__init__.py").is_file():
            return path / "__init__.py", True
    return None


def _find_def(tree, name):
    """The last top-level statement of a module binding ``name``: its ``def``,
    a plain ``name = ...``, or the ``from ... import name``; else None."""
    found = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found = node
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name):
            found = node
        elif isinstance(node, ast.ImportFrom) and any(
                (a.asname or a.name) == name for a in node.names):
            found = node
    return found


_KEYS = {"function", "summary", "citations", "provides", "takes", "description", "caution"}


def parse_table(text, source=TABLE):
    """Stage -> name -> :class:`Method` from the TOML ``text`` of a method
    table; an unknown stage or key, or a missing function or summary, is an
    error naming ``source``."""
    table = tomllib.loads(text)
    unknown = set(table) - set(STAGES)
    if unknown:
        raise ValueError(f"{source}: unknown stage(s) {sorted(unknown)}; expected {STAGES}")
    out = {stage: {} for stage in STAGES}
    for stage, entries in table.items():
        for name, entry in entries.items():
            bad = set(entry) - _KEYS
            if bad or "function" not in entry or "summary" not in entry:
                raise ValueError(
                    f"{source}: [{stage}.{name}] needs 'function' and 'summary' and takes "
                    f"only {sorted(_KEYS)}; got {sorted(entry)}")
            if entry["function"].count(":") != 1:
                raise ValueError(f"{source}: [{stage}.{name}] function must be "
                                 f"'module:function', got {entry['function']!r}")
            out[stage][name] = Method(
                stage, name, entry["function"], entry["summary"],
                tuple(entry.get("citations", ())), entry.get("description", ""),
                tuple(entry.get("provides", ())), tuple(entry.get("takes", ())),
                entry.get("caution", ""))
    return out


_REGISTRY: dict[str, dict[str, Method]] = parse_table(
    (resources.files("qsmprep") / "data" / TABLE).read_text(encoding="utf-8"))


def register(stage, name, *, summary, citations=(), description="", provides=(), takes=(),
             caution=""):
    """Decorator adding ``func`` as method ``name`` of ``stage`` at run time
    (tests, extensions; qsmprep's own methods are in the static table).

    ``description`` is a sentence for the report's methods text; it may use
    ``{param}`` placeholders filled from the parameters actually used.
    ``provides`` names optional outputs the method always gives (e.g.
    ``("quality",)`` for an unwrapper returning a quality map); ``takes``
    optional inputs it accepts (``("total_field",)``: an inversion that fits the
    background sources itself). ``caution`` (a sentence) is what is known to
    go wrong with the method; a run that chooses it is warned, naming the run.
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}")

    def deco(func):
        _REGISTRY[stage][name] = Method(stage, name, func, summary, tuple(citations),
                                        description, tuple(provides), tuple(takes), caution)
        return func

    return deco


def option(stage):
    """The command-line option that chooses a stage's method, e.g. ``--bf-removal``."""
    return f"--{stage.replace('_', '-')}"


def methods(stage):
    """All methods of a stage, name -> :class:`Method`."""
    return dict(_REGISTRY[stage])


def passes_total_field(bf_removal):
    """Whether the background-removal method ``bf_removal`` hands the total
    field, background included, to the inversion (``provides`` "total_field")."""
    return "total_field" in get("bf_removal", bf_removal).provides


def fits_background(inversion):
    """Whether the inversion ``inversion`` fits the background sources itself,
    so takes a total field (``takes`` "total_field")."""
    return "total_field" in get("inversion", inversion).takes


def masks_from_quality(masking):
    """Whether the masking method ``masking`` uses the unwrapping's quality map
    (``takes`` "quality"); the workflow passes it only then."""
    return "quality" in get("masking", masking).takes


def gives_local_field(inversion):
    """Whether the inversion ``inversion`` also returns the local field it
    implies (``provides`` "local_field"): ``(chi, local_field)``."""
    return "local_field" in get("inversion", inversion).provides


def background_left_in(bf_removal, inversion):
    """Whether the pair would leave the background in: ``bf_removal`` passes
    the total field on and ``inversion`` does not fit the background itself."""
    return passes_total_field(bf_removal) and not fits_background(inversion)


#: Radius (mm) of the closing of the masking stage's mask (``close_mm`` of
#: ``bet``) when the inversion fits the background sources itself: it puts back
#: the notches the extraction leaves at dark sinuses, and total field inversion
#: gives the rim it also takes in no data weight. A two-step chain keeps the
#: unclosed mask: its background removal spreads the rim's field inward (V-SHARP
#: + TV on the independent 1 mm head: 62.7 % unclosed, 78.8 % closed;
#: docs/methods.md, "Brain extraction").
FITTED_BACKGROUND_CLOSE_MM = 4.0


def masking_params(masking, inversion, params=None):
    """The masking stage's parameters for a run whose inversion is ``inversion``:
    ``params`` (the user's), and, when the user did not set it, ``close_mm`` =
    :data:`FITTED_BACKGROUND_CLOSE_MM` for a masking method that takes it and an
    inversion that fits the background (:func:`fits_background`)."""
    params = dict(params or {})
    if fits_background(inversion) and "close_mm" in get("masking", masking).defaults:
        params.setdefault("close_mm", FITTED_BACKGROUND_CLOSE_MM)
    return params


def names(stage):
    """Sorted method names of a stage."""
    return sorted(_REGISTRY[stage])


def get(stage, name):
    """The :class:`Method` called ``name`` in ``stage``, or a clear error."""
    table = _REGISTRY[stage]
    if name not in table:
        raise KeyError(
            f"Unknown {stage.replace('_', ' ')} method {name!r}; the registered methods "
            f"are: {', '.join(sorted(table))}"
        )
    return table[name]


def run(stage, name, *args, **params):
    """Call method ``name`` of ``stage``: its function, with the defaults of
    its signature updated by ``params``."""
    return get(stage, name).func(*args, **params)
