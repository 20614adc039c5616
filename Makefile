# refund-classifier — `make demo` and `make test` set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
VERSION ?= 1
# The catalogue whose images `make bench` sends (Kaggle layout: images/<id>.jpg), passed to the benches as
# $RC_BENCH_DATA; empty: generated images. Default: the real catalogue where it sits beside the repository.
BENCH_DATA ?= $(wildcard ../shared/datasets/fashion-small)

.PHONY: help venv demo test test-fast up down status bench clean

help:
	@echo "make demo   - sample catalogue -> train -> export -> TorchServe + PostgreSQL -> ingest -> report -> review desk"
	@echo "make test   - the test suite (real TorchServe, real PostgreSQL)"
	@echo "make test-fast - the unit tests only: no services, seconds"
	@echo "make bench [BENCH_DATA=CATALOGUE] [BENCH_ARGS=--quick] - the benchmarks"
	@echo "make up | down | status - the services"

# Recreated only when the requirements change (requirements-test.txt: what the tests add;
# requirements-runtimes.txt: Java and PostgreSQL for machines without them).
$(STAMP): requirements.txt requirements-test.txt requirements-runtimes.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt -r requirements-runtimes.txt
	@touch $(STAMP)

venv: $(STAMP)

# When this make began, before the virtualenv (a prerequisite) was made: the demo's first figure.
MAKE_T0 := $(shell date +%s%N)
DEMO_TIMES := $(DEMO)/times.txt
# $(call timed,STEP,COMMAND): runs COMMAND (echoed as make would) and adds "STEP milliseconds" to DEMO_TIMES.
timed = @echo '$(2)'; t=$$(date +%s%N); $(2) && echo "$(1) $$(( ($$(date +%s%N) - t) / 1000000 ))" >> $(DEMO_TIMES)

demo: $(STAMP)
	@mkdir -p $(DEMO) && echo "virtualenv $$(( ($$(date +%s%N) - $(MAKE_T0)) / 1000000 ))" > $(DEMO_TIMES)
	$(call timed,sample-catalogue,$(PY) -m training.make_sample_catalogue --out $(DEMO)/catalogue --per-class 60 --outside-per-class 30 --seed 0 && $(PY) -m training.make_sample_catalogue --out $(DEMO)/unseen --per-class 5 --outside-per-class 2 --seed 12345 --first-id 90000)
	$(call timed,training,$(PY) -m training.train --data-dir $(DEMO)/catalogue --out $(DEMO)/run --epochs 8 --image-size 64 48)
	$(call timed,export,$(PY) -m training.export --run $(DEMO)/run --version $(VERSION) --force)
	$(PY) -m serving down >/dev/null
	$(call timed,services-start,$(PY) -m serving up --archive refund_classifier-$(VERSION).mar)
	rm -rf $(DEMO)/inbox && mkdir -p $(DEMO)/inbox && cp $(DEMO)/unseen/images/*.jpg $(DEMO)/inbox/
	$(call timed,ingest,$(PY) -m ingest run --inbox $(DEMO)/inbox)
	$(PY) -m ingest report --latest 10
	@echo
	$(PY) -m review add-reviewer demo --generate-password --replace
	$(call timed,review-desk-start,$(PY) -m review up)
	@echo
	@echo "demo: where the time went (seconds; the virtualenv is made on first use only, services-start is serving up's PostgreSQL + TorchServe)"
	@awk '{ms += $$2; printf "  %-18s %7.1f\n", $$1, $$2 / 1000} END {printf "  %-18s %7.1f\n", "in all", ms / 1000}' $(DEMO_TIMES)
	@echo
	@echo "Review desk: http://127.0.0.1:$${REVIEW_PORT:-8090}/ - log in as 'demo' with the password printed above."
	@echo "TorchServe, PostgreSQL and the review desk are still running: 'make status' shows them, 'make down' stops them."

test: $(STAMP)
	$(PY) -m pytest

# Tests marked (or, by their fixtures, found to be) integration start PostgreSQL / TorchServe: left out.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration"

up: $(STAMP)
	$(PY) -m serving up

down: $(STAMP)
	$(PY) -m serving down

status: $(STAMP)
	$(PY) -m serving status

bench: $(STAMP)
	RC_BENCH_DATA=$(BENCH_DATA) $(PY) -m bench $(BENCH_ARGS)

clean: down
	rm -rf runs .run
