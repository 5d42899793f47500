# fairseq-siamctc: the two commands a user needs are `make test` and `make demo`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: text-to-speech engines and lexicon for the built-in corpus.
APT_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \
	bible-kjv pocketsphinx-en-us pocketsphinx-testdata
CORPUS_SIZE ?= small
DEMO_SIZE ?= small

.PHONY: setup sysdeps test corpus demo study paper clean

setup: $(STAMP)

# torch's CUDA build makes the environment about 6.5 GB; without room for it pip stops halfway.
SETUP_FREE_GB ?= 8

$(STAMP): setup.cfg setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || { \
	  free_gb=$$(df -Pk $(VENV) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  if [ "$$free_gb" -lt $(SETUP_FREE_GB) ]; then \
	    echo "make setup: installing into $(VENV) needs about $(SETUP_FREE_GB) GB free, the disk has $$free_gb GB" >&2; exit 1; \
	  fi; }
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

# pytest-xdist: the slow tests (whole training chains in subprocesses) spread over the cores;
# worksteal evens out their very unequal lengths. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: setup sysdeps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal tests

corpus: setup sysdeps
	$(PY) -m siamctc_manifests.builtin_corpus --size $(CORPUS_SIZE) \
	  --out data/builtin$(if $(filter-out small,$(CORPUS_SIZE)),_$(CORPUS_SIZE))

demo: setup sysdeps
	$(PY) examples/demo/run_demo.py --size $(DEMO_SIZE)

# seed vs SiamCTC vs continued pretraining, several seeds, probe and fine-tuning, intervals
study: setup sysdeps
	$(PY) examples/study/run_study.py

# the paper's table 1 and figure 2 from LibriSpeech and the two public checkpoints, resumable; the
# plan of GPU hours and disk comes first (examples/paper/README.md). More options in PAPER_ARGS,
# e.g. PAPER_ARGS="--gpus 8 --finetune"
paper: setup sysdeps
	@test -n "$(LIBRISPEECH)" -a -n "$(HUBERT)" -a -n "$(WAVLM)" || { \
	  echo "make paper: give LIBRISPEECH=folder HUBERT=hubert_base_ls960.pt WAVLM=wavlm_base.pt" >&2; exit 1; }
	$(PY) examples/paper/run_paper.py --librispeech $(LIBRISPEECH) --hubert $(HUBERT) --wavlm $(WAVLM) $(PAPER_ARGS)

clean:
	rm -rf $(VENV) data results
