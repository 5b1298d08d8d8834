"""Sphinx configuration: the API reference (autodoc), the design pages (Markdown, through MyST) and the
tutorials (notebooks, shown as committed, not executed here: ``make test`` executes them at tiny sizes,
``SMOKE_TEST=1 pytest --nbval-lax docs/tutorials``).
Build: ``python -m sphinx -W -b html docs docs/_build/html`` (the ``[docs]`` extra)."""
project = "pyro-dgm"
author = "pyro-dgm developers"
extensions = [
    "myst_nb",  # Markdown pages and notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",  # the "Args:" sections of the Kalman functions
    "sphinx.ext.viewcode",
]
nb_execution_mode = "off"  # the notebooks run in CI under nbval, at tiny sizes
myst_heading_anchors = 3
exclude_patterns = ["_build"]
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
