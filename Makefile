PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean browser-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Browser tests (in tests/test_browse.py) need Debian's chromium + chromedriver: installed here
# when missing, we are root and apt-get exists; any failure is ignored and those tests skip, saying why.
browser-deps:
	-@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium + chromium-driver for the browser tests (best effort)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
		 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) \
		|| echo "could not install chromium; the browser tests will be skipped"; \
	fi

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m difflens demo --out runs/demo

clean:
	rm -rf $(VENV) runs
