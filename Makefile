# Both `make demo` and `make test` bootstrap everything they need on a fresh machine:
# a .venv with the package, and pinned opa + regal built with `go install` into .tools/bin.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

OPA_VERSION   := 1.22.2
REGAL_VERSION := v0.42.0
PYTHON        ?= python3

VENV      := .venv
VENV_BIN  := $(VENV)/bin
TOOLS_BIN := $(CURDIR)/.tools/bin
OPA       := $(TOOLS_BIN)/opa
REGAL     := $(TOOLS_BIN)/regal
SCHEMAS   := policies/schemas
# Rego the engine ships outside the bundle (the managed sidecar's decision-log mask)
ENGINE_REGO := engine/agov/opa/rego
export PATH := $(TOOLS_BIN):$(PATH)
export AGOV_OPA_BIN := $(OPA)

.PHONY: test demo bench tools opa regal venv lint rego-fmt rego-check rego-lint rego-test py-lint py-types pytest clean

test: tools venv rego-fmt rego-check rego-lint rego-test py-lint py-types pytest

demo: tools venv
	$(VENV_BIN)/agov demo

bench: tools venv
	$(VENV_BIN)/python bench/run_all.py

lint: rego-fmt rego-check rego-lint py-lint py-types

# --- bootstrap ---------------------------------------------------------------------------

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(VENV_BIN)/python || $(PYTHON) -m venv $(VENV)
	$(VENV_BIN)/python -m pip install --quiet --upgrade pip
	$(VENV_BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

tools: opa regal

# True when $(1) is the pinned opa. The output is captured first: under pipefail,
# `opa version | grep -q` fails with SIGPIPE (141) whenever grep exits before opa finishes writing.
opa_is_pinned = out=$$($(1) version 2>/dev/null) && grep -qx "Version: $(OPA_VERSION)" <<<"$$out"
regal_is_pinned = out=$$($(1) version 2>/dev/null) && grep -qxE "Version:[[:space:]]+$(REGAL_VERSION)" <<<"$$out"

# Checked on every run (one `opa version`), so a deleted binary, a dangling link or another version
# is replaced: by the pinned opa on PATH when there is one, else by building it.
opa:
	@if ! { $(call opa_is_pinned,$(OPA)); }; then \
	  mkdir -p $(TOOLS_BIN); \
	  rm -f $(OPA); \
	  if command -v opa >/dev/null && $(call opa_is_pinned,opa); then \
	    ln -s "$$(realpath "$$(command -v opa)")" $(OPA); \
	  else \
	    echo "building opa v$(OPA_VERSION) (takes minutes unless Go's build cache has it)"; \
	    GOBIN=$(TOOLS_BIN) go install github.com/open-policy-agent/opa@v$(OPA_VERSION); \
	  fi; \
	  $(call opa_is_pinned,$(OPA)) || { echo "$(OPA) is not opa $(OPA_VERSION)"; exit 1; }; \
	fi

# The same for regal. It is built from tools/regal/go.mod (pinned there; bump it together with
# REGAL_VERSION): `go install regal@version` needs the module proxy's version list, which this
# network refuses.
regal:
	@if ! { $(call regal_is_pinned,$(REGAL)); }; then \
	  mkdir -p $(TOOLS_BIN); \
	  rm -f $(REGAL); \
	  if command -v regal >/dev/null && $(call regal_is_pinned,regal); then \
	    ln -s "$$(realpath "$$(command -v regal)")" $(REGAL); \
	  else \
	    echo "building regal $(REGAL_VERSION) (takes minutes unless Go's build cache has it)"; \
	    (cd tools/regal && GOBIN=$(TOOLS_BIN) go install \
	      -ldflags "-X github.com/open-policy-agent/regal/pkg/version.Version=$(REGAL_VERSION)" \
	      github.com/open-policy-agent/regal); \
	  fi; \
	  $(call regal_is_pinned,$(REGAL)) || { echo "$(REGAL) is not regal $(REGAL_VERSION)"; exit 1; }; \
	fi

# --- checks, in the order `make test` runs them ---------------------------------------------

rego-fmt:
	@out=$$($(OPA) fmt --list policies $(ENGINE_REGO)); if [ -n "$$out" ]; then echo "opa fmt would change:"; echo "$$out"; exit 1; fi

rego-check:
	$(OPA) check --strict -s $(SCHEMAS) policies
	$(OPA) check --strict $(ENGINE_REGO)

rego-lint:
	$(REGAL) lint policies $(ENGINE_REGO)

rego-test:
	$(OPA) test policies --timeout 120s --ignore schemas -s $(SCHEMAS) --coverage --threshold 95 --format json > .tools/coverage.json || \
	  { $(OPA) test policies --timeout 120s --ignore schemas -s $(SCHEMAS) -v; $(VENV_BIN)/python -c "import json;print('coverage %.2f%%' % json.load(open('.tools/coverage.json'))['coverage'])"; exit 1; }
	@$(VENV_BIN)/python -c "import json;print('opa test: coverage %.2f%% (threshold 95%%)' % json.load(open('.tools/coverage.json'))['coverage'])"
	$(OPA) test policies --timeout 120s --ignore schemas -s $(SCHEMAS)
	$(OPA) test $(ENGINE_REGO) --coverage --threshold 100 --format json > /dev/null || { $(OPA) test $(ENGINE_REGO) -v; exit 1; }

py-lint:
	$(VENV_BIN)/ruff check engine tests bench
	$(VENV_BIN)/ruff format --check engine tests bench

py-types:
	$(VENV_BIN)/mypy engine bench

pytest:
	AGOV_REQUIRE_OPA=1 $(VENV_BIN)/pytest -q

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
