# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or refreshes, when pyproject.toml changes) the virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests that may run in parallel with the rest are kept small; see tests/README.md.
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench proto install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch pinned here: on the dev/CI machines this takes the CPU wheel already on disk;
	# pyproject keeps a compatible range for GPU clusters.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opt-ray demo --output demo-out

# pytest exits 5 when it collected no test: that is a failure here, never green.
test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(MAKE) test PYTEST_ARGS="-m 'not slow'"

bench: $(STAMP)
	$(PY) -m bench.run_all

proto: $(STAMP)
	$(PY) -m opt_ray.control.protogen

clean:
	rm -rf $(VENV) demo-out .pytest_cache
