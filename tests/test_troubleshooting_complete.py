"""docs/troubleshooting.md documents every message qsmprep can stop or warn with.

The messages are collected from the source with :mod:`ast`, so a new
``raise`` is checked the day it is written:

* errors: every ``raise SomeError(<text>)`` in ``qsmprep/`` (any exception
  class: the project's ``QSMPrepInputError``, ``OutputSpaceError``,
  ``WeightsError``, ``SystemExit``, argparse's ``ArgumentTypeError``, and the
  ``ValueError``\\s of the methods, which reach the user as the reason of a
  crash or through a settings file); ``<parser>.error(<text>)``; and every
  ``"qsmprep: error: ..."`` line printed or written;
* warnings: every ``<logger>.warning(<text>)``.

Only raises that carry no text are left out: bare re-raises, ``raise err``,
``raise SystemExit(main())``, and a module ``__getattr__``'s
``AttributeError`` (Python's import protocol).

The text of a message is its literal parts (an f-string's, a ``%``- or
``.format``-template's, a concatenation's, and the strings a local variable
or a helper function of the same module builds it from); the placeholders
split it into fragments. A message is documented when a backticked span of
troubleshooting.md quotes a *distinctive* piece of one of its fragments: at
least :data:`MIN_QUOTE` characters long (or the whole fragment when shorter,
and at least :data:`MIN_FRAGMENT`), and found in no other message, so that a
phrase shared by several messages (a common fix) documents none of them.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qsmprep"
DOC = ROOT / "docs" / "troubleshooting.md"

#: a quote this long from a fragment documents the message
MIN_QUOTE = 20
#: shorter literal pieces (", ", " and ") are not fragments
MIN_FRAGMENT = 8
#: placeholder for the parts of a message computed at run time
HOLE = "\x00"
LOGGERS = {"LOGGER", "logger", "log", "LOG", "logging"}
ERROR_PREFIX = "qsmprep: error:"


@dataclass
class Message:
    kind: str  # "error" or "warning"
    where: list = field(default_factory=list)  # "path:line" of each occurrence
    text: str = ""  # literal parts, HOLE for the rest

    @property
    def shown(self):
        return " ".join(self.text.replace(HOLE, "{…}").split())

    @property
    def fragments(self):
        pieces = (" ".join(p.split()).strip(" .;:,'\"()") for p in self.text.split(HOLE))
        return [p for p in pieces if len(p) >= MIN_FRAGMENT]


class _Module:
    """One source file: its top-level functions, to resolve message helpers."""

    def __init__(self, path):
        self.path = path
        self.tree = ast.parse(path.read_text(), str(path))
        self.functions = {n.name: n for n in self.tree.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def text(self, node, scope, depth=0):
        """The literal text of a string expression, HOLE for unknown parts."""
        if depth > 4:
            return HOLE
        if isinstance(node, ast.Constant):
            return node.value if isinstance(node.value, str) else HOLE
        if isinstance(node, ast.JoinedStr):  # a local variable's text is resolved
            return "".join(v.value if isinstance(v, ast.Constant) else
                           self.text(v.value, scope, depth + 1) for v in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.text(node.left, scope, depth + 1) + self.text(node.right, scope,
                                                                      depth + 1)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            return _percent_holes(self.text(node.left, scope, depth + 1))
        if isinstance(node, ast.IfExp):
            return (self.text(node.body, scope, depth + 1) + HOLE
                    + self.text(node.orelse, scope, depth + 1))
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "format":
                return re.sub(r"\{[^{}]*\}", HOLE, self.text(func.value, scope, depth + 1))
            if isinstance(func, ast.Name) and func.id in self.functions:
                helper = self.functions[func.id]
                return HOLE.join(self.text(n.value, helper, depth + 1)
                                 for n in ast.walk(helper)
                                 if isinstance(n, ast.Return) and n.value is not None)
            return HOLE
        if isinstance(node, ast.Name) and scope is not None:
            values = []
            for n in ast.walk(scope):
                if isinstance(n, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == node.id for t in n.targets):
                    values.append(n.value)
                elif (isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)
                      and n.target.id == node.id):
                    values.append(n.value)
            return HOLE.join(self.text(v, scope, depth + 1) for v in values) or HOLE
        return HOLE


def _percent_holes(text):
    """``%s``/``%d``/``%.3g`` placeholders (logging, ``%``-formatting) as holes."""
    return re.sub(r"%[-+ #0-9.]*[sdifgrxe]", HOLE, text)


def _enclosing_functions(tree):
    """node -> the innermost function it is in (None at module level)."""
    owner = {}

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else function
            owner[child] = function
            visit(child, inner)

    visit(tree, None)
    return owner


def _name(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def project_errors(package=PACKAGE):
    """Names of the exception classes qsmprep defines (QSMPrepInputError, ...)."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    _name(b).endswith(("Error", "Exception")) for b in node.bases):
                names.add(node.name)
    return names


