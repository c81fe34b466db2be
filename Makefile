# Each target bootstraps its own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PY_SRC := src tests benchmarks examples scripts/verify-stack

.PHONY: venv lint test demo bench bench-quick bench-audit soak reliability clean stack-up verify-stack stack-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check $(PY_SRC)
	$(BIN)/ruff format --check $(PY_SRC)
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: venv
	$(BIN)/python -m otel_celery_publish.demo

# Every write-path benchmark (publish latency per mode, worker throughput, spool drain, RSS over
# 1M publishes), ratios against bare Celery in the same run: ~20 min. bench-quick: a smoke run.
bench: venv
	$(BIN)/python benchmarks/run_all.py

bench-quick: venv
	$(BIN)/python benchmarks/run_all.py --quick

# 10 million rows in a scratch PostgreSQL database: how fast `lost` and `stats` stay.
bench-audit: venv
	$(BIN)/python benchmarks/audit_scale.py

# 10 minutes of publish + worker load with a 30 s database hang and a 30 s outage (not in CI).
soak: venv
	$(BIN)/python benchmarks/soak.py

# The fault, bad-input and security suite; rewrites the results table in docs/RELIABILITY.md.
reliability: venv
	$(BIN)/python benchmarks/reliability_report.py

# The real stack (needs Docker): collector, Jaeger, Tempo, Prometheus, Grafana, a demo worker and
# producer. verify-stack checks a fresh trace end to end and the audit row.
stack-up:
	docker compose up --build -d

verify-stack:
	python3 scripts/verify-stack

stack-down:
	docker compose down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache celery_audit.db*
