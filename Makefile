# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone: they create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# torch is installed on its own first so that the local wheels (and the machine's pip constraint) pick it;
# the project install then finds torch satisfied and only adds the rest.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/mmtrain run contrastive --config align_tiny

# pytest exits 5 when it collects nothing: that is a failure, not a pass.
test: install
	$(BIN)/python -m pytest -q --durations=15; s=$$?; \
	if [ $$s -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$s

# The quick loop while editing: everything except the end-to-end runs marked slow.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check mmtrain recipes tests

bench: install
	$(BIN)/mmtrain bench all

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
