"""The API reference builds with warnings as errors (Sphinx, the [docs] extra), and every tutorial under
docs/tutorials is in its table of contents. (The notebooks themselves run under nbval: `make test`.)"""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", "docs", str(tmp_path / "html")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "api" / "models.html").is_file()


def test_every_tutorial_is_listed_and_has_a_smoke_switch():
    index = open(os.path.join(ROOT, "docs", "index.md"), encoding="utf-8").read()
    notebooks = sorted(glob.glob(os.path.join(ROOT, "docs", "tutorials", "*.ipynb")))
    assert len(notebooks) >= 6
    for path in notebooks:
        name = os.path.splitext(os.path.basename(path))[0]
        assert f"tutorials/{name}" in index, name
        assert "smoke_test" in open(path, encoding="utf-8").read(), name
