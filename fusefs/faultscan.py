"""Discovering fault sites in the source, and the rules every site follows.

The kernel's ``dynamic_fault`` learns every site before it runs because the
compiler drops a descriptor per call into an ELF section.  Python has no link
step, so the registry (`fusefs.faults`) reads the source instead: on first use
it calls `scan`, which parses every ``.py`` file of the package (and of
``tools/`` next to it) with `ast` and records each call to `dynamic_fault`,
`race_fault`, `memory_fault`, `alloc_page`, `alloc_pages` or `alloc_buffer` of `fusefs.faults`
with its file, line, module, enclosing function, name and class.  So the listing
of a freshly started filesystem shows every site, hit count 0, including those
in modules that were never imported.  The scan costs tens of milliseconds once
and imports nothing.

A call is a site when it reaches one of those functions through an import of
`fusefs.faults` -- ``from fusefs.faults import dynamic_fault as df``, ``import
fusefs.faults as ff``, relative imports included; another object's method of
the same name (``cache.alloc_page(...)``) is not one.  The modules of the fault
machinery itself (`fusefs.faults`, this one and `fusefs.faultlang`) define and
name the call-site functions but place no site, and are not scanned.

Its rules are enforced where they can be checked, at scan time: a site's name
must be a string literal (otherwise it could not be known before it runs), free
of blanks, ``;`` and ``#``, and must be used by exactly one call; its class, if
given, must be a literal too.  Breaking any rule raises `FaultSiteError` naming
every offending line.  A call whose name the scan did not see -- code outside
the scanned roots, such as a test module -- is registered by the registry on its
first hit, under the same name and class rules (`check_name`, `check_class`).

Classes are ``io`` (backing device errors), ``memory`` (allocation failures,
raising `OutOfMemory`), ``race`` (`race_fault`: yield or sleep in a race window)
and ``error`` (rare error paths), each with optional sub-classes after a colon
(``io:write``).  `dynamic_fault` takes its class from ``cls=`` (default
``error``) and may be ``io``, ``memory`` or ``error``; `race_fault` is
``race``; `memory_fault` is ``memory``, `alloc_page` and `alloc_pages` ``memory:page`` and
`alloc_buffer` ``memory:buffer``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "CLASSES",
    "CLASS_RE",
    "SITE_MODULE",
    "FaultSiteError",
    "SiteInfo",
    "check_class",
    "check_name",
    "class_root",
    "default_roots",
    "scan",
]

CLASSES: Final = ("io", "memory", "race", "error")
"""The root fault classes; a site's class is one of these or ``root:sub...``."""

SITE_MODULE: Final = f"{__name__.rpartition('.')[0]}.faults"
"""The module that defines the call-site functions (``fusefs.faults``)."""

# The call-site functions the scanner looks for, with the class each defaults to
# and the root classes it accepts.
_DEFAULT_CLASS: Final[Mapping[str, str]] = {
    "dynamic_fault": "error",
    "race_fault": "race",
    "memory_fault": "memory",
    "alloc_page": "memory:page",
    "alloc_pages": "memory:page",
    "alloc_buffer": "memory:buffer",
}
_ALLOWED_ROOTS: Final[Mapping[str, frozenset[str]]] = {
    "dynamic_fault": frozenset({"io", "memory", "error"}),
    "race_fault": frozenset({"race"}),
    "memory_fault": frozenset({"memory"}),
    "alloc_page": frozenset({"memory"}),
    "alloc_pages": frozenset({"memory"}),
    "alloc_buffer": frozenset({"memory"}),
    "register_site": frozenset(CLASSES),
}
_FUNCTION_NAMES: Final = tuple(fn.encode() for fn in _DEFAULT_CLASS)
# Position of a positional ``cls`` argument (alloc_* take it by keyword only).
_CLS_POSITION: Final[Mapping[str, int]] = {"dynamic_fault": 1, "race_fault": 1, "memory_fault": 1}
# The fault machinery's own modules: they define the call-site functions and
# name them in code and messages, but place no site.
_MACHINERY_FILES: Final = frozenset(
    Path(__file__).resolve().with_name(f"{module}.py")
    for module in ("faults", "faultscan", "faultlang")
)

