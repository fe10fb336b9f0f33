# Benchmarks are not part of the test command; see docs/benchmarks.md for what each one measures.
PYTHON ?= .venv/bin/python

.PHONY: bench bench-deps bench-quality bench-training bench-cost bench-service bench-report

bench: bench-deps bench-quality bench-training bench-cost bench-service bench-report

# matplotlib (the bench extra) draws the figures; the test install does not include it.
bench-deps:
	$(PYTHON) -m pip install --quiet -e ".[bench]"

bench-quality:
	OMP_NUM_THREADS=1 $(PYTHON) bench/quality.py

bench-training:
	OMP_NUM_THREADS=1 $(PYTHON) bench/training.py --steps 90

bench-cost:
	OMP_NUM_THREADS=1 $(PYTHON) bench/cost.py --sizes minilm,llama-0.1b,llama-0.5b

# Needs PostgreSQL and Redis on 127.0.0.1; see the top of bench/service.py.
bench-service:
	OMP_NUM_THREADS=1 $(PYTHON) bench/service.py --compare-uvicorn

bench-report:
	OMP_NUM_THREADS=1 $(PYTHON) bench/report.py
