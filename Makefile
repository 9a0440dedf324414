# The front door. `make up` brings the whole real stack up; `make test` runs the whole suite.
SHELL := /bin/bash
STACK := deploy/local/stack.sh

.PHONY: up down status logs reset test bench lint fmt migrate newman help

help:            ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

up:              ## install what is missing and start Postgres, Kafka, MinIO and the four services
	@bash $(STACK) up

down:            ## stop everything the stack started
	@bash $(STACK) down

status:          ## what runs, and where
	@bash $(STACK) status

logs:            ## follow the logs (make logs C=api for one component)
	@bash $(STACK) logs $(C)

reset:           ## stop everything and wipe all local data
	@bash $(STACK) reset

test:            ## install, start the stack, run lint + the whole suite, stop what it started
	@bash deploy/local/test.sh

bench:           ## run the benchmarks in tests/bench (make bench B=tests/bench/<file> for one)
	@bash deploy/local/test.sh --bench $(B)

lint:            ## ruff
	@uv run --no-sync ruff check . && uv run --no-sync ruff format --check .

fmt:             ## format the code
	@uv run --no-sync ruff format . && uv run --no-sync ruff check --fix .