_NAME_RE: Final = re.compile(r"[^\s;#]+")
CLASS_RE: Final = re.compile(r"[A-Za-z0-9_]+(?::[A-Za-z0-9_]+)*")
"""The syntax of a class: words joined by colons (``io:write``)."""


class FaultSiteError(RuntimeError):
    """A programming error in the fault sites themselves: a duplicate name, a name
    that is not a string literal, an unknown class.  Raised by the scan (so the
    test suite catches it) and by `FaultRegistry.register_site`."""


@dataclass(frozen=True, slots=True)
class SiteInfo:
    """Where a site is and what it is called: what the scan finds, and what the
    registry records for a site registered at run time."""

    name: str
    cls: str
    file: str
    line: int
    module: str
    func: str

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"


def class_root(cls: str) -> str:
    return cls.partition(":")[0]


def check_class(cls: str, kind: str) -> str | None:
    """Why ``cls`` is not a valid class for a ``kind`` call site, or None."""
    if not CLASS_RE.fullmatch(cls):
        return f"malformed fault class {cls!r}"
    root = class_root(cls)
    if root not in CLASSES:
        return f"unknown fault class {cls!r} (classes: {', '.join(CLASSES)})"
    if root not in _ALLOWED_ROOTS[kind]:
        allowed = ", ".join(sorted(_ALLOWED_ROOTS[kind]))
        return f"{kind}() cannot have class {cls!r} (allowed: {allowed})"
    return None


def check_name(name: str) -> str | None:
    """Why ``name`` is not a valid site name, or None."""
    if not _NAME_RE.fullmatch(name):
        return f"fault site name {name!r} must be non-empty without blanks, ';' or '#'"
    return None


# discovery:


def default_roots() -> list[Path]:
    """The fusefs package, and ``tools/`` beside it if that is a package."""
    package = Path(__file__).resolve().parent
    roots = [package]
    tools = package.parent / "tools"
    if (tools / "__init__.py").is_file():
        roots.append(tools)
    return roots


def _module_name(rel: str) -> str:
    module = rel.removesuffix(".py").replace("/", ".")
    return module.removesuffix(".__init__")


_SCOPES: Final = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _collect(
    node: ast.AST,
    scope: str,
    calls: list[tuple[ast.Call, str]],
    imports: list[ast.Import | ast.ImportFrom],
) -> None:
    """One pass over the tree: the calls that may be sites, each with the
    qualified name of its enclosing function, and every import statement."""
    # ast.iter_child_nodes, inlined: this walk is most of the scan's time.
    for field in node._fields:
        value = getattr(node, field, None)
        children = value if isinstance(value, list) else (value,)
        for child in children:
            if not isinstance(child, ast.AST):
                continue
            if isinstance(child, _SCOPES):
                inner = f"{scope}.{child.name}" if scope else child.name
                _collect(child, inner, calls, imports)
                continue
            if isinstance(child, ast.Call):
                # ``f(...)`` may be an alias (``import ... as df``); ``x.f(...)``
                # can only be a site under the function's own name.
                func = child.func
                if isinstance(func, ast.Name) or getattr(func, "attr", None) in _DEFAULT_CLASS:
                    calls.append((child, scope))
            elif isinstance(child, ast.Import | ast.ImportFrom):
                imports.append(child)
                continue
            _collect(child, scope, calls, imports)


def _import_aliases(
    imports: Iterable[ast.Import | ast.ImportFrom], module: str, is_package: bool
) -> dict[str, str]:
    """Map each name bound by an import anywhere in the file to the dotted name it
    stands for.  Function-level imports are included: shadowing is rare enough
    that a file-wide table is the right trade for simplicity."""
    package = module if is_package else module.rpartition(".")[0]
    aliases: dict[str, str] = {}
    for node in imports:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    head = alias.name.partition(".")[0]
                    aliases[head] = head
            continue
        if node.level:
            parts = package.split(".") if package else []
            up = node.level - 1
            if up > len(parts):
                continue
            base = ".".join(parts[: len(parts) - up])
            if node.module:
                base = f"{base}.{node.module}" if base else node.module
        else:
            base = node.module or ""
        for alias in node.names:
            if alias.name != "*":
                aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif base == SITE_MODULE:
                aliases.update({fn: f"{SITE_MODULE}.{fn}" for fn in _DEFAULT_CLASS})
    return aliases


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return None if head is None else f"{head}.{expr.attr}"
    return None


