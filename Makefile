# Set-up and everyday commands. `make test` and `make demo` install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install browser slurm test test-fast demo tour stablesr-tiny supir-tiny lint format bench-degradation bench-eval clean-venv

install: $(STAMP)

# Re-installs when pyproject.toml changes. torch/torchvision come from pyproject's pins (>=2.14,<2.15).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "restore needs Python >= 3.11 (diffusers does); set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Headless Chromium for the report test (tests/test_report.py skips cleanly without it): installed with
# apt-get where that works (root, Debian/Ubuntu); anywhere else this says so and moves on.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium with apt-get (for the report test)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "no chromium and no root apt-get: the browser test will be skipped"; fi; }

# A single-node SLURM for tests/test_slurm.py (it writes its own config and starts munged, slurmctld and slurmd
# in a temporary folder; it skips cleanly without them): Debian's slurm-wlm and munge, installed with apt-get where
# that works (root, Debian/Ubuntu); anywhere else this says so and moves on.
slurm:
	@command -v sbatch >/dev/null 2>&1 && { command -v slurmctld || test -x /usr/sbin/slurmctld; } >/dev/null 2>&1 && \
	  { command -v munged || test -x /usr/sbin/munged; } >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing slurm-wlm and munge with apt-get (for the SLURM tests)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; } || \
	    echo "slurm-wlm could not be installed: the SLURM tests will be skipped"; \
	  else echo "no SLURM and no root apt-get: the SLURM tests will be skipped"; fi; }

# Two xdist workers of one torch thread each: the 2-core CI machine's cores, ~11 min (14 min serially).
TEST_WORKERS ?= 2
test: install browser slurm
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Iterating: skip the tests marked slow (CI and `make test` run everything).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The whole loop on CPU, offline, in under 5 minutes after install: degrade the embedded photos (a picture);
# train the tiny RealESRNet, the tiny SeeSR (ControlNet + RCA on a tiny random SD prior, tagged by a tiny random
# DAPE), the tiny DreamClear (ControlFormer + MoAM on a tiny random PixArt-α, reference branch through spandrel)
# the tiny StableSR stage 1 (encoder + SFT; its CFW stage 2 is in `make tour`, which the 5-minute budget of
# the demo does not hold) and the tiny SUPIR's two stages (degradation-robust encoder, then GLVControl + connectors);
# evaluate bicubic and the five on benchmark=samples: one table.md + report.html.
# NIQE's pristine model is rebuilt from basicsr's bundled copy; learned metrics without weights are skipped with
# a warning (fetch them with `python -m restore.weights fetch --metric lpips dists fid maniqa musiq clipiqa`).
# The tiny diffusion methods show the machinery (conditions, sampling with CFG, colour fix), not the quality of
# a real prior: their VAEs and denoisers are random, so their images are noise by design; the table and the
# report say so next to their columns (‡).
DEMO := outputs/demo
DEMO_FLAGS := extras.print_config=false
demo: install
	$(BIN)/python scripts/demo_degradation.py --out $(DEMO)
	$(BIN)/python -m restore.weights fetch niqe_modelparameters.mat --from-basicsr
	# 10x the recipe's learning rate: 300 steps (~30 s) then reach ~23 dB instead of ~20.6 dB
	$(BIN)/python train.py experiment=realesrnet_tiny trainer.max_steps=300 method.optimizer.lr=2e-3 \
	  $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/train
	$(BIN)/python train.py experiment=seesr_tiny trainer.max_steps=100 $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/seesr
	$(BIN)/python eval.py benchmark=samples method=bicubic $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/eval_bicubic
	$(BIN)/python eval.py benchmark=samples method=realesrnet_tiny ckpt_path=$(DEMO)/train/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/eval_realesrnet_tiny
	$(BIN)/python train.py experiment=dreamclear_tiny $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/dreamclear
	$(BIN)/python eval.py benchmark=samples method=seesr_tiny ckpt_path=$(DEMO)/seesr/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/eval_seesr_tiny
	$(BIN)/python eval.py benchmark=samples method=dreamclear_tiny ckpt_path=$(DEMO)/dreamclear/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/eval_dreamclear_tiny
	$(BIN)/python train.py experiment=stablesr_tiny $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/stablesr
	$(BIN)/python eval.py benchmark=samples method=stablesr_tiny ckpt_path=$(DEMO)/stablesr/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/eval_stablesr_tiny
	$(MAKE) --no-print-directory supir-tiny OUT=$(DEMO)
	$(BIN)/python eval.py benchmark=samples method=supir_tiny ckpt_path=$(DEMO)/supir/checkpoints/last.ckpt \
	  report.compare=[$(DEMO)/eval_bicubic,$(DEMO)/eval_realesrnet_tiny,$(DEMO)/eval_seesr_tiny,$(DEMO)/eval_dreamclear_tiny,$(DEMO)/eval_stablesr_tiny] \
	  $(DEMO_FLAGS) hydra.run.dir=$(DEMO)/eval_supir_tiny
	@echo "table: $(DEMO)/eval_supir_tiny/table.md   report: $(DEMO)/eval_supir_tiny/report.html"

