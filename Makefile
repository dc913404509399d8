# Set-up and entry points. `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The tested CPU build of torch. pyproject.toml stays loose (torch>=2.4); an
# unpinned install would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
EHT_DEMO := $(PY) -m ppm_core.cli eht reconstruct sample_data/eht/SR1_M87_2017_101_hi_hops_netcal_StokesI.uvfits \
	--npix 64 --fov 160 --samples 16 --method ppm --out demo_output/m87_posterior.fits \
	--summary-json demo_output/m87_summary.json --plot demo_output/m87_summary.png

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

# docs/filament_prior.png, docs/eht_prior.png and the demos' figures, rewritten by their scripts.
figures: $(STAMP)
	$(PY) scripts/prior_figure.py docs/filament_prior.png
	$(PY) scripts/ring_prior_figure.py docs/eht_prior.png
	$(PY) -m ppm_napari.demo --out demo_output
	cp demo_output/biosr_demo.png docs/biosr_demo.png
	$(EHT_DEMO)
	cp demo_output/m87_summary.png docs/eht_m87_demo.png

# docs/napari.png from a real viewer with a finished PPM run on the sample data.
screenshot: $(STAMP)
	sh scripts/headless_deps.sh
	QT_API=pyqt6 xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) scripts/napari_screenshot.py docs/napari.png

# The main jobs: BioSR widefield -> 2x SIM-like super-resolution with the shipped filament prior,
# then M87 (EHT 2017 April 11) black-hole imaging with the shipped ring prior.
demo: $(STAMP)
	$(PY) -m ppm_napari.demo --out demo_output
	$(EHT_DEMO)

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
	$(PY) benchmarks/eht_m87.py --figure docs/eht_m87.png --update docs/benchmarks.md
	$(PY) benchmarks/calibration.py --problem field --figure docs/calibration_field.png --update docs/benchmarks.md docs/calibration.md
	$(PY) benchmarks/calibration.py --problem blur --figure docs/calibration_blur.png --update docs/benchmarks.md docs/calibration.md
	$(PY) benchmarks/calibration.py --problem blur --long --update docs/benchmarks.md docs/calibration.md
	$(PY) benchmarks/amortized.py --update docs/benchmarks.md docs/amortized.md

clean:
	rm -rf $(VENV) demo_output
