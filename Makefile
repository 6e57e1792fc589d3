PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo app bench evaluate clean chromium

# (Re)install when the dependencies change; creates .venv when it is missing. The package
# goes in editable (pyproject.toml), so its modules import from any folder. --no-compile:
# Python compiles only the modules it imports, when it first imports them, instead of
# every module of every package at install (54 s -> 26 s for the install on the 2-core CPU).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -r requirements.txt
	touch $@

# Every test, slow ones included, on two workers (pytest.ini; the measured cold times on
# the 2-core CPU are in docs/tests.md). `pytest -m "not slow"` is the quick loop.
# Bytecode caching on: with PYTHONDONTWRITEBYTECODE set (as on this machine type) and the
# packages installed --no-compile, each of the suite's ~40 Python processes compiled
# the sources of jax, flax and numpy again, ~3 s of CPU each.
test: $(VENV)/.installed chromium
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest

# The browser test drives Debian's chromium (Playwright downloads no browser); installed
# here when it is missing and we are root, as on CI.
chromium:
	@command -v chromium >/dev/null || [ -n "$$CHROMIUM" ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	  else echo "install Debian's chromium (sudo apt-get install -y chromium) or set CHROMIUM" >&2; exit 1; fi; }

# Your own cifar10_model.pkl when it exists, else the shipped pretrained checkpoint, else
# a smoke model trained in seconds (`--smoke` writes xai_results/smoke_model.pkl, so it
# never shadows the other two). A CHECKPOINT=... you name must exist.
SMOKE_CHECKPOINT := xai_results/smoke_model.pkl
CHECKPOINT ?= $(firstword $(wildcard cifar10_model.pkl pretrained/cifar10_cnn.pkl) \
	$(SMOKE_CHECKPOINT))

demo: $(VENV)/.installed
	@if [ "$(CHECKPOINT)" = "$(SMOKE_CHECKPOINT)" ] && [ ! -f "$(CHECKPOINT)" ]; then \
	  $(PY) train_cifar10.py --smoke; fi
	$(PY) demo_xai.py --checkpoint $(CHECKPOINT)

# The explorer on http://127.0.0.1:8501 (settings in .streamlit/config.toml); the
# shipped checkpoint unless APP_CHECKPOINT names another.
APP_CHECKPOINT ?= pretrained/cifar10_cnn.pkl
app: $(VENV)/.installed
	XAI_CHECKPOINT=$(APP_CHECKPOINT) $(PY) -m streamlit run app.py

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_xai.py

# Every explainer that fits each network, measured on each shipped checkpoint (and on
# your cifar10_model.pkl when it exists), each into xai_results/evaluation/<name>/. The
# default EVAL_FLAGS are the CPU subset of docs/architectures.md (the first 50 test
# records, curves every 64 px, randomisation on 4 images, fewer samples for the sampling
# methods); EVAL_FLAGS= evaluates the first 1,000 with every default, as on a GPU.
EVAL_FLAGS ?= --num-images 50 --randomization-images 4 --smoothgrad-n-samples 16 \
	--integrated-gradients-steps 16 --rise-n-masks 250 --occlusion-patch 8 --occlusion-stride 4 \
	--step 64 --chunk 50 --batch-size 256 --faithfulness-subsets 50 --infidelity-perturbations 16 \
	--focus-mosaics 50 --lime-n-samples 250 --kernel-shap-n-samples 250
evaluate: $(VENV)/.installed
	@for checkpoint in $(wildcard cifar10_model.pkl pretrained/*.pkl); do \
	  $(PY) evaluate_xai.py --checkpoint $$checkpoint $(EVAL_FLAGS) \
	    --output-dir xai_results/evaluation/$$(basename $$checkpoint .pkl) || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache xai_results