# SUPIR's two training stages on CPU, into $(OUT): stage A (the degradation-robust encoder), then stage B (GLVControl
# + connectors) on that encoder.
supir-tiny: install
	$(BIN)/python train.py experiment=supir_encoder_tiny $(DEMO_FLAGS) hydra.run.dir=$(OUT)/supir_encoder
	$(BIN)/python train.py experiment=supir_tiny method.encoder_checkpoint=$(OUT)/supir_encoder/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(OUT)/supir

# StableSR's two stages on CPU, into $(OUT): stage 1 (encoder + SFT), the CFW data step (stage-1 latents of
# degraded crops of the embedded photos, made with the StableSR degradation), stage 2 (CFW fusion layers + PatchGAN).
stablesr-tiny: install
	$(BIN)/python train.py experiment=stablesr_tiny $(DEMO_FLAGS) hydra.run.dir=$(OUT)/stablesr
	$(BIN)/python scripts/make_training_pairs.py --src embedded --out $(OUT)/stablesr_pairs --crop 128 \
	  --preset stablesr_mild --no-progress
	$(BIN)/python scripts/make_cfw_pairs.py method=stablesr_tiny ckpt_path=$(OUT)/stablesr/checkpoints/last.ckpt \
	  pairs=$(OUT)/stablesr_pairs out=$(OUT)/cfw_pairs method.sampling.progress=false \
	  $(DEMO_FLAGS) hydra.run.dir=$(OUT)/make_cfw_pairs
	$(BIN)/python train.py experiment=stablesr_cfw_tiny data.train.root=$(OUT)/cfw_pairs $(DEMO_FLAGS) \
	  hydra.run.dir=$(OUT)/stablesr_cfw

# The full tour, every method end to end on CPU (about 8 minutes after install): the demo's RealESRNet; SeeSR's
# two stages (DAPE LoRA training, then SeeSR on that DAPE); XPSR (prompts of the photos by a tiny random LLaVA
# with scripts/extract_prompts.py, then SFA, pixel attention and the DFC loss); DreamClear; StableSR's two stages;
# SUPIR's two stages; all in one table and report.
TOUR := outputs/tour
tour: install
	$(BIN)/python -m restore.weights fetch niqe_modelparameters.mat --from-basicsr
	$(BIN)/python train.py experiment=realesrnet_tiny trainer.max_steps=300 method.optimizer.lr=2e-3 \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/realesrnet
	$(BIN)/python train.py experiment=dape_tiny $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/dape
	$(BIN)/python train.py experiment=seesr_tiny trainer.max_steps=300 \
	  method.dape.dape_checkpoint=$(TOUR)/dape/checkpoints/last.ckpt $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/seesr
	$(BIN)/python scripts/extract_prompts.py --input-embedded --tiny --field highlevel --field lowlevel \
	  --out $(TOUR)/xpsr_prompts.jsonl
	$(BIN)/python train.py experiment=xpsr_tiny trainer.max_steps=300 data.train.prompts=$(TOUR)/xpsr_prompts.jsonl \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/xpsr
	$(BIN)/python eval.py benchmark=samples method=bicubic $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_bicubic
	$(BIN)/python eval.py benchmark=samples method=realesrnet_tiny ckpt_path=$(TOUR)/realesrnet/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_realesrnet_tiny
	$(BIN)/python eval.py benchmark=samples method=seesr_tiny ckpt_path=$(TOUR)/seesr/checkpoints/last.ckpt \
	  method.dape.dape_checkpoint=$(TOUR)/dape/checkpoints/last.ckpt $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_seesr_tiny
	$(BIN)/python train.py experiment=dreamclear_tiny $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/dreamclear
	$(BIN)/python eval.py benchmark=samples method=xpsr_tiny ckpt_path=$(TOUR)/xpsr/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_xpsr_tiny
	$(BIN)/python eval.py benchmark=samples method=dreamclear_tiny ckpt_path=$(TOUR)/dreamclear/checkpoints/last.ckpt \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_dreamclear_tiny
	$(MAKE) --no-print-directory stablesr-tiny OUT=$(TOUR)
	$(BIN)/python eval.py benchmark=samples method=stablesr_tiny ckpt_path=$(TOUR)/stablesr/checkpoints/last.ckpt \
	  method/decoder=cfw_trained method.decoder.checkpoint=$(TOUR)/stablesr_cfw/checkpoints/last.ckpt label=stablesr_tiny+cfw \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_stablesr_tiny
	$(MAKE) --no-print-directory supir-tiny OUT=$(TOUR)
	$(BIN)/python eval.py benchmark=samples method=supir_tiny ckpt_path=$(TOUR)/supir/checkpoints/last.ckpt \
	  report.compare=[$(TOUR)/eval_bicubic,$(TOUR)/eval_realesrnet_tiny,$(TOUR)/eval_seesr_tiny,$(TOUR)/eval_xpsr_tiny,$(TOUR)/eval_dreamclear_tiny,$(TOUR)/eval_stablesr_tiny] \
	  $(DEMO_FLAGS) hydra.run.dir=$(TOUR)/eval_supir_tiny
	@echo "table: $(TOUR)/eval_supir_tiny/table.md   report: $(TOUR)/eval_supir_tiny/report.html"

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench-degradation: install
	$(BIN)/python benchmarks/degradation.py

bench-eval: install
	$(BIN)/python benchmarks/eval_throughput.py

clean-venv:
	rm -rf $(VENV)
