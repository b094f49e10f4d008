"""The documentation site builds strictly, covers the public API, and renders in a browser.

The build is `make docs`'s: ``sphinx -E -n -W --keep-going`` (every page reread,
every broken cross-reference reported, any warning an error). It runs once per
module into a temporary folder; the browser test opens that build in headless
Chromium where Chromium is installed and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

# Three Sphinx builds (~5 s each on 2 idle cores) and two Chromium runs: ~25 s in all.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
STRICT = ["-E", "-b", "html", "-n", "-W", "--keep-going", "-q"]
PUBLIC_MODULES = ["gradtools", "gradtools.aggregation", "gradtools.weighting"]


def _needs_sphinx() -> None:
    for module in ("sphinx", "myst_parser", "furo"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (the docs extra: pip install -e '.[docs]')")


def sphinx_build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(source.parent)}
    return subprocess.run([sys.executable, "-m", "sphinx", *STRICT, str(source), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_sphinx()
    out = tmp_path_factory.mktemp("site")
    result = sphinx_build(DOCS, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def _documented_names(site: Path) -> set[str]:
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", posixpath_join)
    return {name for entries in inventory.values() for name in entries}


def posixpath_join(*parts: str) -> str:
    return "/".join(parts)


def test_every_public_name_has_a_reference_entry(site: Path) -> None:
    documented = _documented_names(site)
    checked = 0
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # gradtools.weighting before its branch is merged
        assert module_name in documented, f"no reference page for {module_name}"
        for name in module.__all__:
            if isinstance(getattr(module, name), type(module)):
                assert f"{module_name}.{name}" in documented  # a submodule: its own page
            else:
                assert f"{module_name}.{name}" in documented, f"{module_name}.{name} is not in the API reference"
            checked += 1
    assert checked >= 40


def test_the_guarantees_table_is_rendered_from_its_module(site: Path) -> None:
    from gradtools.aggregation import guarantees

    page = (site / "aggregators.html").read_text()
    rendered = page[page.index("guarantees-table"):]
    rendered = rendered[:rendered.index("</table>")]
    rows = [html.unescape(re.sub(r"<[^>]+>", " ", row)).split()
            for row in re.findall(r"<tr.*?</tr>", rendered, re.S)]
    # The first table of markdown_table() (aggregator x property; a second one defines them).
    first_table = guarantees.markdown_table().strip().split("\n\n")[0]
    source = [line.strip().strip("|").split("|") for line in first_table.splitlines()
              if line.strip().startswith("|") and not set(line) <= set("|-: ")]
    expected = [" ".join(cell.replace("`", "").replace("*", "").strip() for cell in line).split()
                for line in source]
    assert len(rows) == len(expected) >= 10  # the header and a row per aggregator
    assert rows == expected
def test_recipes_include_the_tested_examples(site: Path) -> None:
    for page, example in [("hf-trainer", "hf_trainer.py"), ("lightning", "lightning_manual.py"),
                          ("accelerate", "accelerate_loop.py"), ("ddp", "ddp_torchrun.py"),
                          ("amp", "amp_gradscaler.py")]:
        text = re.sub(r"<[^>]+>", "", (site / "recipes" / f"{page}.html").read_text())
        # The example's first function, as the page shows it (HTML-escaped, tags stripped).
        first_def = re.search(r"^def \w+\(", (ROOT / "examples" / example).read_text(), re.M)
        assert first_def is not None and first_def.group(0) in text, (page, example)


def test_the_demo_findings_show_the_committed_figures_and_tables(site: Path) -> None:
    page = (site / "demo" / "findings.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(images) >= 2 and all((site / "demo" / src).resolve().is_file() for src in images), images
    ablation = (ROOT / "results" / "ablation" / "ablation.md").read_text()
    made_by = next(line for line in ablation.splitlines() if line.startswith("Made by:"))
    assert "python -m bert_demo ablate --seeds 3" in made_by and "What our numbers say" in page


def _copy_of_the_docs(tmp_path: Path) -> Path:
    """docs/ copied beside links to what its pages include, so a test can change a page."""
    for name in ("README.md", "examples", "results", "gradtools", "bert_demo"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("_build"))
    return tmp_path / "docs"


def test_a_broken_cross_reference_fails_the_build(tmp_path: Path) -> None:
    _needs_sphinx()
    docs = _copy_of_the_docs(tmp_path)
    guide = docs / "guides" / "adamw.md"
    guide.write_text(guide.read_text() + "\nSee {class}`gradtools.NoSuchOptimizer`.\n")
    result = sphinx_build(docs, tmp_path / "out")
    assert result.returncode != 0
    assert "gradtools.NoSuchOptimizer" in result.stderr


def test_pages_of_other_branches_join_the_navigation_when_they_exist(tmp_path: Path) -> None:
    _needs_sphinx()
    docs = _copy_of_the_docs(tmp_path)
    for page in ("shared-batch", "weighting"):
        (docs / "guides" / f"{page}.md").write_text(f"# The {page} guide\n\nText.\n")
    result = sphinx_build(docs, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    index = (tmp_path / "out" / "index.html").read_text()
    assert 'href="guides/shared-batch.html"' in index and 'href="guides/weighting.html"' in index
    multitask = (tmp_path / "out" / "guides" / "multitask.html").read_text()
    assert 'href="shared-batch.html"' in multitask  # the guide's link is live, not plain text


# --------------------------------------------------------------------------- in a browser


class _Assets(HTMLParser):
    """Every local file a page asks for: stylesheets, scripts, images, icons."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"link": "href", "script": "src", "img": "src"}.get(tag)
        value = dict(attrs).get(wanted) if wanted else None
        if tag == "link" and dict(attrs).get("rel") not in ("stylesheet", "icon", "preload"):
            return
        if value and not re.match(r"[a-z]+:|//|#", value):
            self.found.append(value.split("#")[0].split("?")[0])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("page, text", [
    ("index.html", "gradtools is a library of fine-tuning tools"),
    ("api/aggregation.html", "Maps a batch of Gram matrices of T task gradients"),
])
def test_the_site_renders_in_headless_chromium(site: Path, tmp_path: Path, page: str, text: str) -> None:
    browser = _chromium()
    path = site / page
    dom = _headless(browser, "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert text in re.sub(r"\s+", " ", dom.stdout)  # the page's text, after its scripts ran
    assets = _Assets()
    assets.feed(dom.stdout)
    assert any(a.endswith(".css") for a in assets.found) and any(a.endswith(".js") for a in assets.found)
    missing = [a for a in assets.found if not (path.parent / a).resolve().is_file()]
    assert not missing, missing
    shot = tmp_path / "page.png"
    done = _headless(browser, f"--screenshot={shot}", "--window-size=1280,900", path.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    image = pytest.importorskip("matplotlib.image").imread(shot)
    # Not blank: the themed page has many distinct colours (text, code, sidebar).
    colours = {tuple(pixel) for pixel in image[::4, ::4, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 20, len(colours)
    if os.environ.get("GRADTOOLS_DOCS_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["GRADTOOLS_DOCS_SCREENSHOTS"]) / page.replace("/", "_").replace(".html", ".png"))


# --------------------------------------------------------------------------- paths in the prose

REPO_PATH = re.compile(r"`((?:bert_demo|gradtools|examples|scripts|benchmarks|tests|results|docs)/[\w./-]*\w)`")
DOTTED = re.compile(r"`((?:bert_demo|gradtools)(?:\.\w+)+)(?:\(\))?`")


def _importable(dotted: str) -> bool:
    """A module, or a module's attribute (``bert_demo.export.load_export``)."""
    module, _, attribute = dotted.rpartition(".")
    try:
        importlib.import_module(dotted)
        return True
    except ImportError:
        pass
    try:
        return hasattr(importlib.import_module(module), attribute)
    except ImportError:
        return False


def test_every_path_and_module_the_readme_and_docs_name_exists() -> None:
    # A file moved by a refactor leaves the prose pointing at nothing; this names the line.
    pages = [ROOT / "README.md", ROOT / "examples" / "README.md",
             *(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
    missing, seen = [], 0
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            for path in REPO_PATH.findall(line):
                seen += 1
                if not path.startswith("docs/_build/") and not (ROOT / path).exists():
                    missing.append(f"{page.relative_to(ROOT)}:{number}: {path}")
            for dotted in DOTTED.findall(line):
                seen += 1
                if dotted.startswith("gradtools.weighting") and not _importable("gradtools.weighting"):
                    continue  # written on another branch; its page is optional (docs/conf.py)
                if not _importable(dotted):
                    missing.append(f"{page.relative_to(ROOT)}:{number}: {dotted}")
    assert seen >= 40
    assert not missing, "\n".join(missing)
