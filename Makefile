# make demo / make test work from a fresh clone with only Python installed: they create .venv,
# install the project once (again whenever pyproject.toml changes) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install docs bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.dump_graph --model torchvision:resnet18 --input-shape 1,3,224,224 --pipeline default

test: $(STAMP)
	$(PY) -m pytest tests

docs: $(STAMP)
	$(PY) -m tools.gen_pass_docs --out docs/passes.md

bench: $(STAMP)
	$(PY) -m tools.bench

clean:
	rm -rf $(VENV) build *.egg-info
