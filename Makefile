# qsmprep developer entry points. `make demo` and `make test` work on a fresh
# machine with Python 3.11: they create .venv, install PyTorch (CPU build,
# pinned, installed first so no multi-GB CUDA build is pulled), then qsmprep.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEMO   ?= demo
PYTEST_ARGS ?= -n 2

.PHONY: venv demo test browser clean-demo benchmarks test-container

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Simulate a small BIDS dataset from the packaged head phantom, then run the
# whole pipeline on it. Results: $(DEMO)/out (open $(DEMO)/out/sub-01.html).
demo: venv
	rm -rf $(DEMO)/bids
	$(BIN)/qsmprep-sim $(DEMO)/bids --subjects 1 --voxel-size 2 --seed 1
	$(BIN)/qsmprep $(DEMO)/bids $(DEMO)/out participant -w $(DEMO)/work --nprocs 2
	@echo "Demo done: see $(DEMO)/out (report: $(DEMO)/out/sub-01.html)"

# Headless Chromium for the report tests (Debian packages). Tests that need it
# skip with a clear reason when it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	    echo "warning: chromium could not be installed; browser tests will be skipped"; }

# The venv's bin/ goes first on PATH so tests find its console scripts
# (qsm-forward, qsmprep, ...) even when the venv is not activated.
test: venv browser
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# Build the Docker image (from a local debootstrapped Debian base when no registry is
# reachable), run the demo in it and compare its Chimap with a host run; also checks the
# read-only input, output ownership and the error for a read-only output folder. Needs
# root (or a docker group member) and Debian's docker.io; see docs/containers.md.
test-container: venv
	BIN="$(abspath $(BIN))" bash bids_app_bootstrap/host/test_container.sh

benchmarks: venv
	$(BIN)/python benchmarks/accuracy.py --quick
	$(BIN)/python benchmarks/unwrap_speed.py --quick

clean-demo:
	rm -rf $(DEMO)
