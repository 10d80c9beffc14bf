# dive: offline logit-caching distillation for long-tailed recognition.
# Stage targets are the stages' manifest files, so Make reruns a stage only when its inputs changed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

DATASET   ?= fmnist-lt
LOSS      ?= bsce
SEED      ?= 0
IF        ?= 100
DATA_ROOT ?=
SET       ?=
DEVICE    ?= auto
NPROC     ?= 1
RUNS      ?= runs
PYTHON    ?= python3
VENV      ?= .venv
# Common recipe keys as Make variables; any other key goes in SET="key=value ..." (teacher),
# CACHE_SET (cache) or STUDENT_SET (student).
EPOCHS    ?=
LR        ?=
BATCH     ?=
MODEL     ?=
# RIDE (MODEL=ride): experts of the teacher (default 6) with `make teacher`, of the student (default 4) otherwise
EXPERTS   ?=
# cache
VIEWS     ?=
CODEC     ?=
CACHE_SET ?=
# student
TAU       ?=
POWER     ?=
ALPHA     ?=
STUDENT_SEED ?= 0
STUDENT_EPOCHS ?=
STUDENT_MODEL ?=
STUDENT_SET ?=
MODE      ?= cached
NAME      ?=
# inspect
AT        ?= 1,1 3,0.5
FLATNESS  ?=
# flatness (two-class experiment): Fashion-MNIST classes, default T-shirt/top (0) vs Bag (8)
HEAD_CLASS ?= 0
TAIL_CLASS ?= 8
# sweep grid
TAUS      ?= 1 2 3 6 9
POWERS    ?= 0.5 1
SEEDS     ?= 0

# glibc's allocator slows torch 1.2-2.5x on small CPUs; these must be set before Python starts.
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 1073741824
export MALLOC_TOP_PAD_ := 1073741824

empty :=
space := $(empty) $(empty)
TEACHER_GOAL := $(filter teacher,$(MAKECMDGOALS))
T_EXPERTS := $(if $(TEACHER_GOAL),$(filter-out 6,$(EXPERTS)))
S_EXPERTS := $(if $(TEACHER_GOAL),,$(EXPERTS))
USER_SET  := $(strip $(SET) $(if $(EPOCHS),epochs=$(EPOCHS)) $(if $(LR),lr=$(LR)) \
                     $(if $(BATCH),batch_size=$(BATCH)) $(if $(MODEL),model=$(MODEL)) \
                     $(if $(T_EXPERTS),experts=$(T_EXPERTS)))
# A run folder's name says what differs from the recipe, so two configs never share a folder.
SUFFIX    := $(if $(USER_SET),-$(subst /,_,$(subst =,,$(subst $(space),_,$(USER_SET)))))
SET_ARGS  := $(foreach kv,imbalance=$(IF) $(USER_SET),--set $(kv))
TAG       := $(DATASET)$(if $(filter-out 100,$(IF)),-if$(IF))
ROOT_ARG  := $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

TEACHER_NAME ?= teacher-$(LOSS)-seed$(SEED)$(SUFFIX)
TEACHER_DIR  := $(RUNS)/$(TAG)/$(TEACHER_NAME)

CACHE_ALL    := $(strip $(CACHE_SET) $(if $(VIEWS),views=$(VIEWS)) $(if $(CODEC),codec=$(CODEC)))
CACHE_DIR    := $(RUNS)/$(TAG)/cache-$(TEACHER_NAME)$(if $(CACHE_ALL),-$(subst =,,$(subst $(space),_,$(CACHE_ALL))))

STUDENT_ALL  := $(strip $(STUDENT_SET) $(if $(STUDENT_EPOCHS),epochs=$(STUDENT_EPOCHS)) \
                        $(if $(STUDENT_MODEL),model=$(STUDENT_MODEL)) $(if $(S_EXPERTS),experts=$(S_EXPERTS)))
STUDENT_OPTS := $(if $(TAU),--tau $(TAU)) $(if $(POWER),--power $(POWER)) $(if $(ALPHA),--alpha $(ALPHA)) \
                --seed $(STUDENT_SEED) --mode $(MODE) $(foreach kv,$(STUDENT_ALL),--set $(kv))
STUDENT_NAME := $(or $(NAME),dive$(if $(TAU),-tau$(TAU))$(if $(POWER),-p$(POWER))$(if $(ALPHA),-a$(ALPHA))$(if \
                $(STUDENT_ALL),-$(subst =,,$(subst $(space),-,$(STUDENT_ALL))))-seed$(STUDENT_SEED)$(if $(filter online,$(MODE)),-online))
STUDENT_DIR  := $(CACHE_DIR)/students/$(STUDENT_NAME)

STAMP := $(VENV)/.installed
DIVE  := $(if $(filter 1,$(NPROC)),$(VENV)/bin/python -m stages.cli,$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m stages.cli)

# The default dataset's files come from Debian's package unless DATA_ROOT points elsewhere.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DATA_DEP := $(if $(and $(filter fmnist-lt,$(DATASET)),$(if $(DATA_ROOT),,yes)),$(FMNIST))

.PHONY: help install test teacher cache student sweep report inspect flatness tsne samples shift-eval bench-cache bench-student gpu-check clean-venv

