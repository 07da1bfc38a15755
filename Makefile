# RepViT -> app-ready Core ML / ONNX / TFLite.  `make help` lists targets and variables.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
VARIANT ?= m0.9
QUANT   ?= int8
QUANTS  ?= fp32 fp16 int8 w8 pal6 pal4
CKPT    ?= official
DATA    ?=
CALIB   ?=
RECIPE  ?=
SET     ?=
FORCE   ?=
ARTIFACTS ?= artifacts

# Optional variables become CLI options only when set.
RUN_OPTS = --variant $(VARIANT) --ckpt $(CKPT) \
  $(if $(DATA),--data $(DATA)) $(if $(CALIB),--calib $(CALIB)) \
  $(if $(RECIPE),--recipe $(RECIPE)) $(foreach s,$(SET),--set $(s)) \
  $(foreach s,$(FORCE),--force $(s)) --artifacts $(ARTIFACTS)

.PHONY: help setup test test-slow deploy compare variants schemes bench cache-ls clean

help: ## This list
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables: VARIANT=$(VARIANT) (m0.6 m0.9 m1.0 m1.1 m1.5 m2.3; legacy m1 m2 m3)  QUANT=$(QUANT) (\`make schemes\` lists the schemes per format)"
	@echo "           CKPT=official|random|hf-hub:ORG/NAME[@REV]|FILE  DATA=eval folder  CALIB=calibration folder or imagenette-320 / imagenette-160"
	@echo "           RECIPE=your.yaml  SET='stage.key=value ...'  FORCE='stage ...'  QUANTS='fp16 int8 ...' (compare)"

setup: ## Create $(VENV) and install everything (torch 2.13.0 CPU included)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'

test: ## Run the default test suite (minutes; slow tests excluded; one worker per core, up to 4)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test-slow: ## Run only the slow tests (every variant through every exporter, ...)
	$(PY) -m pytest -q -m slow

deploy: ## Build artifacts/<VARIANT>-<QUANT>/ (models, labels, report)
	$(PY) -m pipeline deploy --quant $(QUANT) $(RUN_OPTS)

compare: ## Build every scheme in QUANTS and compare them in artifacts/<VARIANT>-compare/
	$(PY) -m pipeline compare $(foreach q,$(QUANTS),--quant $(q)) $(RUN_OPTS)

variants: ## The model zoo with counted and published params / MACs
	$(PY) -m pipeline variants

schemes: ## Which scheme each format can express, and why not
	$(PY) -m pipeline schemes

bench: ## Benchmarks under bench/ (ratios measured in one run; accuracy needs ../shared/data)
	$(PY) bench/bench_reparam.py
	$(PY) bench/bench_latency.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_compression.py
	$(PY) bench/bench_qat.py
	$(PY) bench/bench_calibration.py
	$(PY) bench/bench_mediapipe.py
	$(PY) bench/bench_int8_fidelity.py
	$(PY) bench/bench_int8_bound.py
	$(PY) bench/bench_validation.py

cache-ls: ## List cached stage outputs
	$(PY) -m pipeline cache ls --artifacts $(ARTIFACTS)

clean: ## Remove artifacts/ (the cache included)
	rm -rf artifacts
