# imagepipe: `make demo` runs the whole pipeline locally; `make test` runs every check. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30
BUILD_DIR := .aws-sam/build
# `sam build` for a python3.12 runtime needs a python3.12 on PATH (a pyenv shim is not enough).
PY312 := $(shell for p in /root/.pyenv/versions/3.12*/bin/python3.12 $$(command -v python3.12); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)
PY312_DIR := $(patsubst %/,%,$(dir $(PY312)))
# The SAM CLI and cfn-lint never need a real account here: fake credentials, no metadata lookups.
AWS_OFFLINE := SAM_CLI_TELEMETRY=0 AWS_EC2_METADATA_DISABLED=true AWS_ACCESS_KEY_ID=testing \
	AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1

.PHONY: demo test lint template checkov build browser pytest bench clean deploy destroy stack-given

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "imagepipe needs Python 3.11 or newer; found " + sys.version.split()[0] + " (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# aws-sam-cli pins its own boto3, so it lives in a venv of its own.
$(SAM_VENV)/.installed:
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install -q --disable-pip-version-check aws-sam-cli==1.170.0
	touch $@

# checkov pins its own dependencies too. The '*' .gitignore keeps git and ruff out of the venv.
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	echo '*' > $(CHECKOV_VENV)/.gitignore
	$(CHECKOV_VENV)/bin/python -m pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/imagepipe run examples/prompts.csv --out output

test: lint template checkov build browser pytest

# The report test renders report.html in Debian's headless Chromium (installed here if missing; as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the report's browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "chromium could not be installed: the report's browser test will say so and skip"; }

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

template: $(BIN)/.installed $(SAM_VENV)/.installed
	$(AWS_OFFLINE) $(BIN)/cfn-lint template.yaml
	$(AWS_OFFLINE) $(SAM) validate --lint

# The stack's security checks, offline (no Bridgecrew platform, no download of its policies). Zero failures;
# each skipped check is justified in a `Metadata: checkov: skip:` comment next to its resource.
checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
	BC_SKIP_MAPPING=TRUE $(CHECKOV_VENV)/bin/checkov -f template.yaml --framework cloudformation \
		--skip-download --quiet --compact

# sam build, then each built function must import on python3.12 with only its layer and boto3
# (which Lambda's python3.12 runtime provides).
build: $(SAM_VENV)/.installed
	@if [ -z "$(PY312)" ]; then \
		echo "sam build: no python3.12 found on PATH or under /root/.pyenv; skipping the build check"; \
	else \
		$(AWS_OFFLINE) PATH="$(PY312_DIR):$$PATH" $(SAM) build --build-dir $(BUILD_DIR) && \
		$(PY312) -m pip install -q --disable-pip-version-check --root-user-action=ignore --target .aws-sam/lambda-runtime boto3 && \
		for fn in CsvSplitterFunction ImageGeneratorFunction JobFinisherFunction DeadLetterRecorderFunction JobSweeperFunction; do \
			(cd $(BUILD_DIR)/$$fn && PYTHONPATH=../SharedLayer/python:../../lambda-runtime POWERTOOLS_TRACE_DISABLED=true \
				$(PY312) -c "import app; print('built $$fn imports on', __import__('sys').version.split()[0])") || exit 1; \
		done; \
	fi

# Three workers, a test file each at a time (its fixtures stay together): most tests wait on queues and
# clocks rather than a CPU, so on 2 cores this takes about half as long as one worker (the proof, the longest
# file, starts first). PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 3
pytest: $(BIN)/.installed
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Issue 11's table, one markdown table for the README (~20 minutes on 2 cores). `build` first: the cold start
# is measured on what `sam build` makes (without python3.12, on the source tree, and the table says so).
bench: $(BIN)/.installed build
	$(BIN)/python bench/run_bench.py

# `make deploy STACK=name [REGION=...] [PARAMS="K=V ..."]`: `imagepipe deploy-check` first (AWS credentials,
# the SAM CLI, python3.12 or Docker, bucket names within 63 characters, a secret name no other stack holds,
# PARAMS against the template), then sam build and sam deploy - in the region the imagepipe commands use
# (REGION, else boto3's: AWS_REGION or your profile), not samconfig.toml's. Nothing is built if the check fails.
deploy: stack-given $(BIN)/.installed $(SAM_VENV)/.installed
	@region="$(REGION)"; \
	if [ -z "$$region" ]; then region=$$($(BIN)/python -c 'import boto3; print(boto3.session.Session().region_name or "")'); fi; \
	if [ -z "$$region" ]; then echo "make deploy: no region: REGION=..., or AWS_REGION, or a region in your profile"; exit 2; fi; \
	PATH="$(PY312_DIR):$$PATH" $(BIN)/imagepipe deploy-check --stack "$(STACK)" --region "$$region" --sam $(SAM) \
		$(if $(PARAMS),--parameter-overrides $(PARAMS)) && \
	SAM_CLI_TELEMETRY=0 PATH="$(PY312_DIR):$$PATH" $(SAM) build $(if $(PY312),,--use-container) && \
	SAM_CLI_TELEMETRY=0 $(SAM) deploy --stack-name "$(STACK)" --region "$$region" \
		$(if $(PARAMS),--parameter-overrides "$(PARAMS)")

# `make destroy STACK=name [REGION=...]`: empties the stack's versioned buckets (after asking) and deletes it.
destroy: stack-given $(BIN)/.installed
	$(if $(REGION),AWS_REGION=$(REGION) AWS_DEFAULT_REGION=$(REGION)) $(BIN)/imagepipe destroy --stack "$(STACK)"

stack-given:
	@if [ -z "$(STACK)" ]; then echo 'usage: make deploy STACK=name [REGION=...] [PARAMS="K=V ..."] | make destroy STACK=name'; exit 2; fi

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) .aws-sam output bench/out
