# Two set-up commands on a fresh machine: `make serve` and `make test`. Both are idempotent.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU build that lies on this machine's disk; the project's own
# range (pyproject.toml) accepts it, so pip resolves nothing bigger afterwards.
TORCH_SPEC ?= torch==2.13.0

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python -m serve_app.model.cpu_kernels   # the fused CPU decode kernels, built once (~20-40 s)
	touch $@

.PHONY: install serve test
install: $(VENV)/.installed

serve: install
	$(BIN)/moe-serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)
