# dive: offline logit-caching distillation for long-tailed recognition.
#
# What makes a stage run: its manifest.json is missing. Nothing else does.
# - A stage's run folder is its identity: `python3 -m stages.paths` turns the stage's resolved settings into a
#   readable name plus a hash of what differs from the defaults (the CLI uses the same function). Other
#   settings give another folder, so Make runs that stage; the same settings, however spelled, give the same
#   folder, so a complete stage is never redone.
# - Upstream stages are order-only prerequisites: a student needs its cache to exist, but a newer cache file,
#   an edited stage script or a reinstalled venv never retrains a teacher or re-dumps a cache. To redo a
#   stage, delete its folder.
# - A killed stage has no manifest, so Make reruns it, and the stage resumes from what it had written.
# - Each stage takes only its own variables (below). Student variables cannot reach the teacher or the cache.
#   `make plan` (or `make -n`) shows what would run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# --- data (the teacher's split, which its cache and students inherit) ---
DATASET   ?= fmnist-lt
IF        ?= 100
CLASSES   ?=
DATA_ROOT ?=
# --- teacher ---
LOSS            ?= bsce
TEACHER_SEED    ?= 0
TEACHER_EPOCHS  ?=
TEACHER_LR      ?=
TEACHER_BATCH   ?=
TEACHER_MODEL   ?=
TEACHER_EXPERTS ?=
TEACHER_SET     ?=
# --- cache ---
VIEWS     ?=
CODEC     ?=
CACHE_SET ?=
PLAN      ?=
REPAIR    ?=
CACHE_URL ?=
REPLAY    ?=
# --- student ---
TAU             ?=
POWER           ?=
ALPHA           ?=
MODE            ?= cached
STUDENT_SEED    ?= 0
STUDENT_EPOCHS  ?=
STUDENT_LR      ?=
STUDENT_BATCH   ?=
STUDENT_MODEL   ?=
STUDENT_EXPERTS ?=
STUDENT_SET     ?=
# --- runtime: recorded in each manifest, never part of a run's identity ---
DEVICE    ?= auto
NPROC     ?= 1
NNODES    ?= 1
RDZV      ?=
LOCAL_ADDR ?=
WORKERS   ?=
# --- where things go ---
RUNS      ?= runs
PYTHON    ?= python3
VENV      ?= .venv
# --- inspect ---
AT        ?= 1,1 3,0.5
FLATNESS  ?=
# --- flatness (two-class experiment): Fashion-MNIST classes, default T-shirt/top (0) vs Bag (8) ---
HEAD_CLASS ?= 0
TAIL_CLASS ?= 8
# --- sweep grid (students of one cache) ---
TAUS      ?= 1 2 3 6 9
POWERS    ?= 0.5 1
SEEDS     ?= 0

# glibc's allocator slows torch 1.2-2.5x on small CPUs; these must be set before Python starts.
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 1073741824
export MALLOC_TOP_PAD_ := 1073741824

