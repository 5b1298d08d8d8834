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


COMMAND = re.compile(r"(?:^\s*|`)python (scripts/\w+\.py)([^`\n]*)", re.M)


def test_readme_commands_name_existing_scripts_and_train_commands_parse():
    """Every `python scripts/...` command of README.md names a script that exists, and every
    `scripts/train.py MODEL ...` command (not --config/--resume, which need a stored run) parses into a
    run spec with the flags as written (their data folders are not read here)."""
    from inference.cli.command_line import parse_train_args

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = COMMAND.findall(re.sub(r"\\\n\s*", " ", text))  # continued lines joined
    assert len(commands) >= 10
    parsed = 0
    for script, rest in commands:
        assert os.path.isfile(os.path.join(ROOT, script)), script
        words = rest.split("#")[0].split()
        if (script != "scripts/train.py" or not words or words[0].startswith("-")
                or {"--config", "--resume", "--help"} & set(words)):
            continue
        args = parse_train_args(words, "")
        assert args.spec.model == words[0], words
        parsed += 1
    assert parsed >= 8
