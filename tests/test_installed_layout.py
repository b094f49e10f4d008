"""Installed versus source-tree behaviour: the demo's data lookup and gradtools.__version__."""

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
