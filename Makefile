# Set-up is implicit: every target first makes sure the project's virtual
# environment exists and matches pyproject.toml (it is rebuilt when the pins change).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install test demo lint gpukit

$(STAMP): pyproject.toml
	rm -f $(VENV)/.installed-*
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m kvflow.harness.demo

lint: $(STAMP)
	$(VENV)/bin/ruff format --check kvflow patches benchmarks tests tools examples
	$(VENV)/bin/ruff check kvflow patches benchmarks tests tools examples

# The bundle the lent GPU machine needs (see benchmarks/gpu/device_compare.sh).
gpukit: $(STAMP)
	bash ../shared/gpukit/make_gpukit.sh .gpukit
	$(VENV)/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .gpukit/whl requests urllib3 idna charset-normalizer certifi tqdm
