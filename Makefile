# Two commands set up everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench gpu-check venv clean

# llama-cpp-python (a dev dependency: the GGUF tests run llama.cpp) builds from source, ~5 min on
# 2 cores; it is built portable (GGML_NATIVE=OFF), so the wheel pip caches and reuses never runs
# instructions another CPU kind lacks.
$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-dev.txt torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)  ## offline LoRA fine-tune of all-MiniLM-L6-v2 for sentiment, before/after accuracy
	HF_HUB_OFFLINE=1 $(PY) -m lorafit.demo

test: $(STAMP)  ## the whole test suite, as CI runs it (installs headless Chromium for the page test if it can)
	-bash scripts/ensure-chromium.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)  ## lorafit vs PEFT side by side; writes bench/results.json and the README table
	HF_HUB_OFFLINE=1 $(PY) bench/run.py

gpu-check:  ## the CUDA tests and a CUDA bench vs PEFT, on a GPU machine (scripts/gpu-check.sh; nothing to install)
	bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) runs