#: "path:line" of raises of qsmprep's own errors whose text cannot be read statically
UNRESOLVED = []


def collect_messages(package=PACKAGE):
    """``{(kind, text): Message}`` of every user-facing error and warning.

    Raises of qsmprep's own exception classes whose text has no literal
    fragment (built in another module, say) are listed in :data:`UNRESOLVED`.
    """
    found = {}
    own = project_errors(package)
    UNRESOLVED.clear()

    def add(kind, text, path, node):
        if kind == "error" and text.startswith(ERROR_PREFIX):
            text = text[len(ERROR_PREFIX):].lstrip()
        if not text.replace(HOLE, "").strip():
            return
        msg = found.setdefault((kind, text), Message(kind, text=text))
        msg.where.append(f"{path.relative_to(ROOT)}:{node.lineno}")

    for path in sorted(package.rglob("*.py")):
        module = _Module(path)
        owner = _enclosing_functions(module.tree)
        parent = {c: n for n in ast.walk(module.tree) for c in ast.iter_child_nodes(n)}

        def parents(node):
            while node in parent:
                node = parent[node]
                yield node
        for node in ast.walk(module.tree):
            scope = owner.get(node)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                if (_name(node.exc.func) == "AttributeError" and scope is not None
                        and scope.name == "__getattr__"):
                    continue  # the import protocol, not a message
                texts = [module.text(a, scope) for a in node.exc.args]
                texts = [t for t in texts if t.replace(HOLE, "").strip()]
                if texts:
                    add("error", max(texts, key=len), path, node)
                if _name(node.exc.func) in own and not any(
                        Message("error", text=t).fragments for t in texts):
                    UNRESOLVED.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                first = module.text(node.args[0], scope)
                if isinstance(func, ast.Attribute) and func.attr == "error" \
                        and _name(func.value) not in LOGGERS:
                    add("error", first, path, node)  # argparse: parser.error(...)
                elif isinstance(func, ast.Attribute) and func.attr == "warning" \
                        and _name(func.value) in LOGGERS:
                    add("warning", _percent_holes(first), path, node)
            elif isinstance(node, (ast.JoinedStr, ast.Constant)) and not any(
                    isinstance(p, (ast.JoinedStr, ast.Raise)) for p in parents(node)):
                text = module.text(node, scope)  # "qsmprep: error: ..." lines written
                if text.startswith(ERROR_PREFIX):
                    add("error", text, path, node)
    return found


@functools.lru_cache(maxsize=1)
def _messages():
    """:func:`collect_messages` once per test session (it parses every module)."""
    return collect_messages()


def doc_quotes(doc=None):
    """The backticked spans of the page, whitespace collapsed."""
    doc = Path(doc or DOC)
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # code blocks
    spans = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if all(line.lstrip().startswith("|") for line in lines if line.strip()):
            units = lines  # a table: each row on its own
        else:
            units = [" ".join(lines)]  # a paragraph: a span may wrap onto the next line
        for unit in units:
            spans += re.findall(r"`([^`]+)`", unit)
    return [" ".join(q.split()) for q in spans]


