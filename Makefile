# Two entry points for a fresh machine: `make first-edit` and `make test`.
# Each makes a virtualenv in .venv, installs PyTorch (CPU build) first, then ddsedit.
# TORCH is what pip installs first: the default takes a locally provided CPU wheel; elsewhere use PyTorch's
# CPU index, e.g. make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.ddsedit-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,ui]"
	touch $(STAMP)

install: $(STAMP)

first-edit: $(STAMP)
	mkdir -p out
	HF_HUB_OFFLINE=1 $(BIN)/ddsedit dds --src examples/red-circle-on-white.png --model shapes --seed 0 \
		--ref "a red circle on a white background" --query "a blue circle on a white background" \
		-o out/red-circle-on-white.dds.png --overwrite

# The page's browser tests drive Debian's Chromium through its chromedriver (a browser tool's own download does
# not work on this project's machines): installed here when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		apt-get install -y -q chromium chromium-driver >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)

test: $(STAMP) browser
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out

.PHONY: install first-edit browser test clean
