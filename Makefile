PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,onnx,kernels,geo,ray,index,serve,bench

.PHONY: test demo lint venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are pinned explicitly so pip takes them from the local wheel cache.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python -m mpsclip.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