def documented(message, quotes, others):
    """Whether a quote holds a distinctive piece of one of the message's fragments."""
    for fragment in message.fragments:
        need = min(len(fragment), MIN_QUOTE)
        pieces = {fragment[i:i + need] for i in range(len(fragment) - need + 1)}
        for quote in quotes:
            if not any(piece in quote for piece in pieces):
                continue  # no common run of `need` characters: skip the slow match
            match = SequenceMatcher(None, fragment, quote, autojunk=False) \
                .find_longest_match(0, len(fragment), 0, len(quote))
            if match.size < need:
                continue
            piece = fragment[match.a:match.a + match.size]
            if not any(piece in other for other in others):
                return True
    return False


def undocumented(kind):
    messages = _messages()
    quotes = doc_quotes()
    texts = {key: " ".join(m.text.split()) for key, m in messages.items()}
    missing = []
    for key, message in messages.items():
        if message.kind != kind:
            continue
        others = [t for k, t in texts.items() if t != texts[key]]
        if not documented(message, quotes, others):
            missing.append(message)
    return messages, missing


def _report(missing, kind):
    lines = [f"docs/troubleshooting.md does not document {len(missing)} {kind} message(s). "
             "Add a row for each, quoting in backticks a distinctive part of the message "
             f"(at least {MIN_QUOTE} characters of one literal fragment, or the whole "
             "fragment if shorter, found in no other message):"]
    for m in missing:
        lines.append(f"  {', '.join(m.where)}\n      {m.shown}")
    return "\n".join(lines)


def test_collector_finds_the_known_kinds_of_message():
    """The collector sees each way a message is raised or logged in qsmprep."""
    messages = _messages()
    shown = [m.shown for m in messages.values()]

    def has(kind, piece):
        return any(piece in m.shown for m in messages.values() if m.kind == kind)

    assert has("error", "Each echo needs its")  # QSMPrepInputError
    assert has("error", "is empty (0 bytes)")  # a local variable's IfExp
    assert has("error", "is not on the voxel grid of")  # a helper function's return
    assert has("error", "is not a BIDS label")  # argparse.ArgumentTypeError
    assert has("error", "--derivatives names must differ")  # SystemExit, prefix dropped
    assert has("error", "report(s) could not be built")  # print("qsmprep: error: ...")
    assert has("error", "No space to write")  # OutputSpaceError(errno, text)
    assert has("error", "The mask has no voxel farther than")  # a method's ValueError
    assert has("warning", "is a thin slab")  # LOGGER.warning with %-placeholders
    assert not any(s.startswith("qsmprep: error:") for s in shown)
    assert not has("error", "has no attribute")  # module __getattr__ is left out
    assert len(messages) > 80


def test_every_own_error_has_a_text_the_test_can_read():
    """A QSMPrepInputError (or another error class of qsmprep) whose text is built
    where this test cannot see it would escape the check below."""
    _messages()
    assert project_errors() >= {"QSMPrepInputError", "OutputSpaceError", "WeightsError"}
    assert not UNRESOLVED, (
        "these raises of qsmprep's own errors have no literal text this test can read "
        "(write the message as a string or f-string in the raise, or in a variable or a "
        f"helper function of the same module): {', '.join(UNRESOLVED)}")


def test_every_error_message_is_in_troubleshooting():
    messages, missing = undocumented("error")
    assert not missing, _report(missing, "error")


def test_every_warning_is_in_troubleshooting():
    messages, missing = undocumented("warning")
    assert not missing, _report(missing, "warning")


def test_a_shared_phrase_documents_no_message(tmp_path):
    """A quote of a phrase two messages share does not count for either."""
    doc = tmp_path / "t.md"
    doc.write_text("| `re-export it from the scanner/converter or copy it again` | ... |\n")
    messages = _messages()
    texts = [" ".join(m.text.split()) for m in messages.values()]
    empty = next(m for m in messages.values() if "is empty (0 bytes)" in m.text)
    others = [t for t in texts if t != " ".join(empty.text.split())]
    assert not documented(empty, doc_quotes(doc), others + ["x re-export it from the "
                                                            "scanner/converter or copy"])
    doc.write_text("| `<file> is empty (0 bytes)` | ... |\n")
    assert documented(empty, doc_quotes(doc), others)
