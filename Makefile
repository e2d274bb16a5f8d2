# The AOQ pipeline as make rules whose targets are real files: `make` redoes only what is
# missing or older than its inputs. Every rule calls a sub-command of the `aoq` CLI.
#
#   make demo                      set up, generate the demo dataset, train, evaluate
#   make test                      set up and run lint + the test suite
#   make train DATA=f30k_precomp DATA_PATH=/datasets/scan_data
#   make eval DATA=coco_precomp FOLD5=1 CKPT=runs/coco_precomp/base/checkpoint.pt

SHELL := /bin/bash
comma := ,
.DEFAULT_GOAL := help
TOOLS := $(dir $(lastword $(MAKEFILE_LIST)))tools

PYTHON ?= python3
VENV ?= .venv
# The torch and torchvision wheels to install, a matching pair (torchvision computes the CNN
# features). On a CUDA box pick the build you need, e.g. TORCH='torch==2.5.1 torchvision==0.20.1'
# with PIP_INDEX_URL pointing at PyTorch's CUDA index; on aarch64 here, torch==2.9.1
# torchvision==0.24.1.
TORCH ?= torch==2.14.1 torchvision==0.29.1

DATA ?= f30k_precomp
DATA_PATH ?= data
# MODEL: configs/model/$(MODEL).yaml. Runs and candidates of a model other than VSE++ get
# their own default names, so switching MODEL never meets another model's outputs.
MODEL ?= vsepp
model_prefix = $(if $(filter vsepp,$(MODEL)),,$(MODEL)_)
RUN ?= $(model_prefix)base
EXP ?=
FOLD5 ?= 0
SET ?=

AOQ_RUN ?= $(model_prefix)aoq

DATASET := $(DATA_PATH)/$(DATA)
VOCAB ?= $(DATASET)/vocab.json
RUN_DIR := runs/$(DATA)/$(RUN)
# The settings stamps (see "settings stamps" below).
SETTINGS := runs/$(DATA)/.settings
BASE_CKPT := $(RUN_DIR)/checkpoint.pt
EMBEDDINGS := $(RUN_DIR)/embeddings_train.h5
OFFCANDI_DIR ?= offcandi/$(DATA)$(if $(model_prefix),/$(MODEL))
# RETRAIN_SET: overrides for the retrain stage only (SET applies to every stage), e.g.
# RETRAIN_SET=loss.detach_weights=1; a key retrain does not read (a mining setting: SET=) is
# refused by its settings stamp.
RETRAIN_SET ?=
AOQ_CKPT = $(call round_run,$(ROUNDS))/checkpoint.pt
ROUND_CKPTS = $(foreach r,$(ROUND_NUMBERS),$(call round_run,$(r))/checkpoint.pt)
# Whether CKPT was given (else it is the last round's model: the round recipe decides it).
ckpt_given := $(filter-out undefined,$(origin CKPT))
CKPT ?= $(AOQ_CKPT)

BIN := $(VENV)/bin
AOQ := $(BIN)/aoq
# NPROC=N: train and retrain in N processes (torchrun, one per GPU; train.batch_size stays
# the global batch)
NPROC ?= 1
AOQ_TRAIN := $(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) $(AOQ),$(AOQ))
STAMP := $(VENV)/.installed
# configs/data/$(DATA).yaml when there is one (a dataset made by `make features` under a new
# name needs none unless its splits differ from train/dev/test), the model's published
# settings configs/model/$(MODEL).yaml and its settings for this dataset when there are
# some (configs/model/$(MODEL)_$(DATA).yaml), then the experiment.
CONFIGS := $(if $(wildcard configs/data/$(DATA).yaml),--config configs/data/$(DATA).yaml) \
	--config configs/model/$(MODEL).yaml \
	$(if $(wildcard configs/model/$(MODEL)_$(DATA).yaml),--config configs/model/$(MODEL)_$(DATA).yaml) \
	$(if $(EXP),--config configs/experiment/$(EXP).yaml)
OVERRIDES := --set data.name=$(DATA) --set data.path=$(DATA_PATH) --set data.vocab=$(VOCAB) \
	$(foreach s,$(SET),--set $(s))

# --- the variables' values: a value make does not know is an error, never a silent default
one_word = $(filter 1,$(words $($(1))))
one_of = $(if $(and $(call one_word,$(1)),$(filter $($(1)),$(2))),,\
	$(error $(1)='$($(1))' is not allowed: use one of $(2)))
no_digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,\
	$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
positive_int = $(if $(and $(call one_word,$(1)),$(if $(strip $(call no_digits,$($(1)))),,yes),\
	$(subst 0,,$($(1)))),,$(error $(1)='$($(1))' is not allowed: use a whole number >= 1))
a_name = $(if $(and $(call one_word,$(1)),$(if $(findstring /,$($(1))),,yes)),,\
	$(error $(1)='$($(1))' is not allowed: use one name, without spaces or /))
$(call one_of,FOLD5,0 1)
$(call a_name,DATA)
$(call a_name,RUN)
$(call a_name,AOQ_RUN)
$(call a_name,MODEL)
# Paths: make splits a value at its spaces (into several targets, and the CLI gets extra
# arguments), so a path must be one word. CKPT may hold several checkpoints (an ensemble):
# each must then be a file, or a checkpoint.pt make can build.
a_path = $(if $(call one_word,$(1)),,$(error $(1)='$($(1))' is not allowed: give one path \
	without spaces (make splits values at spaces); for a folder or file whose path has \
	spaces, link it from one without: ln -s '<that path>' <new path>))
$(call a_path,DATA_PATH)
$(call a_path,VOCAB)
$(call a_path,OFFCANDI_DIR)
ckpt_not_files = $(filter-out $(wildcard $(CKPT)) %/checkpoint.pt,$(CKPT))
$(if $(and $(filter-out 0 1,$(words $(CKPT))),$(ckpt_not_files)),$(error CKPT='$(CKPT)' \
	is not allowed: '$(ckpt_not_files)' not found; CKPT is one checkpoint, or several \
	separated by spaces (an ensemble), so a path in it cannot hold spaces: link the \
	checkpoint from one without: ln -s '<that path>' <new path>))
