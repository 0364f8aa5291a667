# `make test` and `make demo` work from a fresh clone: each creates .venv with the pinned CPU
# stack if it is missing and (re)builds the package when its sources change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --no-compile --disable-pip-version-check -q

.PHONY: test demo bench install clean

# vLLM generations whose logits-processor interfaces integrations/vllm.py implements (V1, V2)
VLLM_VERSIONS := 0.24.0 0.34.0

$(VENV)/.stack: requirements-cpu.txt requirements-integrations.txt requirements-serve.txt \
               constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip==26.3 setuptools==84.2.1 wheel==0.48.0
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) torch==$$(sed -n 's/^torch==//p' requirements-cpu.txt)
	$(PIP) -r requirements-cpu.txt -r requirements-integrations.txt -r requirements-serve.txt \
	  -c constraints-cpu.txt
	# the MovieLens-100K files ship inside recbole, whose own dependencies are not needed; verl's
	# are in requirements-integrations.txt (its transformers<5.11 pin is not)
	$(PIP) --no-deps recbole==1.2.1 verl==0.9.1
	# vLLM's interface classes, each generation in its own folder (tests add it to sys.path)
	for v in $(VLLM_VERSIONS); do test -d $(VENV)/vllm-$$v || \
	  $(PIP) --no-deps --target $(VENV)/vllm-$$v vllm==$$v; done
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
	$(PY) benchmarks/bench_fused_cpu.py

clean:
	rm -rf build *.egg-info gream_fast/_trie*.so $(VENV)/.built
