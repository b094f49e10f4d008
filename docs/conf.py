"""Sphinx configuration of the gradtools documentation site (`make docs`).

Why Sphinx (with MyST for the Markdown pages and the furo theme) rather than
mkdocs-material + mkdocstrings: the docstrings are written with reST roles
(:class:, :mod:, :meth:) and Google-style sections, which autodoc and napoleon
read as they are and resolve into links, so a broken reference is a build error
under ``-n -W`` (nitpicky, warnings are errors). The pages themselves are Markdown,
like the README they came from.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's gradtools, and bert_demo for the demo pages
sys.path.insert(0, str(DOCS / "_ext"))

import gradtools  # noqa: E402

project = "gradtools"
author = "the gradtools authors"
copyright = "the gradtools authors, MIT license"
release = version = gradtools.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "gradtools_docs",  # docs/_ext: the guarantees table, optional pages, private-module links
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Broken cross-references are warnings (nitpicky), and `make docs` turns warnings into errors.
nitpicky = True
# Names from packages whose inventories are not fetched (the build runs offline): torch,
# numpy and the standard library's typing helpers. Our own names must all resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|collections|typing|typing_extensions|abc|contextlib|os|pathlib)(\..*)?"),
    (r"py:.*", r"(Tensor|Optimizer|Module|Generator|Parameter|ProcessGroup|ndarray|NDArray|device|dtype)"),
    (r"py:.*", r"(int|float|bool|str|bytes|dict|list|tuple|set|frozenset|object|type|None|Any|Callable|Iterable|Iterator|Sequence|Mapping|Literal|NamedTuple|Enum|ABC)"),
    (r"py:exc", r"[A-Z]\w*(Error|Exception|Warning)( / [A-Z]\w*(Error|Exception|Warning))*"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields; autodoc documents the members themselves

html_theme = "furo"
html_title = f"gradtools {version}"
html_static_path: list[str] = []
html_show_sourcelink = False

# Pages that other branches add; the site builds with or without them (docs/_ext).
optional_pages = {
    "api/weighting": importlib.util.find_spec("gradtools.weighting") is not None,
    "guides/shared-batch": True,  # written on another branch
    "guides/weighting": True,  # written on another branch
}