MODELS := $(filter-out $(foreach m,$(basename $(notdir $(wildcard configs/model/*.yaml))),\
	$(filter $(m)_%,$(basename $(notdir $(wildcard configs/model/*_*.yaml))))),\
	$(basename $(notdir $(wildcard configs/model/*.yaml))))
$(if $(and $(MODELS),$(if $(wildcard configs/model/$(MODEL).yaml),,no)),\
	$(error MODEL='$(MODEL)' is not allowed: configs/model/ has $(MODELS)))
EXPERIMENTS := $(basename $(notdir $(wildcard configs/experiment/*.yaml)))
$(if $(EXP),$(if $(filter $(EXP),$(EXPERIMENTS)),,$(error EXP='$(EXP)' is not allowed: \
	configs/experiment/ has $(or $(EXPERIMENTS),no experiments))))

# --- the mining-round recipe: policy, so it lives in the configs -------------------------
# How many rounds of mining and retraining (round r > 1 mines with round r-1's model) and
# what each round's retraining starts from: scratch (as the reference) or the model that
# mined its candidates (the base model in round 1): rounds.count and rounds.retrain_init
# (stages/config/sections.py), set in an experiment config (EXP=two_rounds) or SET=. make
# asks `aoq rounds` for them when a goal needs them; ROUNDS=n and RETRAIN_INIT=scratch|miner
# on the command line answer instead. From a fresh clone there is no aoq to ask yet: the
# environment's stamp is then included as a makefile, so make builds the environment first
# and reads this Makefile again.
# (eval and export need it only for their default CKPT, the last round's model)
round_goals := $(filter offcandi retrain compare $(if $(ckpt_given),,eval export),$(MAKECMDGOALS))
# make -n / -q install nothing: there the stamp is not included (a fresh clone's dry run
# then shows round 1 alone, with a note).
dry_run := $(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS)))
ifneq ($(and $(round_goals),$(filter undefined,$(origin ROUNDS) $(origin RETRAIN_INIT))),)
ifeq ($(dry_run),)
-include $(STAMP)
endif
ROUND_RECIPE := $(shell if command -v $(firstword $(AOQ)) >/dev/null; then \
	$(AOQ) rounds $(CONFIGS) $(OVERRIDES) || echo failed; else echo unknown; fi)
$(if $(filter failed,$(ROUND_RECIPE)),$(error make asks `$(AOQ) rounds` for the \
	mining-round recipe (rounds.count, rounds.retrain_init), and it failed: its message is above))
ifeq ($(ROUND_RECIPE),unknown)
$(if $(dry_run),$(warning note: no $(AOQ) to ask for the mining-round recipe \
	(rounds.count, rounds.retrain_init) before the environment exists: planning round 1 \
	from scratch))
else
$(if $(filter 2,$(words $(ROUND_RECIPE))),,$(error make asks `$(AOQ) rounds` for the \
	mining-round recipe, and it said '$(ROUND_RECIPE)' (expected the number of rounds and \
	scratch or miner): give ROUNDS= and RETRAIN_INIT= to answer instead))
ROUNDS ?= $(word 1,$(ROUND_RECIPE))
RETRAIN_INIT ?= $(word 2,$(ROUND_RECIPE))
endif
endif
# Goals that do not mine or retrain never ask.
ROUNDS ?= 1
RETRAIN_INIT ?= scratch
$(call one_of,RETRAIN_INIT,scratch miner)
$(call positive_int,ROUNDS)

.PHONY: FORCE help install test lint demo features vocab train embed offcandi retrain eval compare \
	f30k-all coco-all bench clean-demo export

help:
	@echo "make demo          set up, generate the demo dataset, train and evaluate (CPU, minutes)"
	@echo "make test          set up, then lint and run the test suite"
	@echo "make features      captions/splits and features of DATA     -> DATA_PATH/DATA/{split}_caps.txt, {split}.h5"
	@echo "                   (KARPATHY= or COCO_JSON= for captions; TSV= or IMAGES= for features)"
	@echo "make vocab         vocabulary of DATA's training captions   -> DATA_PATH/DATA/vocab.json"
	@echo "make train         base VSE++ model                         -> runs/DATA/RUN/checkpoint.pt"
	@echo "                   NPROC=n: train (and retrain) in n processes, torchrun (one per GPU)"
	@echo "make embed         embed the training split with the base model -> runs/DATA/RUN/embeddings_train.h5"
	@echo "make offcandi      FAISS offline candidates                 -> offcandi/DATA/{i2t,t2i}.h5"
	@echo "                   MINER=<run>, text:<model folder> or clip:<arch>:<weights file>"
	@echo "                   (IMAGES=<image root>): mine with another model"
	@echo "make retrain       AOQ quintuplet-loss model                -> runs/DATA/AOQ_RUN/checkpoint.pt"
	@echo "                   ROUNDS=n: mine again with round r-1's model and retrain, n times"
	@echo "                   (default: the configs' rounds.count, 1; e.g. EXP=two_rounds)"
	@echo "                   (round r > 1: offcandi/DATA/round<r>, runs/DATA/AOQ_RUN_round<r>)"
	@echo "                   RETRAIN_INIT=miner: start from the model that mined (default:"
	@echo "                   the configs' rounds.retrain_init, scratch)"
	@echo "                   RETRAIN_SET='key=value ...': overrides for retrain only"
	@echo "                   RETRAIN_SET=offcandi.remine_every=N: re-mine every N epochs inside the run"
	@echo "make eval          R@K of CKPT (default: the AOQ model) on DATA's eval split (FOLD5=1: COCO 5-fold 1K)"
	@echo "make compare       base and AOQ side by side (the whole chain if needed)"
	@echo "                   a changed setting redoes the stages that read it; a finished run"
	@echo "                   refuses new settings: name the experiment with RUN= / AOQ_RUN="
	@echo "make f30k-all      the whole chain on f30k_precomp; coco-all likewise on coco_precomp"
	@echo "make export        CKPT's encoders as FORMAT=torchscript|onnx, checked -> <run>/export/FORMAT/"
	@echo "make bench         speed figures                            -> bench/results.json"
	@echo "make table         loss x offline negatives x batch size x seed, LOSSES='...' BATCHES='...'"
	@echo "                   SEEDS=n, TABLE_INIT=<checkpoint> (continue every cell from it)"
	@echo "                   -> runs/DATA/table/table.{md,csv,png}, pairs.csv (offline vs control)"
	@echo "variables: DATA=$(DATA) DATA_PATH=$(DATA_PATH) RUN=$(RUN) AOQ_RUN=$(AOQ_RUN)"
	@echo "           EXP=$(EXP) FOLD5=$(FOLD5)"
	@echo "           CKPT=$(CKPT) SET='section.key=value ...' TORCH=$(TORCH)"

# --- environment: a virtual environment made from nothing --------------------------------
# Installs only into a venv this checkout made (VENV/.aoq-checkout names it); another venv
# is used as it is if it has this checkout's package installed, else refused.
$(STAMP): setup.cfg pyproject.toml
	sh $(TOOLS)/venv.sh '$(VENV)' '$(PYTHON)' '$(TORCH)' '$@'

install: $(STAMP)

# --- checks ------------------------------------------------------------------------------
lint: $(STAMP)
	$(BIN)/ruff check stages tests tools

# TEST_WORKERS: pytest-xdist workers (auto: one per core; 0 runs the suite in this process).
TEST_WORKERS ?= auto
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# BENCH_ONLY=train_step,eval_5k runs some sections (into bench/results-<sections>.json);
# BENCH_ONLY=mining_scale (never run otherwise) mines 1M x 5M generated embeddings with
# IVF-PQ; BENCH_ARGS='--scale-images 100000 --scratch /big/disk' sets its size and folder.
BENCH_ONLY ?=
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python tools/bench.py $(if $(BENCH_ONLY),--only $(BENCH_ONLY) \
	    --out bench/results-$(subst $(comma),-,$(BENCH_ONLY)).json,--out bench/results.json) \
	    $(BENCH_ARGS)

# --- data: the features stage -------------------------------------------------------------
# A dataset folder needs captions/splits ({split}_caps.txt) and features ({split}_ims.npy
# from a precomp download, or {split}.h5). Missing ones are made from the sources given:
#   captions: KARPATHY=dataset_coco.json, or COCO_JSON='captions_train2014.json ...'
#             (with COCO_SPLITS='train=ids.txt ...')
#   features: TSV='trainval_36.tsv ...' (BUTD regions), or IMAGES=<image root> (CNN=resnet152)
# FEATURE_OPTS passes more options, e.g. FEATURE_OPTS='--dtype float16 --max-regions 100'.
KARPATHY ?=
COCO_JSON ?=
COCO_SPLITS ?=
TSV ?=
IMAGES ?=
CNN ?= resnet152
WEIGHTS ?= imagenet
FEATURE_OPTS ?=
ifeq ($(DATA),demo)
TRAIN_FEATURES := $(DATASET)/train_ims.npy
else
TRAIN_FEATURES := $(firstword $(wildcard $(DATASET)/train_ims.npy $(DATASET)/train.h5) \
	$(DATASET)/train.h5)
endif

$(DATA_PATH)/demo/train_caps.txt $(DATA_PATH)/demo/train_ims.npy &: | $(STAMP)
	$(AOQ) demo-data --out $(DATA_PATH)/demo

# CAPTION_OPTS: options of `aoq captions`, e.g. "--captions-per-image 0" (keep all of each
# image's captions; the default keeps the first 5, the benchmarks' protocol).
CAPTION_OPTS ?=
$(DATASET)/%_caps.txt: | $(STAMP)
ifneq ($(KARPATHY),)
	$(AOQ) captions --karpathy $(KARPATHY) $(CAPTION_OPTS) --out $(DATASET)
else ifneq ($(COCO_JSON),)
	$(AOQ) captions $(foreach j,$(COCO_JSON),--coco-json $(j)) \
	    $(foreach s,$(COCO_SPLITS),--split $(s)) $(CAPTION_OPTS) --out $(DATASET)
else
	@echo "error: $@ not found. Put the $(DATA) precomp folder under DATA_PATH=$(DATA_PATH)" \
	      "(see docs/data.md), point DATA_PATH at the folder that holds it, or" \
	      "make it with KARPATHY=dataset_<data>.json or COCO_JSON=captions_*.json." >&2
	@exit 1
endif

# The `aoq features` command of the sources given (none: features are taken as they are).
FEATURES_COMMAND := $(if $(TSV),tsv $(foreach t,$(TSV),--tsv $(t)) --dataset-dir $(DATASET) \
	$(FEATURE_OPTS),$(if $(IMAGES),cnn --images $(IMAGES) --dataset-dir $(DATASET) \
	--arch $(CNN) --weights $(WEIGHTS) $(FEATURE_OPTS)))

# train.h5 is written last of the splits: it stands for all of them. Its stamp (the
# settings stamps below) holds what the features command records in the files it writes:
# other settings than those of the features there run it, and it refuses them.
$(DATASET)/train.h5: $(DATASET)/train_caps.txt \
	    $(if $(FEATURES_COMMAND),$(SETTINGS)/features.yaml) | $(STAMP)
ifneq ($(FEATURES_COMMAND),)
	$(AOQ) features $(FEATURES_COMMAND)
else
	@echo "error: no features in $(DATASET): put the precomp {split}_ims.npy there, or" \
	      "make them with TSV=<BUTD .tsv files> or IMAGES=<image folder> (see docs/data.md)." >&2
	@exit 1
endif

features: $(DATASET)/train_caps.txt $(TRAIN_FEATURES)

# A model that reads raw images (its class's image_input is "pixels") trains on
# {split}_images.txt under IMAGES, not on features:
#   make train DATA=coco MODEL=vse_cnn IMAGES=/dl/coco KARPATHY=/dl/dataset_coco.json
# make asks the code which one a run reads, and only when it needs to know: see "a training
# run's input" at the end.
OVERRIDES += $(if $(IMAGES),--set data.images=$(IMAGES))

# `aoq captions` writes the image lists with the captions.
$(DATASET)/%_images.txt: | $(DATASET)/%_caps.txt
	@test -f $@ || { echo "error: $@ not found: models that read raw images need the image" \
	    "list \`aoq captions\` writes (KARPATHY= or COCO_JSON=, see docs/data.md)" >&2; exit 1; }
# The training split's list (a run's input when its model reads pixels) is named here, so
# that make takes it as the file it is, never as an intermediate file of its own to delete.
$(DATASET)/train_images.txt:

# --- settings stamps ---------------------------------------------------------------------
# Each stage's output depends on a stamp holding the resolved settings that stage reads
# (`aoq settings`), dated after the output when the stage recorded other settings for it
# (the stage writes that record beside its output, holding its folder's lock, once the
# output is complete; the features stage in its files): a changed setting redoes the
# stage (train and retrain then refuse to resume a finished run under another config: name
# another RUN / AOQ_RUN), one that resolves to the settings the output was made with
# redoes nothing. A stage refused by the lock of another process records nothing, so its
# settings are never taken as done. The check runs on every make, also under make -n
# (hence the +). Stamps are kept in runs/DATA/.settings/ (<run>.<stage>.yaml, vocab.yaml,
# features.yaml, table/), offcandi's beside its candidates.
# $(call stamp,STAGE,OUTPUT,EXTRA ARGUMENTS)
stamp = +@$(AOQ) settings --stage $(1) $(CONFIGS) $(OVERRIDES) $(3) --out $@ --target $(2)

FORCE:

# The vocabulary: make builds the dataset's own (DATASET/vocab.json, with its stamp). A
# VOCAB given is the user's file: an input, used as it is and never rebuilt, whatever its
# date (train refuses one built from other captions).
vocab: $(VOCAB)
ifeq ($(VOCAB),$(DATASET)/vocab.json)
$(VOCAB): $(DATASET)/train_caps.txt $(SETTINGS)/vocab.yaml | $(STAMP)
	$(AOQ) vocab $(CONFIGS) $(OVERRIDES)
$(SETTINGS)/vocab.yaml: FORCE | $(STAMP)
	$(call stamp,vocab,$(VOCAB))
else
$(VOCAB):
	@echo "error: VOCAB=$@ not found: give an existing vocabulary file (\`aoq vocab --out" \
	      "FILE\` makes one), or leave VOCAB out to build $(DATASET)/vocab.json" >&2
	@exit 1
endif

$(SETTINGS)/features.yaml: FORCE | $(STAMP)
	+@$(AOQ) settings --stage features --out $@ --target $(DATASET)/train.h5 \
	    -- $(FEATURES_COMMAND)

# --- stages ------------------------------------------------------------------------------
train: $(BASE_CKPT)
$(BASE_CKPT): $(VOCAB) $(RUN_DIR)/.train-input $(SETTINGS)/$(RUN).train.yaml | $(STAMP)
	$(AOQ_TRAIN) train $(CONFIGS) $(OVERRIDES) --run-dir $(RUN_DIR) --resume
$(SETTINGS)/$(RUN).train.yaml: FORCE | $(STAMP)
	$(call stamp,train,$(BASE_CKPT))
.SECONDARY: $(RUN_DIR)/.train-input

# Any run's training-split embeddings, from its checkpoint.
runs/$(DATA)/%/embeddings_train.h5: runs/$(DATA)/%/checkpoint.pt $(SETTINGS)/%.embed.yaml
	$(AOQ) embed --ckpt $< $(OVERRIDES) --out $@
$(SETTINGS)/%.embed.yaml: FORCE | $(STAMP)
	$(call stamp,embed,runs/$(DATA)/$*/embeddings_train.h5)
.PRECIOUS: $(SETTINGS)/%.embed.yaml

embed: $(EMBEDDINGS)

# Mining and retraining, once per round. Round 1 mines with the base model into
# offcandi/DATA and trains runs/DATA/AOQ_RUN; round r > 1 mines with round r-1's model into
# offcandi/DATA/round<r> and trains runs/DATA/AOQ_RUN_round<r>. i2t.h5 is written before
# t2i.h5, each atomically: t2i.h5 stands for both (mining records its settings once both
# are written, so a mining stopped between the two is redone).
#
# MINER: what mines round 1: the base model (default), another run of DATA (MINER=<run
# name>: runs/DATA/<name>/checkpoint.pt), a pretrained sentence encoder over the captions
# (MINER=text:<model folder>, embedded by `aoq embed-text` into runs/DATA/text-<folder
# name>/), or a pretrained open_clip model over the images (IMAGES, the raw images) and
# captions (MINER=clip:<arch>:<weights file>, embedded by `aoq embed-clip` into
# runs/DATA/clip-<arch>-<weights file name>/); its candidates go to OFFCANDI_DIR/miner-<name>.
MINER ?=
text_miner = $(patsubst text:%,%,$(filter text:%,$(MINER)))
clip_miner = $(patsubst clip:%,%,$(filter clip:%,$(MINER)))
clip_arch = $(firstword $(subst :, ,$(clip_miner)))
clip_weights = $(patsubst $(clip_arch):%,%,$(clip_miner))
# Trained by none of this project's runs: no checkpoint to check or to start from.
pretrained_miner = $(text_miner)$(clip_miner)
miner_name = $(strip $(if $(text_miner),text-$(notdir $(patsubst %/,%,$(text_miner))),\
	$(if $(clip_miner),clip-$(patsubst %.json,%,$(notdir $(clip_arch)))-$(basename \
	$(notdir $(clip_weights))),$(MINER))))
ifneq ($(MINER),)
ifeq ($(pretrained_miner),)
$(call a_name,MINER)
endif
$(if $(filter 1,$(words $(MINER))),,$(error MINER='$(MINER)': give one run name, \
	text:<folder> or clip:<arch>:<weights file>))
$(if $(and $(clip_miner),$(if $(and $(filter $(clip_arch):%,$(clip_miner)),$(clip_weights)),,no)),\
	$(error MINER='$(MINER)': give the open_clip miner as clip:<arch>:<weights file>))
$(if $(and $(pretrained_miner),$(filter miner,$(RETRAIN_INIT))),$(error RETRAIN_INIT=miner \
	needs a trained miner, and MINER=$(MINER) is a pretrained model: use RETRAIN_INIT=scratch))
endif
round_name = $(AOQ_RUN)$(if $(filter-out 1,$(1)),_round$(1))
round_run = runs/$(DATA)/$(call round_name,$(1))
round_offcandi = $(OFFCANDI_DIR)$(if $(filter-out 1,$(1)),/round$(1),$(if $(MINER),/miner-$(miner_name)))
round_miner = $(strip $(if $(filter-out 1,$(1)),$(call round_run,$(shell expr $(1) - 1)),\
	$(if $(MINER),runs/$(DATA)/$(miner_name),$(RUN_DIR))))
# What retraining checks its candidates were mined by: a checkpoint, text:<folder> or
# clip:<arch>:<weights file>.
round_miner_ckpt = $(strip $(if $(and $(pretrained_miner),$(filter 1,$(1))),$(MINER),\
	$(call round_miner,$(1))/checkpoint.pt))
# The retrain stage's settings beyond CONFIGS, OVERRIDES and RETRAIN_SET, for round $(1).
retrain_args = --set offcandi.dir=$(call round_offcandi,$(1)) \
	--set offcandi.base_ckpt=$(call round_miner_ckpt,$(1)) \
	$(if $(filter miner,$(RETRAIN_INIT)),--set train.init_from=$(call round_miner,$(1))/checkpoint.pt)

# The text miner's embeddings: embed-text runs on every make and rewrites them only when
# the model's weights or the captions changed (so a changed model folder mines again).
ifneq ($(text_miner),)
runs/$(DATA)/$(miner_name)/embeddings_train.h5: $(DATASET)/train_caps.txt FORCE | $(STAMP)
	$(AOQ) embed-text --text-model $(text_miner) $(CONFIGS) $(OVERRIDES) --out $@
endif
# The open_clip miner's likewise, rewritten only when the architecture, the weights file,
# the captions or the images changed.
ifneq ($(clip_miner),)
runs/$(DATA)/$(miner_name)/embeddings_train.h5: $(DATASET)/train_images.txt FORCE | $(STAMP)
	$(AOQ) embed-clip --arch $(clip_arch) --weights $(clip_weights) $(CONFIGS) $(OVERRIDES) \
	    --out $@
endif

define ROUND_RULES
$(call round_offcandi,$(1))/t2i.h5: $(call round_miner,$(1))/embeddings_train.h5 \
	    $(call round_offcandi,$(1))/.settings.offcandi.yaml
	$$(AOQ) offcandi --embeddings $$< $$(CONFIGS) $$(OVERRIDES) --out-dir $(call round_offcandi,$(1))
$(call round_offcandi,$(1))/.settings.offcandi.yaml: FORCE | $$(STAMP)
	$$(call stamp,offcandi,$(call round_offcandi,$(1))/t2i.h5)

$(call round_run,$(1))/checkpoint.pt: $(SETTINGS)/$(call round_name,$(1)).retrain.yaml \
	    $(call round_offcandi,$(1))/t2i.h5
	$$(AOQ_TRAIN) retrain $$(CONFIGS) $$(OVERRIDES) $$(call retrain_args,$(1)) \
	    $$(foreach s,$$(RETRAIN_SET),--set $$(s)) --run-dir $(call round_run,$(1)) --resume
$(SETTINGS)/$(call round_name,$(1)).retrain.yaml: FORCE | $$(STAMP)
	$$(call stamp,retrain,$(call round_run,$(1))/checkpoint.pt,$$(call retrain_args,$(1)) \
	    $$(foreach s,$$(RETRAIN_SET),--retrain-set $$(s)))
endef
ROUND_NUMBERS := $(shell seq 1 $(ROUNDS))
$(foreach r,$(ROUND_NUMBERS),$(eval $(call ROUND_RULES,$(r))))
$(if $(filter $(RUN),$(foreach r,$(ROUND_NUMBERS),$(call round_name,$(r)))),$(error \
	RUN=$(RUN) and AOQ_RUN=$(AOQ_RUN) would train into the same run folder: name them apart))

offcandi: $(call round_offcandi,$(ROUNDS))/t2i.h5
retrain: $(AOQ_CKPT)

eval: $(CKPT) | $(STAMP)
	$(AOQ) eval $(foreach c,$(CKPT),--ckpt $(c)) $(CONFIGS) $(OVERRIDES) --set eval.fold5=$(FOLD5)

compare: $(BASE_CKPT) $(ROUND_CKPTS)
	$(AOQ) eval --each $(foreach c,$(BASE_CKPT) $(ROUND_CKPTS),--ckpt $(c)) $(CONFIGS) $(OVERRIDES) \
	    --set eval.fold5=$(FOLD5)
	$(AOQ) plot $(foreach r,$(ROUND_NUMBERS),--embeddings $(call round_miner,$(r))/embeddings_train.h5 \
	    --candidates $(call round_offcandi,$(r))) $(CONFIGS) $(OVERRIDES) \
	    $(foreach s,$(RETRAIN_SET),--set $(s)) --out-dir runs/$(DATA)/compare

# --- export: a checkpoint's encoders for deployment (CKPT: one checkpoint, FORMAT) --------
# runs/DATA/RUN/export/FORMAT/ (written whole or not at all; export.json stands for it),
# redone when the checkpoint changes.
FORMAT ?= torchscript
$(call one_of,FORMAT,torchscript onnx)
EXPORT_DIR = $(dir $(firstword $(CKPT)))export/$(FORMAT)

export: $(EXPORT_DIR)/export.json
$(EXPORT_DIR)/export.json: $(firstword $(CKPT)) | $(STAMP)
	$(if $(filter 1,$(words $(CKPT))),,$(error CKPT='$(CKPT)': make export takes one checkpoint))
	$(AOQ) export --ckpt $< --format $(FORMAT) --out $(@D) --force $(foreach s,$(SET),--set $(s))

f30k-all:
	$(MAKE) --no-print-directory compare DATA=f30k_precomp

coco-all:
	$(MAKE) --no-print-directory compare DATA=coco_precomp FOLD5=1

demo:
	$(MAKE) --no-print-directory demo-compare DATA=demo EXP=demo DATA_PATH=data

clean-demo:
	rm -rf data/demo runs/demo offcandi/demo

# --- make demo: the base model, then each offline-negative run beside its matched control,
# all continued from the base for DEMO_EPOCHS more epochs: AOQ beside VSE++ without offline
# negatives (base_plus<n>, the loss AOQ adds its terms to), DEMO_OTHER_LOSS with offline
# negatives beside the same loss without them.
DEMO_EPOCHS ?= 3
# The loss trained with offline negatives beside AOQ in the demo (and without them: its
# control), so a loss that also trains without them.
DEMO_OTHER_LOSS ?= infonce
$(if $(filter aoq offquin offtri,$(DEMO_OTHER_LOSS)),$(error DEMO_OTHER_LOSS=$(DEMO_OTHER_LOSS) \
	needs offline negatives, so it has no control of its own; the demo already shows AOQ \
	beside VSE++: give a loss that also trains without them, e.g. infonce))
demo_run = runs/$(DATA)/$(model_prefix)$(1)_plus$(DEMO_EPOCHS)
DEMO_CKPTS = $(BASE_CKPT) $(foreach r,base aoq $(DEMO_OTHER_LOSS) $(DEMO_OTHER_LOSS)_offline,\
	$(call demo_run,$(r))/checkpoint.pt)
DEMO_CONTINUE = --set train.init_from=$(BASE_CKPT) --set train.epochs=$(DEMO_EPOCHS) --resume

$(call demo_run,base)/checkpoint.pt: $(BASE_CKPT)
	$(AOQ) train $(CONFIGS) $(OVERRIDES) $(DEMO_CONTINUE) --run-dir $(@D)

$(call demo_run,$(DEMO_OTHER_LOSS))/checkpoint.pt: $(BASE_CKPT)
	$(AOQ) train $(CONFIGS) $(OVERRIDES) --set loss.name=$(DEMO_OTHER_LOSS) $(DEMO_CONTINUE) \
	    --run-dir $(@D)

define DEMO_OFFLINE_RULE
$(call demo_run,$(1))/checkpoint.pt: $(OFFCANDI_DIR)/t2i.h5
	$$(AOQ) retrain $$(CONFIGS) $$(OVERRIDES) --set loss.name=$(2) --set offcandi.dir=$$(OFFCANDI_DIR) \
	    --set offcandi.base_ckpt=$$(BASE_CKPT) $$(DEMO_CONTINUE) --run-dir $$(@D)
endef
$(eval $(call DEMO_OFFLINE_RULE,aoq,aoq))
$(eval $(call DEMO_OFFLINE_RULE,$(DEMO_OTHER_LOSS)_offline,$(DEMO_OTHER_LOSS)))

demo-compare: $(DEMO_CKPTS)
	@echo "base: the base model; *_plus$(DEMO_EPOCHS): the base model trained $(DEMO_EPOCHS) more" \
	      "epochs each. Matched pairs (same loss family, init and epochs; only the offline" \
	      "negatives differ): aoq_plus$(DEMO_EPOCHS) vs its control base_plus$(DEMO_EPOCHS)" \
	      "(VSE++), $(DEMO_OTHER_LOSS)_offline_plus$(DEMO_EPOCHS) vs its control" \
	      "$(DEMO_OTHER_LOSS)_plus$(DEMO_EPOCHS)"
	$(AOQ) eval --each $(foreach c,$(DEMO_CKPTS),--ckpt $(c)) $(CONFIGS) $(OVERRIDES) \
	    --set eval.fold5=$(FOLD5)

# --- make table: loss x offline negatives (no/yes) x batch size x seed -------------------
# One run per cell with the same settings (the "on" cells with `aoq train --set
# train.offline_negatives=true`, not retrain's schedule), in
# runs/DATA/table/<loss>-<off|on>-b<batch>[-s<seed>]/ (checkpoint.pt, eval.jsonl), each
# trained with train.seed 0..SEEDS-1, from scratch or (TABLE_INIT=<checkpoint>) all
# continued from one checkpoint, into runs/DATA/table-from-<its run>/. "on" cells train
# with candidates mined by TABLE_INIT (into offcandi/DATA/table-<its run>), else by the
# TABLE_MINER cell without offline negatives of the same batch size (seed 0, into
# offcandi/DATA/table-b<batch>), or by MINER when given (a run, or text:<model folder>: into
# offcandi/DATA/table-miner-<name>; a TABLE_DIR of its own: table-<its path under runs/DATA,
# / as ->-<source>); losses that need offline negatives (aoq, offquin, offtri)
# only get an "on" cell, and their matched control (vse_max's "off" cell) is always planned
# (`aoq table --plan` lists the cells). Every cell file is a target, so a killed `make
# table` continues. Each cell's training and evaluation, and the mining, have settings
# stamps as the chain's stages do: other settings (CONFIGS, SET, TABLE_SET, FOLD5) redo
# what reads them (training then refuses to resume a cell made with other settings, saying
# how to start the table over), and going back to the settings the table was made with
# redoes nothing. TABLE_DIR may be given to keep two experiments apart. TABLE_SET:
# overrides for the table's runs only; TABLE_SET_<loss> (say TABLE_SET_aoq=
# 'loss.offline_weight=0.5'): overrides for that loss's cells only (its control is another
# loss's cell: give that loss's own TABLE_SET_<loss> to keep the pair matched; for
# TABLE_MINER's loss only with TABLE_INIT or MINER, as its cell mines otherwise).
LOSSES ?= vse_max infonce aoq
BATCHES ?= 128
SEEDS ?= 1
$(call positive_int,SEEDS)
TABLE_MINER ?= vse_max
TABLE_SET ?=
TABLE_INIT ?=
table_init_run = $(notdir $(patsubst %/,%,$(dir $(TABLE_INIT))))
TABLE_DIR_DEFAULT = runs/$(DATA)/$(model_prefix)table$(if $(TABLE_INIT),-from-$(table_init_run))
TABLE_DIR = $(TABLE_DIR_DEFAULT)
# A TABLE_DIR of its own mines into candidate folders of its own (its name before the
# source's), so two tables never re-mine each other's candidates: another table's mining
# settings (TABLE_SET) or miner would change the files the first one's cells were made with.
table_own = $(if $(filter $(TABLE_DIR_DEFAULT),$(patsubst %/,%,$(TABLE_DIR))),,$(strip \
	$(subst /,-,$(patsubst runs/$(DATA)/%,%,$(patsubst %/,%,$(TABLE_DIR)))))-)
TABLE_SETTINGS = $(SETTINGS)/$(subst /,-,$(patsubst runs/$(DATA)/%,%,$(TABLE_DIR)))
TABLE_OVERRIDE_ARGS = $(foreach s,$(TABLE_SET),--set $(s))
TABLE_OVERRIDES = $(OVERRIDES) $(TABLE_OVERRIDE_ARGS)
TABLE_MAKEFILE := $(firstword $(MAKEFILE_LIST))
TABLE_ARGS = --dir $(TABLE_DIR) --losses '$(LOSSES)' --batches '$(BATCHES)' \
	--miner $(TABLE_MINER) --seeds $(SEEDS) $(if $(TABLE_INIT),--init $(TABLE_INIT)) \
	$(if $(MINER),--mined-by $(call round_miner_ckpt,1))
TABLE_REFUSED = a table holds one experiment: delete $(TABLE_DIR) to train it with these \
	settings, give the settings it was made with, or another TABLE_DIR
ifneq ($(filter table table-files,$(MAKECMDGOALS)),)
$(if $(findstring train.seed=,$(SET) $(TABLE_SET)),$(error make table sets train.seed \
	per cell (SEEDS=n trains seeds 0..n-1): drop train.seed from SET / TABLE_SET))
$(if $(TABLE_INIT),$(if $(filter runs/$(DATA)/%/checkpoint.pt,$(TABLE_INIT)),,$(error \
	TABLE_INIT='$(TABLE_INIT)': give one run's runs/$(DATA)/<run>/checkpoint.pt (its \
	embeddings are made beside it)))$(if $(filter-out 1,$(words $(TABLE_INIT))),$(error \
	TABLE_INIT='$(TABLE_INIT)': give one checkpoint)))
$(if $(filter runs/$(DATA)/%,$(TABLE_DIR)),,$(error TABLE_DIR='$(TABLE_DIR)': give a \
	folder under runs/$(DATA)/ (its cells' embeddings are made there)))
$(foreach v,$(filter TABLE_SET_%,$(.VARIABLES)),$(if $(filter $(patsubst TABLE_SET_%,%,$(v)),\
	$(LOSSES) vse_max),,$(error $(v) is given, but LOSSES='$(LOSSES)' has no loss \
	$(patsubst TABLE_SET_%,%,$(v)) (nor is it a control): name a loss of LOSSES))$(if \
	$(filter-out loss.%,$($(v))),$(error $(v)='$($(v))': only loss.* settings go there; \
	the others go in TABLE_SET, for every cell))$(if $(filter loss.name=%,$($(v))),$(error \
	$(v) may not rename the loss: its cells train $(patsubst TABLE_SET_%,%,$(v))))$(if \
	$(and $(filter TABLE_SET_$(TABLE_MINER),$(v)),$(if $(or $(TABLE_INIT),$(MINER)),,1)),\
	$(error $(v) would change the miner (the $(TABLE_MINER) cell without offline negatives \
	mines every "on" cell's candidates): give TABLE_INIT or MINER, or leave it out)))
endif

table: | $(STAMP)
	cells=$$($(AOQ) table --plan $(TABLE_ARGS)) && \
	    $(MAKE) -f $(TABLE_MAKEFILE) --no-print-directory table-files TABLE_CELLS="$$cells"

ifneq ($(TABLE_CELLS),)
table_part = $(word $(2),$(subst -, ,$(1)))
table_batch = $(patsubst b%,%,$(call table_part,$(1),3))
table_seed = $(patsubst s%,%,$(or $(call table_part,$(1),4),s0))
# The candidates and what mined them (a checkpoint, or text:<folder>), for batch size $(1):
# MINER when given, else TABLE_INIT, else the TABLE_MINER cell of that batch size.
table_source = $(strip $(if $(MINER),miner-$(miner_name),\
	$(if $(TABLE_INIT),$(table_init_run),b$(1))))
table_offcandi = $(OFFCANDI_DIR)/table-$(table_own)$(call table_source,$(1))
table_miner_ckpt = $(strip $(if $(MINER),$(call round_miner_ckpt,1),\
	$(or $(TABLE_INIT),$(TABLE_DIR)/$(TABLE_MINER)-off-b$(1)/checkpoint.pt)))
table_miner_dir = $(if $(MINER),$(call round_miner,1),$(patsubst %/,%,$(dir $(call table_miner_ckpt,$(1)))))
# The training settings of cell $(1) beyond CONFIGS and TABLE_OVERRIDES. A cell without
# offline negatives has none to re-mine: TABLE_SET's offcandi.remine_every is for the others.
table_cell_args = --set loss.name=$(call table_part,$(1),1) \
	$(foreach s,$(TABLE_SET_$(call table_part,$(1),1)),--set $(s)) \
	--set train.batch_size=$(call table_batch,$(1)) --set train.seed=$(call table_seed,$(1)) \
	$(if $(TABLE_INIT),--set train.init_from=$(TABLE_INIT)) \
	$(if $(filter on,$(call table_part,$(1),2)),--set train.offline_negatives=true \
	--set offcandi.dir=$(call table_offcandi,$(call table_batch,$(1))) \
	--set offcandi.base_ckpt=$(call table_miner_ckpt,$(call table_batch,$(1))),\
	--set offcandi.remine_every=0 --set offcandi.group_size=0)

define TABLE_CELL_RULES
$(TABLE_DIR)/$(1)/checkpoint.pt: $(TABLE_SETTINGS)/$(1).train.yaml $(TABLE_INIT) \
	    $(if $(filter on,$(call table_part,$(1),2)),$(call table_offcandi,$(call table_batch,$(1)))/t2i.h5,$(VOCAB) $(TABLE_DIR)/$(1)/.train-input) | $(STAMP)
	$$(AOQ) train $$(CONFIGS) $$(TABLE_OVERRIDES) $(call table_cell_args,$(1)) \
	    --run-dir $(TABLE_DIR)/$(1) --resume --refused-hint '$$(TABLE_REFUSED)'
.SECONDARY: $(TABLE_DIR)/$(1)/.train-input
$(TABLE_SETTINGS)/$(1).train.yaml: FORCE | $(STAMP)
	$$(call stamp,train,$(TABLE_DIR)/$(1)/checkpoint.pt,$$(TABLE_OVERRIDE_ARGS) $(call table_cell_args,$(1)))

$(TABLE_DIR)/$(1)/eval.jsonl: $(TABLE_DIR)/$(1)/checkpoint.pt $(TABLE_SETTINGS)/$(1).eval.yaml
	$$(AOQ) eval --ckpt $$< $$(CONFIGS) $$(TABLE_OVERRIDES) --set eval.fold5=$$(FOLD5) --ranks \
	    --out $$@
$(TABLE_SETTINGS)/$(1).eval.yaml: FORCE | $(STAMP)
	$$(call stamp,eval,$(TABLE_DIR)/$(1)/eval.jsonl,$$(TABLE_OVERRIDE_ARGS) --set eval.fold5=$$(FOLD5))
endef

define TABLE_MINING_RULES
$(call table_offcandi,$(1))/t2i.h5: $(call table_miner_dir,$(1))/embeddings_train.h5 \
	    $(call table_offcandi,$(1))/.settings.offcandi.yaml
	$$(AOQ) offcandi --embeddings $$< $$(CONFIGS) $$(TABLE_OVERRIDES) --out-dir $$(@D)
$(call table_offcandi,$(1))/.settings.offcandi.yaml: FORCE | $(STAMP)
	$$(call stamp,offcandi,$(call table_offcandi,$(1))/t2i.h5,$$(TABLE_OVERRIDE_ARGS))
endef

$(foreach c,$(sort $(TABLE_CELLS) $(foreach b,$(BATCHES),$(TABLE_MINER)-off-b$(b))),\
	$(eval $(call TABLE_CELL_RULES,$(c))))
$(foreach b,$(if $(or $(MINER),$(TABLE_INIT)),$(firstword $(BATCHES)),$(BATCHES)),\
	$(eval $(call TABLE_MINING_RULES,$(b))))
endif

table-files: $(foreach c,$(TABLE_CELLS),$(TABLE_DIR)/$(c)/eval.jsonl) | $(STAMP)
	$(AOQ) table $(TABLE_ARGS)

.PHONY: demo-compare table table-files

# --- a training run's input: what its model reads ----------------------------------------
# A run's checkpoint depends on <run folder>/.train-input, a file never made: a secondary
# target (make leaves it alone unless what it depends on is newer than the checkpoint)
# depending on the input the model reads: the split's image list when the model class's
# image_input is "pixels", else its features. make asks the code (`aoq model-input`: the
# config's model, from the options cache, without torch) once per call, and only when a
# run's rule is considered (.train-input's prerequisites are expanded a second time, when
# make looks for its rule; `make help` or `make features` never ask). From a fresh clone there
# is no aoq to ask yet: the input then waits for the environment and is made by a make of its
# own, which can ask. MODEL_INPUT=features|pixels on the command line answers instead.
MODEL_INPUT = $(eval MODEL_INPUT := $(shell if command -v $(firstword $(AOQ)) >/dev/null; \
	then $(AOQ) model-input $(CONFIGS) $(OVERRIDES) || echo failed; else echo unknown; fi))$(MODEL_INPUT)
train_input = $(if $(filter pixels,$(MODEL_INPUT)),$(DATASET)/train_images.txt,$(if \
	$(filter features,$(MODEL_INPUT)),$(TRAIN_FEATURES),$(if $(filter unknown,$(MODEL_INPUT)),\
	$(if $(MODEL_INPUT_AFTER_SETUP),,$(STAMP)),$(error MODEL=$(MODEL): cannot tell whether \
	its model reads features or pixels: `$(AOQ) model-input` $(if $(filter failed,\
	$(MODEL_INPUT)),failed (its message is above),said '$(MODEL_INPUT)')))))

# The input includes the split's ids file when there is one (it decides which image owns
# each caption). It is never made here, but a dataset made earlier in the same make call
# (the demo's) is not in make's cache of the folder: this rule stands for it there.
$(DATASET)/train_ids.txt: ;

# Before the environment exists: a make of its own makes the input, once it does (with a
# note instead when it still has no aoq, as under make -n).
.SECONDEXPANSION:
%/.train-input: $$(train_input) $$(wildcard $$(DATASET)/train_ids.txt)
	$(if $(filter unknown,$(MODEL_INPUT)),+$(MAKE) -f $(firstword $(MAKEFILE_LIST)) \
	    --no-print-directory train-input-after-setup MODEL_INPUT_AFTER_SETUP=1)

ifneq ($(MODEL_INPUT_AFTER_SETUP),)
.PHONY: train-input-after-setup
train-input-after-setup: $$(train_input)
	$(if $(filter unknown,$(MODEL_INPUT)),@echo "note: no $(AOQ) to ask what MODEL=$(MODEL)" \
	    "reads: its training input is not made first" >&2,@:)
endif
