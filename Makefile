# spherecli
#   make demo       install, then the whole pipeline on the bundled data (../shared/data)
#   make test       install, then the tests (CI's run: all but the slow reproductions)
#   make test-all   install, then every test, with the published model's whole-LFW pipeline
#   make published  a published model (MODEL=...) imported and evaluated on the bundled LFW
#   make reproduce  the paper's recipe on CASIA-WebFace and LFW, on GPUs
#   make bench      the benchmarks of docs/benchmarks.md
#   make gpu-check  the GPU questions of docs/benchmarks.md, on a machine with a GPU
PYTHON ?= python3
VENV   := .venv
PY     ?= $(VENV)/bin/python
SF     ?= $(VENV)/bin/sphereface

.PHONY: install test test-all demo identify-demo published reproduce bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/detect.py
	$(PY) benchmarks/align.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/loader.py --list $(OUT)/celeba-112X96.txt
	$(PY) benchmarks/search.py
	$(PY) benchmarks/video.py --model $(RUN)/model.pt

# The GPU questions of docs/benchmarks.md in one command, on a machine with a GPU,
# after `make demo` (it reads the demo's aligned LFW and CelebA); the table goes
# into docs/benchmarks.md. On a lent GPU machine, carry out/gpu-bundle and run
# the second command there (benchmarks/gpu.py says how).
gpu-check: install
	$(PY) benchmarks/gpu.py --pack out/gpu-bundle --lfw-aligned $(OUT)/lfw-112X96 \
	  --celeba-list $(OUT)/celeba-112X96.txt --pairs $(DATA)/pairs.txt --lfw-raw $(DATA)/lfw
	PYTHONPATH=out/gpu-bundle/site $(PY) benchmarks/gpu.py --bundle out/gpu-bundle --out out/gpu-check
	$(PY) benchmarks/gpu.py --record out/gpu-check/gpu.json

# --------------------------------------------------------------------------- demo
# CelebA (998 identities) stands in for CASIA-WebFace, LFW is the test set.
# Every stage resumes or skips finished work, so running it again is cheap.
DATA   ?= ../shared/data
OUT    ?= out/demo
RECIPE ?= examples/celeba-sphere4-asoftmax.toml
RUN    := $(OUT)/$(basename $(notdir $(RECIPE)))

demo: install
	@test -d $(DATA)/celeba -a -d $(DATA)/lfw -a -f $(DATA)/pairs.txt || { \
	  echo "make demo needs the bundled face data in $(DATA) (celeba/, lfw/, pairs.txt); it is not there."; \
	  echo "Point DATA=... at a copy, or run the paper's recipe on your own data with"; \
	  echo "  make reproduce CASIA=/path/to/CASIA-WebFace LFW=/path/to/lfw PAIRS=/path/to/pairs.txt"; \
	  echo "(README.md, 'Data', says where to get LFW and CASIA-WebFace)."; exit 1; }
	$(SF) detect $(DATA)/celeba -o $(OUT)/celeba.landmarks.jsonl
	$(SF) align $(OUT)/celeba.landmarks.jsonl -o $(OUT)/celeba-112X96
	$(SF) list $(OUT)/celeba-112X96 -o $(OUT)/celeba-112X96.txt
	$(SF) detect $(DATA)/lfw -o $(OUT)/lfw.landmarks.jsonl
	$(SF) align $(OUT)/lfw.landmarks.jsonl -o $(OUT)/lfw-112X96 --no-face mean
	$(SF) train --config $(RECIPE) --list $(OUT)/celeba-112X96.txt --out $(RUN) --resume
	$(SF) evaluate --pairs $(DATA)/pairs.txt --model $(RUN)/model.pt --data $(OUT)/lfw-112X96
ifneq ($(wildcard $(DATA)/cfp/Protocol),)
	$(SF) detect $(DATA)/cfp/Data/Images -o $(OUT)/cfp.landmarks.jsonl
	$(SF) align $(OUT)/cfp.landmarks.jsonl -o $(OUT)/cfp-112X96 --no-face mean
	printf '[lfw]\npairs = "%s"\ndata = "lfw-112X96"\n\n[cfp-fp]\ncfp = "%s"\nsplit = "FP"\ndata = "cfp-112X96"\n' \
	  $(abspath $(DATA)/pairs.txt) $(abspath $(DATA)/cfp/Protocol) > $(OUT)/benchmarks.toml
	$(SF) evaluate --model $(RUN)/model.pt --benchmarks $(OUT)/benchmarks.toml
else
	@echo "CFP is not in $(DATA)/cfp: the demo ends with LFW alone (docs/results.md, 'Benchmarks')"
endif

