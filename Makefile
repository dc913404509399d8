# Set-up and entry points. `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The tested CPU build of torch. pyproject.toml stays loose (torch>=2.4); an
# unpinned install would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m ppm_core.demo --out demo_output

# Each page is written to a temporary file first, so a failed run leaves the old page.
bench: $(STAMP)
	$(PY) benchmarks/prior_throughput.py > docs/prior_throughput.md.tmp
	mv docs/prior_throughput.md.tmp docs/prior_throughput.md
	$(PY) benchmarks/exact_posterior.py --figure docs/mixture_particles.png > docs/benchmarks.md.tmp
	mv docs/benchmarks.md.tmp docs/benchmarks.md

clean:
	rm -rf $(VENV) demo_output