# Variables of the old single recipe reached every stage at once (EPOCHS= retrained the teacher for a student).
define AMBIGUOUS
$(if $(filter command line,$(origin $(1))),$(error $(1)= no longer exists: it would reach more than one stage. Use TEACHER_$(1)= for the teacher or STUDENT_$(1)= for a student$(if $(filter SET,$(1)), (or CACHE_SET= for the cache))))
endef
$(foreach v,EPOCHS LR BATCH MODEL EXPERTS SET,$(call AMBIGUOUS,$(v)))
$(if $(filter command line,$(origin SEED)),$(error SEED= no longer exists: use TEACHER_SEED= for the teacher or STUDENT_SEED= for a student))
$(if $(filter command line,$(origin NAME)),$(error NAME= no longer exists: a student's folder is named by its settings; use `dive student --out FOLDER` for a folder of your own))

kv = $(if $(2),$(1)=$(2))
RUNTIME_KV := $(call kv,workers,$(WORKERS))
TEACHER_KV := loss=$(LOSS) seed=$(TEACHER_SEED) imbalance=$(IF) $(call kv,classes,$(CLASSES)) \
              $(call kv,epochs,$(TEACHER_EPOCHS)) \
              $(call kv,lr,$(TEACHER_LR)) $(call kv,batch_size,$(TEACHER_BATCH)) $(call kv,model,$(TEACHER_MODEL)) \
              $(call kv,experts,$(TEACHER_EXPERTS)) $(TEACHER_SET) $(RUNTIME_KV)
CACHE_KV   := $(call kv,views,$(VIEWS)) $(call kv,codec,$(CODEC)) $(CACHE_SET) $(RUNTIME_KV)
STUDENT_KV := seed=$(STUDENT_SEED) mode=$(MODE) $(call kv,tau,$(TAU)) $(call kv,power,$(POWER)) \
              $(call kv,alpha,$(ALPHA)) $(call kv,epochs,$(STUDENT_EPOCHS)) $(call kv,lr,$(STUDENT_LR)) \
              $(call kv,batch_size,$(STUDENT_BATCH)) $(call kv,model,$(STUDENT_MODEL)) \
              $(call kv,experts,$(STUDENT_EXPERTS)) $(STUDENT_SET) $(RUNTIME_KV)
PATH_ARGS  := --runs $(RUNS) --dataset $(DATASET) $(foreach kv,$(TEACHER_KV),--teacher $(kv)) \
              $(foreach kv,$(CACHE_KV),--cache $(kv)) $(foreach kv,$(STUDENT_KV),--student $(kv))

# The three run folders, from the same function the CLI uses (the system Python: no venv needed to read them).
RUN_DIRS := $(shell $(PYTHON) -m stages.paths $(PATH_ARGS))
$(if $(filter error:,$(firstword $(RUN_DIRS))),$(error $(RUN_DIRS)))
TEACHER_DIR := $(word 1,$(RUN_DIRS))
CACHE_DIR   := $(word 2,$(RUN_DIRS))
STUDENT_DIR := $(word 3,$(RUN_DIRS))
TAG         := $(patsubst $(RUNS)/%,%,$(patsubst %/,%,$(dir $(TEACHER_DIR))))
ROOT_ARG    := $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

STAMP := $(VENV)/.installed
# One process, torchrun on this machine (NPROC=), or torchrun over NNODES machines that meet at RDZV=host:port
# (c10d rendezvous: ranks go to nodes as they arrive). LOCAL_ADDR= is the address this node is reached at, where
# its hostname does not resolve to it.
TORCHRUN := $(if $(filter 1,$(NNODES)),--standalone,--nnodes=$(NNODES) --rdzv_backend=c10d --rdzv_endpoint=$(RDZV) \
            --rdzv_id=dive-$(DATASET) $(if $(LOCAL_ADDR),--local_addr=$(LOCAL_ADDR)))
DIVE  := $(if $(filter 1/1,$(NPROC)/$(NNODES)),$(VENV)/bin/python -m stages.cli,$(VENV)/bin/torchrun $(TORCHRUN) \
         --nproc_per_node=$(NPROC) -m stages.cli)
sets   = $(foreach kv,$(1),--set $(kv))

# The embedded datasets' inputs come from Debian's packages unless DATA_ROOT points elsewhere: Fashion-MNIST's
# files, and the CJK fonts glyph-lt is rendered from (once, into ~/.cache/dive/glyph-lt or DATA_ROOT).
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FONTS  := /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc
FONT_PACKAGES := fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-ipafont-gothic fonts-ipafont-mincho \
                 fonts-wqy-microhei fonts-wqy-zenhei
EMBEDDED := $(if $(filter fmnist-lt,$(DATASET)),$(FMNIST))$(if $(filter glyph-lt,$(DATASET)),$(FONTS))
DATA_DEP := $(if $(DATA_ROOT),,$(EMBEDDED))

.PHONY: help plan install test teacher cache student sweep report verify inspect flatness tsne samples shift-eval bench-cache bench-codecs bench-loader bench-student rehearsal glyph-study views-study codec-study gpu-check clean-venv

help: ## list the targets and variables
	@echo "dive: make TARGET [VAR=value ...]"
	@echo
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 18
	@echo
	@echo "Variables (current value). Each reaches one stage only:"
	@echo "  data     DATASET=$(DATASET) (fmnist-lt | glyph-lt | cifar100-lt | imagenet-lt | inat2018)  IF=$(IF)  CLASSES=$(CLASSES) (glyph-lt)  DATA_ROOT=$(DATA_ROOT)"
	@echo "  teacher  LOSS=$(LOSS) (bsce | ce)  TEACHER_SEED=$(TEACHER_SEED)  TEACHER_EPOCHS TEACHER_LR TEACHER_BATCH"
	@echo "           TEACHER_MODEL (ride: RIDE experts)  TEACHER_EXPERTS  TEACHER_SET=\"key=value ...\""
	@echo "  cache    VIEWS (V)  CODEC (float16 | int8 | topk | sampled)  CACHE_SET=\"key=value ...\" (topk=K, batch_size=: the dump's batch)  PLAN=1 (size only)"
	@echo "  student  TAU POWER ALPHA  MODE=$(MODE) (cached | online)  STUDENT_SEED=$(STUDENT_SEED)  STUDENT_EPOCHS"
	@echo "           STUDENT_LR STUDENT_BATCH STUDENT_MODEL STUDENT_EXPERTS STUDENT_SET=\"key=value ...\""
	@echo "  runtime  DEVICE=$(DEVICE) (auto | cpu | cuda)  NPROC=$(NPROC) (torchrun processes)  WORKERS (decode threads)"
	@echo "  sweep    TAUS=\"$(TAUS)\" POWERS=\"$(POWERS)\" SEEDS=\"$(SEEDS)\" (student seeds)"
	@echo "  inspect  AT=\"$(AT)\" FLATNESS=   RUNS=$(RUNS)"
	@echo "Each stage's keys: .venv/bin/dive recipe --dataset $(DATASET)"
	@echo
	@echo "Folders now (make plan: their settings and state):"
	@echo "  teacher $(TEACHER_DIR)"
	@echo "  cache   $(CACHE_DIR)"
	@echo "  student $(STUDENT_DIR)"

plan: ## show each stage's folder, whether it is complete or would run, and what differs from the defaults
	@$(PYTHON) -m stages.paths --show $(PATH_ARGS)

install: $(STAMP) ## make the virtual environment (.venv) and install the project into it

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(FMNIST):
	@echo "Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist (or set DATA_ROOT=)"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
$(FONTS):
	@echo "glyph-lt's CJK fonts are missing: installing $(FONT_PACKAGES)"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FONT_PACKAGES)

$(TEACHER_DIR)/manifest.json: | $(STAMP) $(DATA_DEP)
	$(DIVE) teacher --dataset $(DATASET) $(call sets,$(TEACHER_KV)) $(ROOT_ARG) --device $(DEVICE) --runs $(RUNS)

teacher: $(TEACHER_DIR)/manifest.json ## train the teacher (Balanced Softmax; LOSS=ce for the CE baseline)

URL_ARG := $(if $(CACHE_URL),--store-url $(CACHE_URL))
$(CACHE_DIR)/manifest.json: | $(TEACHER_DIR)/manifest.json
	$(DIVE) cache --teacher $(TEACHER_DIR) $(call sets,$(CACHE_KV)) $(ROOT_ARG) --device $(DEVICE) $(URL_ARG)

ifneq ($(REPAIR),)
cache: | $(TEACHER_DIR)/manifest.json # REPAIR=1: check every chunk, re-dump the damaged shards
	$(DIVE) cache --teacher $(TEACHER_DIR) $(call sets,$(CACHE_KV)) $(ROOT_ARG) --device $(DEVICE) $(URL_ARG) --repair
else ifeq ($(PLAN),)
cache: $(CACHE_DIR)/manifest.json ## dump teacher logits for V recorded views per image (VIEWS=, CODEC=, PLAN=1: size only, REPAIR=1)
else
cache: $(STAMP) # PLAN=1: the store's size, layout and per-epoch reads; nothing is dumped, no teacher needed
	$(VENV)/bin/python -m stages.cli cache --plan --dataset $(DATASET) --imbalance $(IF) \
	  $(if $(CLASSES),--classes $(CLASSES)) $(call sets,$(CACHE_KV))
endif

$(STUDENT_DIR)/manifest.json: | $(CACHE_DIR)/manifest.json
	$(DIVE) student --cache $(CACHE_DIR) $(call sets,$(STUDENT_KV)) $(ROOT_ARG) --device $(DEVICE)

student: $(STUDENT_DIR)/manifest.json ## train a DiVE student from the cache (TAU= POWER= ALPHA= STUDENT_SEED= ...)

sweep: | $(CACHE_DIR)/manifest.json ## train students over TAUS x POWERS x SEEDS from one cache, then report
	@for seed in $(SEEDS); do for tau in $(TAUS); do for p in $(POWERS); do \
	  $(MAKE) --no-print-directory student TAU=$$tau POWER=$$p STUDENT_SEED=$$seed || exit 1; \
	done; done; done
	$(MAKE) --no-print-directory report

verify: $(STAMP) ## check the cache: completeness, every chunk's crc32c, metadata, fingerprints (REPLAY=K: rerun K views)
	$(VENV)/bin/python -m stages.cli verify --cache $(CACHE_DIR) $(if $(REPLAY),--replay $(REPLAY)) $(ROOT_ARG) \
	  --device $(DEVICE)

inspect: | $(CACHE_DIR)/manifest.json ## virtual example distributions of the cache at AT="tau,p ..." (FLATNESS=)
	$(DIVE) inspect --cache $(CACHE_DIR) $(foreach a,$(AT),--at $(a)) $(if $(FLATNESS),--flatness $(FLATNESS))

flatness: $(STAMP) $(FMNIST) ## two-class experiment: head/tail accuracy against the virtual ratio R (HEAD_CLASS= TAIL_CLASS=)
	$(VENV)/bin/python -m stages.cli flatness --head $(HEAD_CLASS) --tail $(TAIL_CLASS) \
	  --out $(RUNS)/flatness$(if $(filter-out 0/8,$(HEAD_CLASS)/$(TAIL_CLASS)),-$(HEAD_CLASS)-$(TAIL_CLASS)) $(ROOT_ARG)

tsne: $(STAMP) ## t-SNE of CE, BSCE and DiVE test features, one class per group (runs/<dataset>/analysis)
	$(VENV)/bin/python -m stages.cli tsne --runs $(RUNS)/$(TAG) $(ROOT_ARG)

samples: $(STAMP) ## a grid of test images DiVE gets right and CE or BSCE wrong (runs/<dataset>/analysis)
	$(VENV)/bin/python -m stages.cli samples --runs $(RUNS)/$(TAG) $(ROOT_ARG)

shift-eval: $(STAMP) ## every model on Forward/Backward label-shifted test sets, without and with PC
	$(VENV)/bin/python -m stages.cli shift-eval --runs $(RUNS)/$(TAG)

report: $(STAMP) ## write runs/<dataset>/report.md: every teacher and student, mean and std over seeds
	$(VENV)/bin/python -m stages.cli report --runs $(RUNS)/$(TAG)

# Real JPEGs in many encodings, the decode tests' fixtures.
JXL_JPEG := /usr/share/libjxl-testdata/jxl/flower/flower.png.im_q85_420.jpg
OPENCV_JPEG := /usr/share/doc/opencv-doc/examples/data/baboon.jpg
$(JXL_JPEG):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjxl-testdata
$(OPENCV_JPEG):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc

test: $(STAMP) $(FMNIST) $(FONTS) $(JXL_JPEG) $(OPENCV_JPEG) ## run the test suite (installs its data with apt-get if missing)
	$(VENV)/bin/python -m pytest -q tests

bench-cache: $(STAMP) $(FMNIST) ## dump vs forward-only images/s, codec fidelity, store MB/s, iNat-shaped reads
	$(VENV)/bin/python benchmarks/bench_cache.py
	$(VENV)/bin/python benchmarks/bench_store.py

glyph-study: $(STAMP) $(FONTS) ## glyph-lt: CE, BSCE, DiVE over 3 seeds, a tau x p sweep, report, inspect (resumable; hours)
	$(PYTHON) scripts/glyph_study.py VENV=$(VENV) RUNS=$(RUNS)

bench-codecs: $(STAMP) $(FONTS) ## codec fidelity on glyph-lt's BSCE cache (made if missing): bytes a view, KL, max |dp|, count error
	$(MAKE) --no-print-directory cache DATASET=glyph-lt VENV=$(VENV) RUNS=$(RUNS)
	$(VENV)/bin/python benchmarks/bench_codecs.py --cache $(word 2,$(shell $(PYTHON) -m stages.paths --runs $(RUNS) --dataset glyph-lt))

views-study: $(STAMP) $(FMNIST) $(FONTS) ## students from caches of V = 1..epochs views against online, 3 seeds at V = 8, epochs, online (resumable; hours)
	$(PYTHON) scripts/views_study.py --dataset $(DATASET) VENV=$(VENV) RUNS=$(RUNS)

codec-study: $(STAMP) $(FONTS) ## glyph-lt students from float16, int8, topk K=20, sampled K=10 and topk K=100 caches; 3 seeds of the better 100-byte codec (resumable; hours)
	$(PYTHON) scripts/codec_study.py VENV=$(VENV) RUNS=$(RUNS)

bench-loader: $(STAMP) $(FMNIST) $(JXL_JPEG) $(OPENCV_JPEG) ## loader alone, step alone and both: overlap efficiency of the synchronous and prefetching paths; dump vs forward
	$(VENV)/bin/python benchmarks/bench_loader.py

bench-student: $(STAMP) $(FMNIST) ## epoch time: plain BSCE vs cached DiVE vs online DiVE, and the wait for data
	$(VENV)/bin/python benchmarks/bench_student.py

rehearsal: $(STAMP) $(JXL_JPEG) $(OPENCV_JPEG) ## iNat2018-format data at 8,142 classes through every stage: time, img/s, RSS, disk
	$(VENV)/bin/python scripts/rehearsal.py --out $(RUNS)/rehearsal

gpu-check: ## on a GPU machine, without network: student modes, dump and nvJPEG checks, as Markdown (see README)
	PYTHON=$(if $(wildcard $(STAMP)),$(VENV)/bin/python,$(PYTHON)) bash scripts/gpu_check.sh

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
