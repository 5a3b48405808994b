# make test / make demo / make bench each set up .venv on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ENGINE ?= sim

.PHONY: test demo bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first so that no extra pulls a newer (CUDA) build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m planner_svc.cli demo --engine $(ENGINE)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
