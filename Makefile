# fairseq-siamctc: the two commands a user needs are `make test` and `make demo`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: text-to-speech engines and lexicon for the built-in corpus.
APT_PACKAGES := espeak-ng flite festival festvox-kallpc16k pocketsphinx-en-us pocketsphinx-testdata
CORPUS_SIZE ?= tiny
DEMO_SIZE ?= small

.PHONY: setup sysdeps test corpus demo clean

setup: $(STAMP)

$(STAMP): setup.cfg setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	@touch $@

# Installs the Debian packages only when one is missing.
sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup sysdeps
	$(PY) -m pytest tests

corpus: setup sysdeps
	$(PY) -m manifests.builtin_corpus --size $(CORPUS_SIZE) --out data/builtin

demo: setup sysdeps
	@echo "make demo: the end-to-end demo arrives with the recipes work; nothing runs yet." >&2; exit 1

clean:
	rm -rf $(VENV) data results