def _fault_function(func: ast.expr, aliases: Mapping[str, str]) -> str | None:
    """Which call-site function of `SITE_MODULE` ``func`` refers to, if any."""
    dotted = _dotted(func)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    target = aliases.get(head)
    if target is None:
        return None
    owner, _, fn = (f"{target}.{rest}" if rest else target).rpartition(".")
    return fn if owner == SITE_MODULE and fn in _DEFAULT_CLASS else None


def _argument(node: ast.Call, position: int | None, keyword: str) -> ast.expr | None:
    if position is not None and len(node.args) > position:
        return node.args[position]
    for kw in node.keywords:
        if kw.arg == keyword:
            return kw.value
    return None


def _scan_tree(
    tree: ast.Module, file: str, module: str, is_package: bool
) -> tuple[list[SiteInfo], list[str]]:
    """The sites in one parsed file, and the problems found with them."""
    calls: list[tuple[ast.Call, str]] = []
    imports: list[ast.Import | ast.ImportFrom] = []
    _collect(tree, "", calls, imports)
    aliases = _import_aliases(imports, module, is_package)
    sites: list[SiteInfo] = []
    errors: list[str] = []
    for node, scope in calls:
        kind = _fault_function(node.func, aliases)
        if kind is None:
            continue
        where = f"{file}:{node.lineno}"
        name_expr = _argument(node, 0, "name")
        if not (isinstance(name_expr, ast.Constant) and isinstance(name_expr.value, str)):
            errors.append(
                f"{where}: {kind}() needs a string literal name, so that the site "
                "is known before it runs"
            )
            continue
        cls_expr = _argument(node, _CLS_POSITION.get(kind), "cls")
        if cls_expr is None:
            cls = _DEFAULT_CLASS[kind]
        elif isinstance(cls_expr, ast.Constant) and isinstance(cls_expr.value, str):
            cls = cls_expr.value
        else:
            errors.append(f"{where}: {kind}() needs a string literal cls")
            continue
        problem = check_name(name_expr.value) or check_class(cls, kind)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        sites.append(
            SiteInfo(
                name=name_expr.value,
                cls=cls,
                file=file,
                line=node.lineno,
                module=module,
                func=scope or "<module>",
            )
        )
    return sites, errors


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if not any(part.startswith(".") or part == "__pycache__" for part in rel):
            yield path


def scan(roots: Iterable[Path]) -> list[SiteInfo]:
    """Every fault site under ``roots``; raises `FaultSiteError` listing every
    malformed or duplicate site found."""
    found: dict[str, SiteInfo] = {}
    errors: list[str] = []
    for root in roots:
        base = root.parent
        for path in _python_files(root):
            rel = path.relative_to(base).as_posix()
            if path in _MACHINERY_FILES:
                continue
            source = path.read_bytes()
            # A site names its function in the text, even when called through an
            # alias: most files can be skipped without parsing them.
            if not any(fn in source for fn in _FUNCTION_NAMES):
                continue
            try:
                tree = ast.parse(source, filename=str(path))
            except SyntaxError as exc:
                errors.append(f"{rel}:{exc.lineno}: cannot scan for fault sites: {exc.msg}")
                continue
            module = _module_name(rel)
            sites, problems = _scan_tree(tree, rel, module, path.stem == "__init__")
            errors.extend(problems)
            for info in sites:
                other = found.get(info.name)
                if other is not None:
                    errors.append(
                        f"fault site name {info.name!r} is used twice: "
                        f"{other.file}:{other.line} and {info.file}:{info.line} "
                        "(one name = one call site)"
                    )
                else:
                    found[info.name] = info
    if errors:
        raise FaultSiteError("\n".join(errors))
    return list(found.values())
