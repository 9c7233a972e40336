# fedtune: the two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt only when pyproject.toml changes; pip's own cache (~/.cache/pip) keeps the
# multi-GB torch wheel so a rebuild downloads nothing.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: install demo test unit lint bench bench-learning bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(VENV)/bin/fedtune run examples/quickstart.yaml --fresh

lint: install
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install lint cluster-deps
	$(PY) -m pytest -q

# The fast tier: no cluster, no training; run it after every change.
unit: install
	$(PY) -m pytest -q tests/unit -m "not slow and not cluster"

# Flower is installed for the benchmark only, into its own folder inside the venv: the venv's packages
# keep precedence, so fedtune runs against the versions it was installed with.
BENCH_DEPS := $(VENV)/bench-deps
# Aggregation throughput, the operator on the test cluster (hence cluster-deps), round hand-offs in a local
# run, and learning quality against local-only and centralized baselines.
bench: install cluster-deps $(BENCH_DEPS)/.flwr-1.42.0
	$(PY) -m bench
	$(PY) -m bench.operator
	$(PY) -m bench.rounds
	$(PY) -m bench.learning

# Does federating pay? Each client's eval loss, local-only / federated / centralized (about 20 minutes on 2 cores).
bench-learning: install
	$(PY) -m bench.learning

# A client's training on a CUDA GPU against a plain PEFT loop (tokens/s, MFU, memory, round overhead);
# without a GPU it writes bench/results/gpu.md saying so.
bench-gpu: install
	$(PY) -m bench.gpu

$(BENCH_DEPS)/.flwr-1.42.0:
	$(PY) -m pip install -q --target $(BENCH_DEPS) flwr==1.42.0
	@touch $@

clean:
	rm -rf $(VENV) fedtune-runs .mypy_cache .ruff_cache .pytest_cache

# --- test cluster: etcd, kube-apiserver, controller-manager, scheduler, helm and an S3 server, built
# from the Go module proxy and cached by version under ~/.cache/fedtune (a second run builds nothing).
.PHONY: cluster-deps cluster-up cluster-down cluster-status cluster-demo

cluster-deps:
	$(PYTHON) -m tests.cluster.harness deps

cluster-up: install cluster-deps
	$(PY) -m tests.cluster.harness up

cluster-down:
	-@test -f .cluster/operator.pid && kill $$(cat .cluster/operator.pid) 2>/dev/null; rm -f .cluster/operator.pid
	$(PYTHON) -m tests.cluster.harness down

# The newcomer's path in one command: a cluster, the CRDs, the operator, the quickstart, a live view.
cluster-demo: cluster-up
	PATH=$(CURDIR)/.cluster/bin:$$PATH $(PY) examples/cluster/demo.py

cluster-status:
	$(PYTHON) -m tests.cluster.harness status

# --- images: the operator (no torch) and the trainer, tagged as the chart and spec.image expect them.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REGISTRY ?= ghcr.io/fedtune
IMAGES := operator trainer
.PHONY: images image-names

image-names:
	@for image in $(IMAGES); do echo $(IMAGE_REGISTRY)/$$image:$(VERSION); done

# Builds with whichever of docker, podman or buildah is installed (in that order).
images:
	@builder=$$(for b in docker podman buildah; do command -v $$b >/dev/null && { echo $$b; break; }; done); \
	if [ -z "$$builder" ]; then echo "make images: install docker, podman or buildah" >&2; exit 1; fi; \
	[ "$$builder" = buildah ] && build="buildah bud" || build="$$builder build"; \
	for image in $(IMAGES); do \
	  echo "$$build -f images/$$image/Dockerfile -t $(IMAGE_REGISTRY)/$$image:$(VERSION) ."; \
	  $$build -f images/$$image/Dockerfile -t $(IMAGE_REGISTRY)/$$image:$(VERSION) . || exit 1; \
	done
