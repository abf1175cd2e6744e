PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,onnx,kernels,geo,ray,index,serve,bench,stac

.PHONY: test test-fast demo lint lint-imports venv clean chromium nginx

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

# The import layers of pyproject's [tool.importlinter]. lint-imports reads the package from disk, and
# mpsclip.kernels/.export/.serve/.bench live in top-level folders: a tree of links puts them where they install.
LAYERS := build/layers
lint-imports: venv
	rm -rf $(LAYERS) && mkdir -p $(LAYERS)/mpsclip
	for f in mpsclip/*; do ln -s "$(CURDIR)/$$f" $(LAYERS)/mpsclip/; done
	for p in kernels export serve bench; do ln -s "$(CURDIR)/$$p" $(LAYERS)/mpsclip/$$p; done
	cd $(LAYERS) && "$(CURDIR)/$(BIN)/lint-imports" --no-logo --no-cache "$(CURDIR)/pyproject.toml"

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

# Everything (CI runs this); pytest ends with its summary line ("N passed, M skipped in S s").
test: venv chromium nginx lint-imports
	$(BIN)/ruff check .
	MPSCLIP_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest  # the extras are installed: a missing one fails

# All but the tests marked slow, browser, triton, ray or gpu (markers: pyproject's [tool.pytest.ini_options]).
FAST := not slow and not browser and not triton and not ray and not gpu
test-fast: venv lint-imports
	$(BIN)/ruff check .
	MPSCLIP_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -m "$(FAST)"

demo: venv
	$(BIN)/python -m mpsclip.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
