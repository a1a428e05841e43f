# Two commands set everything up on a fresh machine:
#   make book   install, execute every chapter (PROFILE=quick|paper) and build the HTML book
#   make test   install, then pytest: unit tests, every chapter through papermill, the book build,
#               the built book and the widgets in a real browser
#   make serve    the built book on http://127.0.0.1:$(PORT)/
#   make widgets  the τ explorer and the bit-list picker, live (Voilà on 127.0.0.1)
#   make paper-record  every chapter in the paper profile (CUDA when present) → results/paper/
PYTHON     ?= python3
VENV       ?= .venv
PROFILE    ?= quick
PORT       ?= 8000
# The releases this project is tested with; elsewhere use the build that fits your machine
# (see the README), e.g. make TORCH_SPEC="torch torchvision --index-url ...".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.qlib-installed

.PHONY: book test setup data browser serve widgets paper-record clean

book: setup
	$(PY) -m qlib.book all --profile $(PROFILE)

test: setup
	$(PY) -m pytest

setup: $(STAMP) data browser

# Re-runs only when pyproject.toml changes, so a second `make` finishes set-up in seconds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[book,test,deploy]'
	touch $(STAMP)

# Fashion-MNIST: already there, else Debian's package (as root), else torchvision's download.
data: $(STAMP)
	@if $(PY) -m qlib.data >/dev/null 2>&1; then \
	  $(PY) -m qlib.data; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq dataset-fashion-mnist || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) && $(PY) -m qlib.data; \
	else \
	  $(PY) -m qlib.data --download; \
	fi

# Debian's chromium for the browser tests (as root with apt); without it they skip and say so.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get install -y -qq chromium >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); \
	else \
	  echo "chromium is not installed and this is not root: tests/test_browser.py will skip"; \
	fi

serve:
	@test -f _build/site/_build/html/index.html || (echo "no built book: run make book first" && exit 1)
	@echo "the book: http://127.0.0.1:$(PORT)/  (Ctrl-C stops)"
	$(PY) -m http.server $(PORT) --bind 127.0.0.1 --directory _build/site/_build/html

# The paper profile on the machine this runs on (meant for a GPU): each chapter's glued
# values and the environment (device, torch/CUDA, date, commit, wall per chapter) in
# results/paper/, which the book's page "The paper profile" renders once committed.
paper-record: setup
	$(PY) -m qlib.paper_record --profile paper

widgets: setup
	$(VENV)/bin/voila notebooks/explorers.ipynb --port=$(PORT) --Voila.ip=127.0.0.1 --no-browser

clean:
	rm -rf _build
