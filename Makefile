PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

# (Re)install when requirements.txt changes; creates .venv when it is missing.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

# Until the explainer demo lands: a smoke model, kept apart from cifar10_model.pkl.
demo: $(VENV)/.installed
	$(PY) train_cifar10.py --smoke --output xai_results/smoke_model.pkl \
		--history-plot xai_results/training_history.png

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .cache .pytest_cache xai_results
