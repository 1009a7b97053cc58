# spherecli: `make demo` runs the whole pipeline on the bundled data, `make test` the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SF     := $(VENV)/bin/sphereface
DATA   ?= ../shared/data
OUT    ?= out/demo

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

# Detect, align and list CelebA (training) and LFW (test). Every stage
# resumes or skips finished work, so running it again is cheap.
demo: install
	@test -d $(DATA)/celeba -a -d $(DATA)/lfw || { \
	  echo "No face data in $(DATA) (need celeba/, lfw/ and pairs.txt; set DATA=...)."; \
	  echo "See README.md, 'Data', for where to get LFW and CASIA-WebFace."; exit 1; }
	$(SF) detect $(DATA)/celeba -o $(OUT)/celeba.landmarks.jsonl
	$(SF) align $(OUT)/celeba.landmarks.jsonl -o $(OUT)/celeba-112X96
	$(SF) list $(OUT)/celeba-112X96 -o $(OUT)/celeba-112X96.txt
	$(SF) detect $(DATA)/lfw -o $(OUT)/lfw.landmarks.jsonl
	$(SF) align $(OUT)/lfw.landmarks.jsonl -o $(OUT)/lfw-112X96

clean:
	rm -rf $(OUT)
