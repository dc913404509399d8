# Set-up and entry points. `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The tested CPU build of torch. pyproject.toml stays loose (torch>=2.4); an
# unpinned install would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-inpainting bench figures screenshot clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,napari,eht]'
	touch $(STAMP)

# The napari tests need a display: the script runs pytest under Xvfb (installing it when missing).
test: $(STAMP)
	sh scripts/run_tests.sh $(PY)

# docs/filament_prior.png and docs/biosr_demo.png (the demo's figure), rewritten by their scripts.
figures: $(STAMP)
	$(PY) scripts/prior_figure.py docs/filament_prior.png
	$(PY) -m ppm_napari.demo --out demo_output
	cp demo_output/biosr_demo.png docs/biosr_demo.png

# docs/napari.png from a real viewer with a finished PPM run on the sample data.
screenshot: $(STAMP)
	sh scripts/headless_deps.sh
	QT_API=pyqt6 xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) scripts/napari_screenshot.py docs/napari.png

# The main job: BioSR widefield -> 2x SIM-like super-resolution with the shipped filament prior.
demo: $(STAMP)
	$(PY) -m ppm_napari.demo --out demo_output

# The first demo: trains a small prior on synthetic spots and fills in a hidden square.
demo-inpainting: $(STAMP)
	$(PY) -m ppm_core.demo --out demo_output/inpainting

# Each page is written to a temporary file first, so a failed run leaves the old page.
bench: $(STAMP)
	$(PY) benchmarks/prior_throughput.py > docs/prior_throughput.md.tmp
	mv docs/prior_throughput.md.tmp docs/prior_throughput.md
	$(PY) benchmarks/exact_posterior.py --figure docs/mixture_particles.png > docs/benchmarks.md.tmp
	mv docs/benchmarks.md.tmp docs/benchmarks.md
	$(PY) benchmarks/microscopy_biosr.py --figure docs/microscopy_biosr.png --update docs/benchmarks.md

clean:
	rm -rf $(VENV) demo_output
