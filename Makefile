# Two commands do all the set-up: `make demo` (main job) and `make test` (whole suite).
# TORCH is installed first so the package install never pulls another torch build;
# on a CUDA machine pass e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo demo-model test test-shuffled docs install clean

$(BIN)/.wanx-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	# DiffSynth-Studio, a test-only oracle (tests/models/test_s2v.py): no deps, which would pull
	# torchvision and CUDA builds; its S2V DiT file needs only torch, numpy and einops.
	$(BIN)/pip install -q --no-deps diffsynth==2.1.12
	touch $@

install: $(BIN)/.wanx-installed

# The demo model ships in the package (`--model demo`): 96x96, 17 frames, its own steps and guidance.
demo: install
	$(BIN)/wanx generate --model demo --prompt "a red circle moving left on a black background" --seed 0 --output outputs/demo.mp4

test: install
	$(BIN)/python -m pytest -q

# Rebuild the demo model from nothing with wanx's own tools (dataset, VAE, prepare, train,
# accuracy report in demo-build/report.json; 92 min on 2 CPU cores). DEMO_FLAGS=--quick
# checks the stages in seconds; --ship copies the result into the package. To finish a stopped
# build, run `python -m wanx.demo.build demo-build --resume` (this target starts afresh).
demo-model: install
	rm -rf demo-build
	$(BIN)/python -m wanx.demo.build demo-build $(DEMO_FLAGS)

# The suite in two shuffled orders, to show no test depends on another having run first.
# pyproject's addopts switch pytest-randomly off (`-p no:randomly`) so `make test` keeps file
# order; `-p randomly` given after them switches it back on. Each seed shuffles the modules
# and the tests within each module (module fixtures still run once). To rerun a failing
# order: `$(BIN)/python -m pytest -q -p randomly --randomly-seed=N` (N from the `==` line).
SEEDS ?= 1 2
test-shuffled: install
	@status=0; for seed in $(SEEDS); do \
		echo "== shuffled order, --randomly-seed=$$seed"; \
		$(BIN)/python -m pytest -q -p randomly --randomly-seed=$$seed || status=$$?; \
	done; exit $$status

# The manual (docs/*.md, nav in mkdocs.yml) as a site in site/; --strict fails on any warning
# (a broken link or anchor). The docs extra is installed once, beside the test extras.
# NO_MKDOCS_2_WARNING quiets mkdocs-material's end-of-life banner (a notice, not about this build).
$(BIN)/.wanx-docs-installed: $(BIN)/.wanx-installed pyproject.toml
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/.wanx-docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site
