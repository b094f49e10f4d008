"""The distributions a user installs: built from a copy of this tree, installed into a fresh venv.

One build (sdist, then the wheel from it, as `python -m build` does) is shared by
the tests here. The fresh venv gets gradtools' declared core requirements (torch
and numpy) and their own requirements from this environment, through a .pth file
that points at a folder of links to those distributions alone (nothing is
downloaded or reinstalled), so any package that gradtools forgot to declare
(tqdm, say) fails to import there.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Left out of the copy the build starts from: local environments, caches and outputs.
NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
              ".pytest_cache", ".mypy_cache", ".ruff_cache", ".benchmarks", ".whl", ".devcopy", "_build")
# The helpers tests import or pytest loads besides the test modules themselves.
TEST_HELPERS = ("tests/conftest.py", "tests/demo_fixtures.py", "tests/rank_launcher.py")


def run(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the source tree on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


class Dists:
    def __init__(self, out: Path, log: str) -> None:
        self.wheel = next(out.glob("gradtools-*.whl"))
        self.sdist = next(out.glob("gradtools-*.tar.gz"))
        self.log = log


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the `build` package (dev extra)")
    base = tmp_path_factory.mktemp("dist")
    source = base / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    out = base / "out"
    # --no-isolation: build with this environment's setuptools (>= 77, as pyproject.toml
    # requires) instead of fetching one into a throwaway environment.
    result = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source],
                 cwd=base, env=clean_env())
    return Dists(out, result.stdout + result.stderr)


def test_build_configuration_emits_no_warnings(dists: Dists) -> None:
    flagged = [line for line in dists.log.splitlines()
               if re.search(r"deprecat|warning", line, re.IGNORECASE)
               # set by the environment ($PYTHONDONTWRITEBYTECODE), not by our configuration
               and "byte-compiling is disabled" not in line]
    assert not flagged, "\n".join(flagged)


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


CORE = ["torch", "numpy"]  # gradtools' core requirements, as pyproject.toml declares them


def _core_closure() -> list[metadata.Distribution]:
    """The core requirements and the distributions they require (no extras), as installed here."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(CORE)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(_requirement_name(requirement))
    return list(seen.values())


def _core_only_folder(folder: Path) -> Path:
    """A folder of links to the files of the core requirements and theirs, and nothing else."""
    folder.mkdir()
    for dist in _core_closure():
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or (folder / top).exists():
                continue  # scripts in bin/, or a folder already linked
            target = Path(str(dist.locate_file(top)))
            if target.exists():
                (folder / top).symlink_to(target)
    return folder


@pytest.fixture(scope="module")
def fresh_venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("venv")
    env_dir = base / "env"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               cwd=base, env=clean_env()).stdout.strip()
    (Path(site) / "core-only.pth").write_text(str(_core_only_folder(base / "core-only")) + "\n")
    # pip from this environment installs into the fresh one; --no-index: the wheel's
    # requirements must be met by what is there (torch, numpy), or the install fails.
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
         "--disable-pip-version-check", dists.wheel], cwd=base, env=clean_env())
    return env_dir


PROBE = """
import importlib.metadata as md, importlib.util, json, torch, gradtools
meta = md.metadata("gradtools")
p = torch.nn.Parameter(torch.ones(3))
opt = gradtools.PCGrad(gradtools.AdamW([p], lr=0.1))
opt.backward([(p * torch.tensor([1.0, 2.0, 3.0])).sum(), (p * torch.tensor([-1.0, 1.0, 0.0])).sum()])
opt.step()
print(json.dumps({
    "file": gradtools.__file__,
    "version": gradtools.__version__,
    "dist_version": md.version("gradtools"),
    "license": meta["License-Expression"],
    "license_files": meta.get_all("License-File"),
    "requires": md.requires("gradtools"),
    "tqdm": importlib.util.find_spec("tqdm") is not None,
    "moved": bool((p != 1).all()),
}))
"""


def test_wheel_installs_and_imports_with_only_its_core_requirements(fresh_venv: Path, tmp_path: Path) -> None:
    python = fresh_venv / "bin" / "python"
    found = json.loads(run([python, "-c", PROBE], cwd=tmp_path, env=clean_env()).stdout)
    assert Path(found["file"]).is_relative_to(fresh_venv), found["file"]  # not the source tree
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    assert found["version"] == found["dist_version"] == declared.group(1)
    assert found["license"] == "MIT"
    assert found["license_files"] == ["LICENSE"]
    core = [r for r in found["requires"] if "extra ==" not in r]
    assert [_requirement_name(r) for r in core] == CORE, core
    assert not found["tqdm"], "the fresh venv should see only the core requirements"
    assert found["moved"]


def test_wheel_holds_the_library_alone(dists: Dists, fresh_venv: Path) -> None:
    # Only gradtools and its metadata: no bert_demo package, no command, no other top level.
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = wheel.namelist()
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points[0]).decode() if entry_points else ""
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"gradtools"}, tops
    assert "gradtools/py.typed" in names
    assert "gradtools/aggregation/__init__.py" in names  # subpackages are found too
    assert "console_scripts" not in scripts, scripts
    assert not list((fresh_venv / "bin").glob("bert*"))
    python = fresh_venv / "bin" / "python"
    probe = "import importlib.util; print(importlib.util.find_spec('bert_demo'))"
    assert run([python, "-c", probe], cwd=fresh_venv, env=clean_env()).stdout.strip() == "None"


def test_sdist_carries_what_the_tests_need(dists: Dists, tmp_path: Path) -> None:
    with tarfile.open(dists.sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    shipped = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    ours = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("*.py")}
    assert set(TEST_HELPERS) <= ours
    assert ours <= shipped, sorted(ours - shipped)
    examples = {p.relative_to(REPO).as_posix() for p in (REPO / "examples").glob("*.py")}
    assert examples <= shipped, sorted(examples - shipped)
    # bert_demo is not in the wheel, but the tests import it, so the sdist carries it.
    demo = {p.relative_to(REPO).as_posix() for p in (REPO / "bert_demo").rglob("*.py")}
    assert demo and demo <= shipped, sorted(demo - shipped)
    assert "LICENSE" in shipped
    assert not [p for p in shipped if "__pycache__" in p or p.endswith(".pyc")]
    # Every test module collects from the unpacked sdist (with this environment's packages).
    env = clean_env() | {"PYTHONPATH": str(root)}
    result = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                  "tests"], cwd=root, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ tests? collected", result.stdout), result.stdout[-2000:]


def test_twine_and_check_wheel_contents_accept_the_dists(dists: Dists, tmp_path: Path) -> None:
    if importlib.util.find_spec("twine") is None or importlib.util.find_spec("check_wheel_contents") is None:
        pytest.skip("needs twine and check-wheel-contents (dev extra)")
    run([sys.executable, "-m", "twine", "check", "--strict", dists.wheel, dists.sdist], cwd=tmp_path)
    # No ignores: one top-level package (W009 would flag a second one, as bert_demo was).
    run([sys.executable, "-m", "check_wheel_contents", dists.wheel], cwd=tmp_path)
