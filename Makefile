# fairkd — the README's two commands are `make reproduce` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PROFILE ?= default
DATASET ?= synthetic
ARGS   ?=

.PHONY: setup setup-test reproduce test bench clean-venv

# Idempotent: the stamp is rebuilt only when pyproject.toml changes.
$(VENV)/.setup-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test-stamp: $(VENV)/.setup-stamp
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The text study (DATASET=synthetic_text or multinli) needs the optional extra [text].
$(VENV)/.text-stamp: $(VENV)/.setup-stamp
	$(PY) -m pip install --quiet -e '.[text]'
	touch $@
TEXT_DATASETS := synthetic_text multinli
SETUP_FOR_DATASET := $(VENV)/.setup-stamp $(if $(filter $(DATASET),$(TEXT_DATASETS)),$(VENV)/.text-stamp)

setup: $(VENV)/.setup-stamp

setup-test: $(VENV)/.test-stamp

reproduce: $(SETUP_FOR_DATASET)
	$(PY) -m fairkd_utils.pipeline --profile $(PROFILE) --dataset $(DATASET) $(ARGS)

test: setup-test
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
