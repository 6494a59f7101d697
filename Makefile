# fs9: `make run` mounts it, `make test` tests it. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MNT    := mountpoints/fs9
STATE  := .state
VAULT  := examples/vault
EXAMPLE_AGENTS := echo upper counter ticker

.PHONY: run stop test bench fuzz example federation deps clean model model-install model-stop model-status cluster cluster-stop

$(BIN)/fs9: pyproject.toml
	@./scripts/system-deps.sh --test
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# the pinned nats-server the federation tests start (scripts/nats-server.txt: version, sha256)
$(BIN)/nats-server: scripts/nats-server.txt $(BIN)/fs9
	@./scripts/nats-server.sh $(VENV)
	@touch $@

deps: $(BIN)/fs9 $(BIN)/nats-server

# run and stop are idempotent: a second `make run` keeps the mount, `make stop` of no mount
# says so; both exit 0 (mountinfo, not a stat, which a dead mount would hang or fail)
MOUNTED = grep -qF " $(abspath $(MNT)) " /proc/self/mountinfo

run: deps
	@if $(MOUNTED); then echo "fs9 is already mounted at $(MNT)"; else \
	    $(BIN)/fs9 mount $(MNT) --agents agents --vault $(VAULT) --state $(STATE) --background; fi
	@for a in $(EXAMPLE_AGENTS); do \
	    [ -e $(MNT)/agents/$$a ] || echo "spawn $$a" > $(MNT)/ctl; done
	@echo
	@echo "fs9 is mounted at $(MNT). Try:"
	@echo "  cd $(MNT)"
	@echo "  cat status                              # one line per agent"
	@echo "  echo 'run hello fs9' > agents/upper/ctl  # give an agent work"
	@echo "  cat agents/upper/out                    # its output"
	@echo "  echo 5 > agents/counter/in; cat agents/counter/out   # streams as it counts"
	@echo "  tail -n +1 -f events                    # the kernel's event stream (Ctrl-C ends)"
	@echo "Stop it with: make stop   (or: $(BIN)/fs9 umount $(MNT))"

stop:
	@if $(MOUNTED); then $(BIN)/fs9 umount $(MNT); else echo "fs9 is not mounted at $(MNT)"; fi

# tests/test_realmodel.py (marker realmodel) runs on the real local model when
# `make model-install` has installed it, and skips saying so otherwise
test: deps
	$(BIN)/python -m pytest -q

# three fs9 systems (Support, Coding, Knowledge) cooperating over one local nats-server
federation: deps
	@sh examples/federation/run.sh

# A real language model, offline (scripts/model.sh): SmolLM2-135M-Instruct under
# llama-cpp-python's server, in ~/.cache/fs9/model (its own venv; the server's wheel is
# built once, ~9 min on 2 cores, then kept). `make model` serves it on 127.0.0.1 and
# writes [models.local] into $(STATE)/models.toml (fs9 reads it at mount: make stop run)
model:
	@./scripts/model.sh start $(STATE)
	@echo "an llm agent uses it with: model = \"local\" (models/local/info says where it is)"

model-install:
	@./scripts/model.sh install

model-stop:
	@./scripts/model.sh stop

model-status:
	@./scripts/model.sh status

# A long run of the namespace fuzzer (tests/test_fuzz.py) with a fresh seed, printed so
# that a failure replays: FS9_FUZZ_SEED=N make fuzz. FS9_FUZZ_EXAMPLES runs of
# FS9_FUZZ_STEPS steps.
fuzz: deps
	@seed=$${FS9_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz seed $$seed (replay: FS9_FUZZ_SEED=$$seed make fuzz)"; \
	FS9_FUZZ_SEED=$$seed FS9_FUZZ_EXAMPLES=$${FS9_FUZZ_EXAMPLES:-200} \
	    $(BIN)/python -m pytest -q -s tests/test_fuzz.py -p no:cacheprovider \
	    --hypothesis-seed=$$seed

bench: deps
	@./scripts/system-deps.sh --bench
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/foundation.py
	$(BIN)/python bench/bus.py
	$(BIN)/python bench/views.py
	$(BIN)/python bench/spawnspeed.py
	$(BIN)/python bench/starts.py
	$(BIN)/python bench/vault.py
	$(BIN)/python bench/models.py
	@if ./scripts/model.sh installed; then $(BIN)/python bench/realmodel.py; \
	else echo "bench/realmodel.py: skipped: the real model is not installed (make model-install)"; fi
	$(BIN)/python bench/qos.py
	$(BIN)/python bench/durability.py
	$(BIN)/python bench/reach.py
	$(BIN)/python bench/ops.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/federation.py
	$(BIN)/python bench/bigmount.py
	$(BIN)/python bench/retention.py

# three nats-servers and three fs9 nodes on 127.0.0.1 (docs/cluster.md)
cluster: deps
	@$(BIN)/python scripts/cluster.py start

cluster-stop:
	@$(BIN)/python scripts/cluster.py stop

# the customer-support scenario, offline: the scripted model, or with MODEL=local the
# real local model (`make model` serves it); see examples/support
example: deps
	@if [ -n "$(MODEL)" ]; then ./examples/support/run.sh --model $(MODEL) $(STATE)/models.toml; \
	else ./examples/support/run.sh; fi

clean:
	rm -rf $(VENV) $(STATE)
