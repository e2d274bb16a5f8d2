# The AOQ pipeline as make rules whose targets are real files: `make` redoes only what is
# missing or older than its inputs. Every rule calls a sub-command of the `aoq` CLI.
#
#   make demo                      set up, generate the demo dataset, train, evaluate
#   make test                      set up and run lint + the test suite
#   make train DATA=f30k_precomp DATA_PATH=/datasets/scan_data
#   make eval DATA=coco_precomp FOLD5=1 CKPT=runs/coco_precomp/base/checkpoint.pt

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The torch wheel to install; on a CUDA box pick the build you need, e.g. TORCH='torch==2.13.0'
# with PIP_INDEX_URL pointing at PyTorch's CUDA index.
TORCH ?= torch==2.13.0

DATA ?= f30k_precomp
DATA_PATH ?= data
RUN ?= base
EXP ?=
FOLD5 ?= 0
SET ?=

DATASET := $(DATA_PATH)/$(DATA)
VOCAB ?= $(DATASET)/vocab.json
RUN_DIR := runs/$(DATA)/$(RUN)
CKPT ?= $(RUN_DIR)/checkpoint.pt

BIN := $(VENV)/bin
AOQ := $(BIN)/aoq
STAMP := $(VENV)/.installed
CONFIGS := --config configs/data/$(DATA).yaml $(if $(EXP),--config configs/experiment/$(EXP).yaml)
OVERRIDES := --set data.path=$(DATA_PATH) --set data.vocab=$(VOCAB) $(foreach s,$(SET),--set $(s))

.PHONY: help install test lint demo vocab train eval bench clean-demo

help:
	@echo "make demo          set up, generate the demo dataset, train and evaluate (CPU, minutes)"
	@echo "make test          set up, then lint and run the test suite"
	@echo "make vocab         vocabulary of DATA's training captions   -> DATA_PATH/DATA/vocab.json"
	@echo "make train         base VSE++ model                         -> runs/DATA/RUN/checkpoint.pt"
	@echo "make eval          R@K of CKPT on DATA's eval split (FOLD5=1: COCO 5-fold 1K)"
	@echo "make bench         speed figures                            -> bench/results.json"
	@echo "variables: DATA=$(DATA) DATA_PATH=$(DATA_PATH) RUN=$(RUN) EXP=$(EXP) FOLD5=$(FOLD5)"
	@echo "           CKPT=$(CKPT) SET='section.key=value ...' TORCH=$(TORCH)"

# --- environment: a virtual environment made from nothing --------------------------------
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

# --- checks ------------------------------------------------------------------------------
lint: $(STAMP)
	$(BIN)/ruff check stages tests tools

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python tools/bench.py --out bench/results.json

# --- data --------------------------------------------------------------------------------
$(DATA_PATH)/demo/train_caps.txt: | $(STAMP)
	$(AOQ) demo-data --out $(DATA_PATH)/demo

$(DATASET)/%_caps.txt:
	@echo "error: $@ not found. Put the $(DATA) precomp folder under DATA_PATH=$(DATA_PATH)" \
	      "(see README.md, 'Datasets'), or point DATA_PATH at the folder that holds it." >&2
	@exit 1

vocab: $(VOCAB)
$(VOCAB): $(DATASET)/train_caps.txt | $(STAMP)
	$(AOQ) vocab $(CONFIGS) $(OVERRIDES)

# --- stages ------------------------------------------------------------------------------
train: $(RUN_DIR)/checkpoint.pt
$(RUN_DIR)/checkpoint.pt: $(VOCAB) | $(STAMP)
	$(AOQ) train $(CONFIGS) $(OVERRIDES) --run-dir $(RUN_DIR) --resume

eval: $(CKPT) | $(STAMP)
	$(AOQ) eval $(foreach c,$(CKPT),--ckpt $(c)) $(CONFIGS) $(OVERRIDES) --set eval.fold5=$(FOLD5)

demo:
	$(MAKE) --no-print-directory eval DATA=demo EXP=demo DATA_PATH=data RUN=base

clean-demo:
	rm -rf data/demo runs/demo
