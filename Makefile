PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,onnx,kernels,geo,ray,index,serve,bench,stac

.PHONY: test demo lint venv clean chromium nginx

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

# The browser test drives Debian's chromium (Playwright's own browser download is unreachable here).
chromium:
	@command -v chromium >/dev/null || { \
		echo "make test: installing Debian's chromium for the browser test (tests/test_serve_browser.py)"; \
		apt-get update -qq && apt-get install -y -qq chromium; } || { \
		echo "make test: cannot install chromium (needs root and apt); install it and rerun" >&2; exit 1; }

# The cloud-archive tests serve COGs and STAC catalogs with Debian's nginx (tests/test_remote.py, test_stac.py).
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
		echo "make test: installing Debian's nginx for the cloud-archive tests (tests/test_remote.py, test_stac.py)"; \
		apt-get update -qq && apt-get install -y -qq nginx; } || { \
		echo "make test: cannot install nginx (needs root and apt); install it and rerun" >&2; exit 1; }

test: venv chromium nginx
	$(BIN)/ruff check .
	MPSCLIP_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -q  # the extras are installed: a missing one fails

demo: venv
	$(BIN)/python -m mpsclip.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
