"""Sphinx glue for the gradtools site: four small jobs, each a few lines.

1. ``guarantees-table``: a directive that renders
   :func:`gradtools.aggregation.guarantees.markdown_table` into the page at build
   time, so the tests and the docs read one source.
2. Optional pages (``optional_pages`` in conf.py): a page that another branch adds,
   or that documents a module not in this checkout yet, is excluded when absent,
   its toctree lines are dropped and links to it become plain text, instead of
   breaking the strict build. Once the page is there, nothing is changed.
3. Links to re-exported names: type hints name the defining private module
   (``gradtools.aggregation._base.Aggregator``); the reference documents the
   public name (``gradtools.aggregation.Aggregator``), so a missing reference is
   retried under each public module that exports the name, and a short name in a
   class's docstring under the documented base classes (``draw`` in
   ``Sum.aggregate`` is ``Aggregator.draw``). A reference to something that
   exists but is not documented (a private helper, a type variable) is shown as
   code without a link; a reference to nothing still fails the build.
4. Docstring notation that reST would misread: ``|g_i|`` (a norm) is escaped so
   that it is not a substitution, and a property docstring's leading
   ``words: ...`` is not taken for a type by napoleon.
"""

from __future__ import annotations

import importlib
import posixpath
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

PUBLIC_MODULES = ("gradtools.aggregation", "gradtools.weighting", "gradtools")


class GuaranteesTable(SphinxDirective):
    """The aggregators' guarantees table, from the module the tests assert."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        guarantees = importlib.import_module("gradtools.aggregation.guarantees")
        self.env.note_dependency(guarantees.__file__)
        container = nodes.container(classes=["guarantees-table"])
        lines = StringList(guarantees.markdown_table().splitlines(), source="gradtools.aggregation.guarantees")
        self.state.nested_parse(lines, 0, container)
        return [container]


def _absent_pages(app: Sphinx) -> set[str]:
    srcdir = Path(app.srcdir)
    return {page for page, wanted in app.config.optional_pages.items()
            if not wanted or not (srcdir / f"{page}.md").is_file()}


def _exclude_absent_pages(app: Sphinx, config: Any) -> None:
    config.exclude_patterns.extend(f"{page}.md" for page in _absent_pages(app))


def _drop_absent_pages(app: Sphinx, docname: str, source: list[str]) -> None:
    """Toctree lines naming an absent page go; a Markdown link to one becomes its text."""
    for page in _absent_pages(app):
        link = re.escape(posixpath.relpath(page, posixpath.dirname(docname) or "."))
        source[0] = "\n".join(line for line in source[0].split("\n") if line.strip() != page)
        source[0] = re.sub(rf"\[([^\]]+)\]\((?:\./)?{link}\.md(#[\w-]*)?\)", r"\1", source[0])


def _import(dotted: str) -> Any:
    """The object a dotted name denotes, or None (import the longest module prefix)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return None
            value = getattr(value, attribute)
        return value
    return None


def _public_module(name: str) -> str | None:
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if name in getattr(module, "__all__", ()):
            return module_name
    return None


def _candidates(target: str, node: Any) -> list[str]:
    name = target.rsplit(".", 1)[-1]
    found = []
    context = node.get("py:class")
    if "." not in target and context and node.get("py:module"):
        cls = _import(f"{node['py:module']}.{context}")
        for base in getattr(cls, "__mro__", ())[1:]:
            public = _public_module(base.__name__)
            if public and hasattr(base, name):
                found.append(f"{public}.{base.__name__}.{name}")
    public = _public_module(name)
    if public:
        found.append(f"{public}.{name}")
    return found


def _exists_undocumented(target: str, node: Any) -> bool:
    if target.startswith("gradtools.") and _import(target) is not None:
        return True
    context = node.get("py:class")
    if "." not in target and node.get("py:module"):
        owner = _import(f"{node['py:module']}.{context}") if context else None
        module = _import(getattr(owner, "__module__", node["py:module"]))
        return module is not None and hasattr(module, target)
    return False


def _resolve(app: Sphinx, env: Any, node: Any, contnode: nodes.Element) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not (target.startswith("gradtools.") or "." not in target):
        return None
    domain = env.get_domain("py")
    for candidate in _candidates(target, node):
        if candidate == target:
            continue
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                       candidate, node, contnode)
        if resolved is not None:
            return resolved
    if _exists_undocumented(target, node):
        return contnode  # shown as code: exists, but the reference documents public names only
    return None


_NORM = re.compile(r"(?<![\\|])\|(?=[^\s|])([^|`\n]*?[^\s|\\])\|(?![|_])")


def _escape_norms(line: str) -> str:
    """``|g_i|`` -> ``\\|g_i\\|`` outside ``literals`` and roles, so reST sees no substitution."""
    pieces = re.split(r"(``.*?``|:\w+:`[^`]*`)", line)
    return "".join(piece if index % 2 else _NORM.sub(r"\\|\1\\|", piece)
                   for index, piece in enumerate(pieces))


def _fix_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                   lines: list[str]) -> None:
    lines[:] = [_escape_norms(line) for line in lines]
    if what == "property" and lines:
        # napoleon reads "X: text" on a property's first line as type X; keep it prose.
        head, colon, rest = lines[0].partition(": ")
        if colon and (" " in head.replace("``", "") or "'" in head):
            lines[0] = f"{head} \u2014 {rest}"


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("optional_pages", {}, "env")
    app.add_directive("guarantees-table", GuaranteesTable)
    app.connect("config-inited", _exclude_absent_pages)
    app.connect("source-read", _drop_absent_pages)
    app.connect("missing-reference", _resolve)
    app.connect("autodoc-process-docstring", _fix_docstring, priority=400)  # before napoleon
    return {"parallel_read_safe": True, "parallel_write_safe": True}
