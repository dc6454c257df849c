# jobgate developer entry points. `make run` brings up a local cluster,
# `make test` runs the whole suite. Both build what they need first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUBS  := src/jobgate/v1
PROTOS := $(wildcard proto/jobgate/v1/*.proto)

.PHONY: all venv proto run test lint clean

all: proto

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Stubs are generated into a git-ignored package, never edited by hand.
$(STUBS)/.generated: $(VENV)/.installed $(PROTOS)
	rm -rf $(STUBS)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src \
		--grpc_python_out=src $(PROTOS)
	touch $(STUBS)/__init__.py $@

proto: $(STUBS)/.generated

run: proto
	$(PY) -m jobgate.devcluster --dir run

test: proto
	$(PY) -m pytest tests

lint: proto
	$(PY) -m ruff check src tests certs

clean:
	rm -rf $(VENV) $(STUBS) run build dist src/*.egg-info
