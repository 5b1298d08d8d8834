"""Every Python snippet of README.md runs as written (in order, in one namespace, in a fresh folder)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    snippets = SNIPPET.findall(text)
    assert len(snippets) >= 4
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for index, code in enumerate(snippets):
        exec(compile(code, f"README.md snippet {index + 1}", "exec"), namespace)  # noqa: S102
    assert namespace["run"].spec.model == "vae" and len(namespace["history"]) == 1
