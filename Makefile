# Every target creates .venv and installs the project when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/tiny-offline

.PHONY: test train lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,eval]"
	touch $(STAMP)

# Two workers (one per core), each test file on one worker so that its shared compiled programs stay shared.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadfile

train: $(STAMP)
	$(BIN)/python train.py --config configs/tiny.py --workdir $(WORKDIR) \
		--config.data.source=offline --config.max_steps=60 --config.batch_size=8 \
		--config.sequence_length=512 --config.eval_interval=30 --config.checkpoint_interval=30 \
		--config.log_interval=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/train_step.py --config configs/tiny.py --batch_size 8 --sequence_length 1024

clean:
	rm -rf $(VENV) runs
