# `make demo` and `make test` each set up .venv (reused when present) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := build/demo

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	# constraints.txt pins torch to the CPU wheel; the package itself accepts any recent torch.
	$(PY) -m pip install -qq -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	rm -rf $(DEMO)
	$(VENV)/bin/safemerge-ray synth --out $(DEMO) --layers 4 --hidden 128
	$(VENV)/bin/safemerge-ray merge --unaligned $(DEMO)/unaligned --aligned $(DEMO)/aligned \
	    --safety-adapter $(DEMO)/safety --finetuned $(DEMO)/finetuned/gsm8k --out $(DEMO)/merged/gsm8k

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV)
