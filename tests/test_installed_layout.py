"""Installed versus source-tree behaviour: what the wheel holds, the demo's data lookup, __version__."""

from __future__ import annotations

from pathlib import Path

import pytest

import bert_demo.tasks.data


def test_installed_package_does_not_look_for_data_beside_site_packages(tmp_path, monkeypatch) -> None:
    site = tmp_path / "lib" / "site-packages"
    (site / "bert_demo").mkdir(parents=True)
    beside = tmp_path / "lib" / "shared" / "data"  # what a checkout's ../shared/data would be
    beside.mkdir(parents=True)
    monkeypatch.setattr(bert_demo.tasks.data, "__file__", str(site / "bert_demo" / "tasks" / "data.py"))
    monkeypatch.delenv("BERT_DEMO_DATA", raising=False)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # no ../shared/data from here
    with pytest.raises(FileNotFoundError, match=r"pass --data DIR or set BERT_DEMO_DATA") as info:
        bert_demo.tasks.data.find_data_dir()
    assert str(beside) not in str(info.value)

    (site / "pyproject.toml").write_text("")  # the same layout as a source checkout
    assert bert_demo.tasks.data.find_data_dir() == beside
    monkeypatch.setenv("BERT_DEMO_DATA", str(tmp_path / "work"))
    assert bert_demo.tasks.data.find_data_dir() == Path(tmp_path / "work")


def test_version_without_metadata_says_unknown(monkeypatch) -> None:
    import importlib.metadata

    import gradtools._version

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gradtools._version, "version", not_installed)
    assert gradtools._version.installed_version() == "0+unknown"
    monkeypatch.undo()
    assert gradtools._version.installed_version() == importlib.metadata.version("gradtools")


def test_the_wheel_configuration_finds_only_gradtools() -> None:
    # What `pip install gradtools` installs: the packages pyproject.toml's find rule
    # selects from this tree (tests/test_packaging.py checks the built wheel itself).
    import setuptools
    from setuptools.config.pyprojecttoml import load_file  # tomllib is Python 3.11+

    repo = Path(__file__).resolve().parent.parent
    config = load_file(repo / "pyproject.toml")
    find = config["tool"]["setuptools"]["packages"]["find"]
    found = setuptools.find_namespace_packages(where=str(repo), include=find["include"])
    assert "gradtools" in found and "gradtools.aggregation" in found
    assert all(name == "gradtools" or name.startswith("gradtools.") for name in found), found
    assert "scripts" not in config["project"] and "gui-scripts" not in config["project"]
    assert "bert_demo" not in config["tool"]["setuptools"].get("package-data", {})


def test_demo_without_its_packages_says_how_to_install_them_from_the_clone(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import runpy
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real_find_spec(name, *a))
    monkeypatch.setattr(sys, "argv", ["bert_demo", "train", "--max-steps", "1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bert_demo", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing: tqdm" in err
    assert "pip install -e '.[demo]'" in err  # an install line that works in a clone
