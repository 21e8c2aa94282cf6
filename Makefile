# Set-up and checks. `make demo` and `make test` install everything they need on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO := demo-out

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build; ray pinned because
# its auth and networking defaults change between releases.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q ray==2.60.0 -e '.[test]'
	touch $@

# the tests also submit a job to a local Ray head: that needs Ray's job server (ray[default]),
# which a merge itself does not (it would add a dashboard agent to every local run)
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q 'ray[default]==2.60.0'
	touch $@

demo: install
	rm -rf $(DEMO)
	$(BIN)/raymerge synth $(DEMO)/models --models 3 --with-base --layers 6 --hidden 1024 \
		--intermediate 2816 --vocab 16000 --shard-size 200MB
	$(BIN)/raymerge plan configs/ties.yaml --shard-size 200MB --part-size 16MiB
	$(BIN)/raymerge run configs/ties.yaml $(DEMO)/ties --shard-size 200MB --part-size 16MiB --workers 2
	$(BIN)/raymerge verify $(DEMO)/ties

test: install $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