help: ## list the targets and variables
	@echo "dive: make TARGET [VAR=value ...]"
	@echo
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 18
	@echo
	@echo "Variables (current value):"
	@echo "  DATASET=$(DATASET)   fmnist-lt | cifar100-lt | imagenet-lt | inat2018"
	@echo "  DATA_ROOT=$(DATA_ROOT)   dataset folder (default: the dataset's usual place)"
	@echo "  IF=$(IF)   imbalance factor for fmnist-lt / cifar100-lt (10, 50, 100)"
	@echo "  LOSS=$(LOSS)   teacher loss: bsce | ce"
	@echo "  SEED=$(SEED)   seed of data order, views and initial weights"
	@echo "  EPOCHS LR BATCH MODEL   common recipe overrides"
	@echo "  SET=\"key=value ...\"   any recipe override (see: .venv/bin/dive recipe --dataset $(DATASET))"
	@echo "  NPROC=$(NPROC)   processes per node under torchrun (GPUs, or gloo on CPU)"
	@echo "  DEVICE=$(DEVICE)   auto | cpu | cuda"
	@echo "  RUNS=$(RUNS)   where run folders go"
	@echo "  VIEWS CODEC CACHE_SET   cache: views per image (V), float16 | int8, other cache keys"
	@echo "  TAU POWER ALPHA STUDENT_SEED STUDENT_EPOCHS STUDENT_MODEL STUDENT_SET   student settings"
	@echo "  MODEL=ride EXPERTS=   RIDE multi-expert models: teacher 6 experts (make teacher), student 4"
	@echo "  MODE=$(MODE)   cached | online (the teacher run live on the same views)"
	@echo "  NAME=   student run name (default: from its settings)"
	@echo "  TAUS=\"$(TAUS)\" POWERS=\"$(POWERS)\" SEEDS=\"$(SEEDS)\"   the sweep grid"
	@echo "  AT=\"$(AT)\" FLATNESS=   inspect: tau,p pairs; smallest tau reaching a min/max target"
	@echo
	@echo "Folders now: teacher $(TEACHER_DIR)"
	@echo "             cache   $(CACHE_DIR)"
	@echo "             student $(STUDENT_DIR)"

install: $(STAMP) ## make the virtual environment (.venv) and install the project into it

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(FMNIST):
	@echo "Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist (or set DATA_ROOT=)"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

# The request file changes only when the arguments do, so Make reruns a stage for a new config only.
%/request.args: FORCE
	@mkdir -p $(@D)
	@echo '$(REQUEST)' | cmp -s - $@ || echo '$(REQUEST)' > $@
FORCE:

$(TEACHER_DIR)/request.args: REQUEST = teacher --dataset $(DATASET) --loss $(LOSS) --seed $(SEED) $(SET_ARGS) $(ROOT_ARG)

$(TEACHER_DIR)/manifest.json: $(STAMP) $(DATA_DEP) $(TEACHER_DIR)/request.args stages/teacher.py
	$(DIVE) teacher --dataset $(DATASET) --loss $(LOSS) --seed $(SEED) $(SET_ARGS) $(ROOT_ARG) \
	  --device $(DEVICE) --out $(TEACHER_DIR)

teacher: $(TEACHER_DIR)/manifest.json ## train the teacher (Balanced Softmax; LOSS=ce for the CE baseline)

$(CACHE_DIR)/request.args: REQUEST = cache --teacher $(TEACHER_DIR) $(foreach kv,$(CACHE_ALL),--set $(kv)) $(ROOT_ARG)

$(CACHE_DIR)/manifest.json: $(TEACHER_DIR)/manifest.json $(CACHE_DIR)/request.args stages/cache.py
	$(DIVE) cache --teacher $(TEACHER_DIR) $(foreach kv,$(CACHE_ALL),--set $(kv)) $(ROOT_ARG) \
	  --device $(DEVICE) --out $(CACHE_DIR)

cache: $(CACHE_DIR)/manifest.json ## dump teacher logits for V recorded views per image (VIEWS=, CODEC=)

$(STUDENT_DIR)/request.args: REQUEST = student --cache $(CACHE_DIR) $(STUDENT_OPTS) $(ROOT_ARG)

$(STUDENT_DIR)/manifest.json: $(CACHE_DIR)/manifest.json $(STUDENT_DIR)/request.args stages/student.py
	$(DIVE) student --cache $(CACHE_DIR) $(STUDENT_OPTS) $(ROOT_ARG) --device $(DEVICE) --out $(STUDENT_DIR)

student: $(STUDENT_DIR)/manifest.json ## train a DiVE student from the cache (TAU= POWER= ALPHA= NAME= STUDENT_SEED=)

sweep: $(CACHE_DIR)/manifest.json ## train students over TAUS x POWERS x SEEDS from one cache, then report
	@for seed in $(SEEDS); do for tau in $(TAUS); do for p in $(POWERS); do \
	  $(MAKE) --no-print-directory student TAU=$$tau POWER=$$p STUDENT_SEED=$$seed || exit 1; \
	done; done; done
	$(MAKE) --no-print-directory report

inspect: $(CACHE_DIR)/manifest.json ## virtual example distributions of the cache at AT="tau,p ..." (FLATNESS=)
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

test: $(STAMP) $(FMNIST) $(JXL_JPEG) $(OPENCV_JPEG) ## run the test suite (installs its data with apt-get if missing)
	$(VENV)/bin/python -m pytest -q tests

bench-cache: $(STAMP) $(FMNIST) ## dump vs forward-only images/s, codec fidelity, store MB/s, iNat-shaped reads
	$(VENV)/bin/python benchmarks/bench_cache.py
	$(VENV)/bin/python benchmarks/bench_store.py

bench-student: $(STAMP) $(FMNIST) ## epoch time: plain BSCE vs cached DiVE vs online DiVE, and store wait
	$(VENV)/bin/python benchmarks/bench_student.py

gpu-check: $(STAMP) ## on a GPU machine: mixed (nvJPEG) vs CPU decoding, and a short dump on the GPU
	PYTHON=$(VENV)/bin/python bash scripts/gpu_check.sh

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
