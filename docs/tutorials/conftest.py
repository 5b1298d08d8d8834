"""``pytest --nbval-lax docs/tutorials`` (part of ``make test``) runs every tutorial at tiny sizes: the
kernels it starts inherit ``SMOKE_TEST``. Run a notebook by hand (Jupyter) for the full sizes."""
import os

os.environ["SMOKE_TEST"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
