"""The dashboard's own JavaScript, linted on its syntax tree (esprima2, a pure-Python ES2025
parser from the ``dev`` extra): it parses, is strict, reads no global it does not declare but
the browser's, never builds markup from strings or evaluates code, never keeps anything in
localStorage (the admin token lives in sessionStorage), and has no dead top-level function.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI"):  # CI installs the dev extra: there the lint must run, never skip
    import esprima
else:
    esprima = pytest.importorskip("esprima", reason="the dev extra's esprima2 is not installed")

APP_JS = Path(__file__).parents[2] / "src/gpubroker/observe/ui/app.js"
GLOBALS = """
window document navigator location history performance console fetch EventSource
Headers Request Response AbortController URL URLSearchParams sessionStorage setTimeout
clearTimeout setInterval clearInterval requestAnimationFrame cancelAnimationFrame
queueMicrotask getComputedStyle matchMedia structuredClone Event CustomEvent Element
HTMLElement Node CSS Intl JSON Math Date Number String Boolean Array Object Set Map
WeakMap Symbol Promise Error TypeError RangeError RegExp Reflect BigInt isFinite isNaN
parseInt parseFloat encodeURIComponent decodeURIComponent encodeURI undefined NaN Infinity
globalThis arguments
"""  # what a browser page may read without declaring it
BROWSER = frozenset(GLOBALS.split())
DECLARES = {  # node type -> fields that bind names
    "VariableDeclarator": ("id",),
    "FunctionDeclaration": ("id", "params"),
    "FunctionExpression": ("id", "params"),
    "ArrowFunctionExpression": ("params",),
    "ClassDeclaration": ("id",),
    "ClassExpression": ("id",),
    "CatchClause": ("param",),
}
NAMES = {  # node type -> fields holding a name that is not a variable (unless computed)
    "MemberExpression": ("property",),
    "Property": ("key",),
    "MethodDefinition": ("key",),
    "FieldDefinition": ("key",),
    "PropertyDefinition": ("key",),
    "LabeledStatement": ("label",),
    "BreakStatement": ("label",),
    "ContinueStatement": ("label",),
    "MetaProperty": ("meta", "property"),
}


def children(node: Any) -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, esprima.nodes.Node) and key != "loc":
                yield key, child


# Members that parse a string as HTML (innerHTML is caught where it is assigned).
HTML_SINKS = frozenset(
    {"outerHTML", "insertAdjacentHTML", "setHTMLUnsafe", "createContextualFragment", "localStorage"}
)


def member_name(node: Any) -> str:
    """``x.name`` or ``x["name"]``'s name; "" for anything else (a computed, non-literal key)."""
    if getattr(node, "type", "") != "MemberExpression":
        return ""
    prop = node.property
    if not node.computed:
        return str(prop.name)
    return prop.value if prop.type == "Literal" and isinstance(prop.value, str) else ""


