PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench evaluate clean

# (Re)install when requirements.txt changes; creates .venv when it is missing.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Two workers, each taking whole files (so module fixtures and jitted functions are
# built once): the suite is mostly XLA compilation, one core each (from a cold cache on
# the 2-core CPU: 254-340 s instead of about 380 s on one worker).
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile

# Your own cifar10_model.pkl when it exists, else the shipped pretrained checkpoint, else
# a smoke model trained in seconds.
CHECKPOINT ?= $(firstword $(wildcard cifar10_model.pkl pretrained/cifar10_cnn.pkl) \
	xai_results/smoke_model.pkl)

demo: $(VENV)/.installed
	test -f $(CHECKPOINT) || $(PY) train_cifar10.py --smoke --output $(CHECKPOINT) \
		--history-plot xai_results/training_history.png
	$(PY) demo_xai.py --checkpoint $(CHECKPOINT)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_xai.py

# Every explainer measured on the first 1,000 test records (hours on a 2-core CPU; see
# the README for faster options).
evaluate: $(VENV)/.installed
	$(PY) evaluate_xai.py --checkpoint $(CHECKPOINT)

clean:
	rm -rf $(VENV) .cache .pytest_cache xai_results