# The open-set demo on the bundled wild photos with the demo's model: half the
# people known from one photo each, every other face named or called unknown.
identify-demo: install
	@test -f $(RUN)/model.pt || { echo "run 'make demo' first: it trains $(RUN)/model.pt"; exit 1; }
	$(PY) examples/identify_wild.py --model $(RUN)/model.pt --wild $(DATA)/wild
	rm -rf $(OUT)/identify-gallery
	for p in $$(ls $(DATA)/wild | head -13); do mkdir -p $(OUT)/identify-gallery/$$p && \
	  cp "$$(ls -d $(DATA)/wild/$$p/* | head -1)" $(OUT)/identify-gallery/$$p/; done
	$(SF) identify --gallery $(OUT)/identify-gallery --probe $(DATA)/wild --model $(RUN)/model.pt \
	  --annotate $(OUT)/identify -o $(OUT)/identify.csv -q
	@echo "annotated photos: $(OUT)/identify/ (13 people known from one photo each; grey: unknown)"

# --------------------------------------------------------------------------- a published model
# A published model through the pipeline on the bundled LFW: imported (a Caffe
# .caffemodel with IMPORT_ARGS="--prototxt deploy.prototxt", clcarwin's .pth,
# MobileFaceNet's .ckpt) or, for an ONNX network, taken as it is with its
# INPUT_SPEC (e.g. insightface, with REFERENCE=arcface).
MODEL       ?=
REFERENCE   ?= sphereface
INPUT_SPEC  ?=
IMPORT_ARGS ?=
PUB         := $(OUT)/published/$(basename $(notdir $(MODEL)))
PUB_MODEL   := $(if $(filter %.onnx,$(MODEL)),$(MODEL),$(PUB).pt)
PUB_LFW     := $(OUT)/lfw-$(if $(filter arcface,$(REFERENCE)),112X112-arcface,112X96)

published: install
	@test -f "$(MODEL)" || { echo "usage: make published MODEL=path/to/068.ckpt"; \
	  echo "  (or a .caffemodel with IMPORT_ARGS=\"--prototxt deploy.prototxt\", a .pth, or an"; \
	  echo "  .onnx with INPUT_SPEC=insightface REFERENCE=arcface)"; exit 1; }
	$(SF) detect $(DATA)/lfw -o $(OUT)/lfw.landmarks.jsonl
	$(SF) align $(OUT)/lfw.landmarks.jsonl -o $(PUB_LFW) --reference $(REFERENCE) --no-face mean
	$(if $(filter %.onnx,$(MODEL)),,test -f $(PUB).pt || $(SF) import $(MODEL) -o $(PUB).pt $(IMPORT_ARGS))
	$(SF) evaluate --pairs $(DATA)/pairs.txt --model $(PUB_MODEL) --data $(PUB_LFW) -o $(PUB).lfw.json \
	  $(if $(INPUT_SPEC),--input-spec $(INPUT_SPEC))

# --------------------------------------------------------------------------- reproduce
# The original release end to end: SphereFace-20, A-Softmax m=4, 28k iterations
# of batch 256 per GPU on CASIA-WebFace, then LFW. TRAIN_ARGS adds or overrides
# training options (e.g. TRAIN_ARGS="--amp none" for the original fp32).
CASIA      ?= data/CASIA-WebFace
LFW        ?= data/lfw
PAIRS      ?= data/pairs.txt
GPUS       ?= 0,1
ROUT       ?= out/reproduce
TRAIN_ARGS ?=
DEVICE     := $(if $(GPUS),--device cuda,--device cpu)

reproduce: install
	@test -d $(CASIA) -a -d $(LFW) -a -f $(PAIRS) || { \
	  echo "make reproduce needs CASIA-WebFace, LFW and LFW's pairs.txt:"; \
	  echo "  CASIA=$(CASIA)  (CASIA-WebFace: 10,575 identity folders, ~494k images; request it from"; \
	  echo "                   its authors, Yi et al. 2014, 'Learning Face Representation from Scratch')"; \
	  echo "  LFW=$(LFW)      (http://vis-www.cs.umass.edu/lfw/: lfw.tgz, unpacked to <name>/<name>_NNNN.jpg)"; \
	  echo "  PAIRS=$(PAIRS)  (the same site: pairs.txt, view 2)"; \
	  echo "Then: make reproduce CASIA=... LFW=... PAIRS=... GPUS=0,1"; exit 1; }
	$(SF) detect $(CASIA) -o $(ROUT)/casia.landmarks.jsonl $(DEVICE)
	$(SF) align $(ROUT)/casia.landmarks.jsonl -o $(ROUT)/CASIA-WebFace-112X96
	$(SF) list $(ROUT)/CASIA-WebFace-112X96 -o $(ROUT)/CASIA-WebFace-112X96.txt --exclude casia-lfw
	$(SF) detect $(LFW) -o $(ROUT)/lfw.landmarks.jsonl $(DEVICE)
	$(SF) align $(ROUT)/lfw.landmarks.jsonl -o $(ROUT)/lfw-112X96 --no-face mean
	$(SF) train --list $(ROUT)/CASIA-WebFace-112X96.txt --out $(ROUT)/sphereface20 --resume \
	  $(if $(GPUS),--gpus $(GPUS),--device cpu) $(TRAIN_ARGS)
	$(SF) evaluate --pairs $(PAIRS) --model $(ROUT)/sphereface20/model.pt \
	  --data $(ROUT)/lfw-112X96 $(DEVICE)

clean:
	rm -rf $(OUT) $(ROUT)
