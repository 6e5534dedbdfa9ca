# The two commands of the README are `make demo` and `make test`; both run the idempotent setup first.
SHELL := /bin/bash
VENV := .venv
VITRINE := $(VENV)/bin/vitrine

.PHONY: setup demo test test-unit test-random test-integration up down status clean proto dashboards ghz

setup:  ## install everything this machine lacks (Debian packages, .venv, Kafka jars, Triton binary)
	@bash deploy/setup.sh

demo: setup  ## the main job: the stack up and healthy, then a simulated shopper against it
	@$(VITRINE) stack up
	@$(VITRINE) demo

test: setup  ## every test: unit tests, then integration tests on a real stack started on shifted ports
	@$(VENV)/bin/python -m pytest

test-unit: setup
	@$(VENV)/bin/python -m pytest tests/unit

test-random: setup  ## the unit tests in a random order (pytest-randomly; the seed is printed, repeat an order with --randomly-seed=N)
	@$(VENV)/bin/python -m pytest tests/unit -p randomly

test-integration: setup
	@$(VENV)/bin/python -m pytest -m integration

up: setup
	@$(VITRINE) stack up

down:
	@$(VITRINE) stack down

status:
	@$(VITRINE) stack status

clean: down  ## remove the stack's state (Redis data, Kafka log, Prometheus TSDB) and logs
	rm -rf .stack .stack-*

proto:  ## regenerate vitrine/v1/*_pb2*.py from proto/ (committed; tests check they are current)
	@$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/vitrine/v1/recommender.proto

dashboards:  ## regenerate grafana/dashboards/*.json from grafana/build.py (committed; tests check they are current)
	@$(VENV)/bin/python grafana/build.py

ghz:  ## install ghz (a Go gRPC load tool) into the cache, for loadtest/ghz_crosscheck.py
	@GOBIN=$${VITRINE_CACHE:-$$HOME/.cache/vitrine}/go/bin go install github.com/bojand/ghz/cmd/ghz@v0.120.0
