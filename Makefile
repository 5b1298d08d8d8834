# Two commands: `make demo` and `make test`. Both create .venv and install the pinned versions first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install bench docs clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first, pinned, so no range can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out runs/demo

test: $(STAMP)
	SMOKE_TEST=1 $(PY) -m pytest -q tests --nbval-lax docs/tutorials  # the tutorials at tiny sizes (SMOKE_TEST)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

docs: $(STAMP)
	$(PY) -m sphinx -W -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/svi_overhead.py

clean:
	rm -rf $(VENV) runs *.egg-info