def lint(source: str, path: str = "app.js") -> list[str]:
    """Every complaint as ``path:line: what``; empty when the file passes."""
    try:
        tree = esprima.parseScript(source, {"loc": True, "range": True, "tolerant": False})
    except esprima.Error as e:
        return [f"{path}:{e.lineNumber}: syntax error: {e.message}"]
    problems: list[str] = []
    declared: set[str] = set()
    used: list[Any] = []  # Identifier nodes read or written as variables

    def complain(node: Any, what: str) -> None:
        problems.append(f"{path}:{node.loc.start.line}: {what}")

    def bind(pattern: Any) -> None:
        """Declare the names a binding pattern introduces; walk its default values."""
        if pattern.type == "Identifier":
            declared.add(pattern.name)
        elif pattern.type == "AssignmentPattern":
            bind(pattern.left)
            walk(pattern.right)
        elif pattern.type in ("ObjectPattern", "ArrayPattern", "RestElement", "Property"):
            for key, child in children(pattern):
                if key != "key" or pattern.computed:
                    bind(child) if key != "key" else walk(child)

    def walk(node: Any) -> None:
        kind = node.type
        if kind == "Identifier":
            used.append(node)
            if node.name in ("eval", "localStorage"):
                complain(node, f"no {node.name}")
        elif (
            kind in ("CallExpression", "NewExpression")
            and getattr(node.callee, "name", "") == "Function"
        ):
            complain(node, "no Function(): it evaluates a string")
        elif kind == "MemberExpression":
            name = member_name(node)
            if name in HTML_SINKS or (
                name in ("write", "writeln") and getattr(node.object, "name", "") == "document"
            ):
                complain(node, f"no .{name}: build nodes, set textContent")
            elif name in ("eval", "localStorage"):
                complain(node, f"no {name}")
        elif kind == "AssignmentExpression" and member_name(node.left) == "innerHTML":
            complain(node, "no innerHTML =: build nodes, set textContent")
        elif kind == "CallExpression" and node.arguments:
            callee, first = (
                member_name(node.callee) or getattr(node.callee, "name", ""),
                node.arguments[0],
            )
            literal = first.value if first.type == "Literal" else None
            if callee in ("setTimeout", "setInterval") and first.type in (
                "Literal",
                "TemplateLiteral",
            ):
                complain(node, f"no {callee}() of a string: it evaluates it")
            elif (
                callee == "setAttribute"
                and isinstance(literal, str)
                and (
                    literal.lower() in ("href", "src", "style", "srcdoc", "action", "formaction")
                    or literal.lower().startswith("on")
                )
            ):
                complain(node, f"no setAttribute({literal!r}): set a safe property instead")
        for key, child in children(node):
            if key in DECLARES.get(kind, ()):
                bind(child)
            elif key not in NAMES.get(kind, ()) or getattr(node, "computed", False):
                walk(child)

    first = tree.body[0] if tree.body else None
    if getattr(first, "directive", None) != "use strict":
        problems.append(f'{path}:1: the first statement must be "use strict"')
    walk(tree)
    seen: set[str] = set()
    for ident in used:
        if ident.name not in declared and ident.name not in BROWSER | seen:
            seen.add(ident.name)
            complain(ident, f"{ident.name} is neither declared here nor a browser global")
    for stmt in tree.body:
        name = stmt.id.name if stmt.type == "FunctionDeclaration" else None
        start, end = stmt.range
        if name and not any(i.name == name and not start <= i.range[0] < end for i in used):
            complain(stmt, f"function {name} is never used")  # (but by itself)
    return problems


def test_the_dashboards_script_passes_the_lint() -> None:
    assert APP_JS.is_file(), f"{APP_JS} is missing"
    problems = lint(APP_JS.read_text(encoding="utf-8"), str(APP_JS))
    assert problems == [], "\n".join(problems)


GOOD = '"use strict";\nconst box = document.getElementById("x");\n'


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ('"use strict";\nlet a = (;\n', "app.js:2: syntax error"),
        ("const a = 1;\nwindow.a = a;\n", 'app.js:1: the first statement must be "use strict"'),
        (GOOD + "box.textContent = stranger;\n", "app.js:3: stranger is neither declared"),
        (GOOD + "box.innerHTML = '<b>x</b>';\n", "app.js:3: no innerHTML ="),
        (GOOD + "eval('1');\n", "app.js:3: no eval"),
        (GOOD + "new Function('return 1')();\n", "app.js:3: no Function()"),
        (GOOD + "document.write('x');\n", "app.js:3: no .write"),
        (GOOD + "localStorage.setItem('t', 'x');\n", "app.js:3: no localStorage"),
        (GOOD + "window.localStorage.t = 1;\n", "app.js:3: no .localStorage"),
        (GOOD + "function lonely() { return lonely; }\n", "app.js:3: function lonely is never"),
        (GOOD + "box['innerHTML'] = '<b>x</b>';\n", "app.js:3: no innerHTML ="),
        (GOOD + "box.setHTMLUnsafe('<b>x</b>');\n", "app.js:3: no .setHTMLUnsafe"),
        (GOOD + "document.createRange().createContextualFragment('x');\n", "app.js:3: no .create"),
        (GOOD + "box.setAttribute('onclick', 'x()');\n", "app.js:3: no setAttribute('onclick')"),
        (GOOD + "box.setAttribute('HREF', 'javascript:x');\n", "app.js:3: no setAttribute('HREF')"),
        (GOOD + "window['eval']('1');\n", "app.js:3: no eval"),
        (GOOD + "setTimeout('box.focus()', 1);\n", "app.js:3: no setTimeout() of a string"),
    ],
)
def test_the_lint_catches(source: str, complaint: str) -> None:
    assert any(p.startswith(complaint) for p in lint(source)), lint(source)


def test_the_lint_accepts_modern_code_that_declares_what_it_reads() -> None:
    source = GOOD + (
        "function show({a = 1, ...rest}, [b]) { box.textContent = `${a} ${b ?? rest?.c}`; }\n"
        "const later = async () => {\n"
        "  try { await fetch('/'); } catch (err) { console.log(err); }\n};\n"
        "class View { #n = 0; bump() { this.#n += 1; return this.#n; } }\n"
        "show({}, [new View().bump()]); later(); box.style.width = `${Math.max(1, 2)}px`;\n"
    )
    assert lint(source) == []
