# Two commands set everything up on a fresh machine:
#   make book   install, execute every chapter (PROFILE=quick|paper) and build the HTML book
#   make test   install, then pytest: unit tests, every chapter through papermill, the book build
PYTHON     ?= python3
VENV       ?= .venv
PROFILE    ?= quick
# The releases this project is tested with; elsewhere use the build that fits your machine
# (see the README), e.g. make TORCH_SPEC="torch torchvision --index-url ...".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.qlib-installed

.PHONY: book test setup data clean

book: setup
	$(PY) -m qlib.book all --profile $(PROFILE)

test: setup
	$(PY) -m pytest

setup: $(STAMP) data

# Re-runs only when pyproject.toml changes, so a second `make` finishes set-up in seconds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[book,test]'
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

clean:
	rm -rf _build
