# The two commands of the README, and the steps they share. Every step is
# idempotent: run them as often as you like.

# The bundled fixtures' organization, so `make run` can be tried at once.
DEMO_ORG ?= fixture-org-a
DEMO_SECRET ?= whsec_fixture_0123456789abcdef0123456789abcdef

.PHONY: run test setup migrate check validate-deploy

## Install/start what is missing (NATS, Postgres + pgvector, the embedding model).
setup:
	bash deploy/local/setup.sh

migrate: setup
	cargo build --bin elaaoms
	./target/debug/elaaoms migrate
	ELAAOMS_HMAC_SECRET=$(DEMO_SECRET) ./target/debug/elaaoms org create --slug $(DEMO_ORG) --name "Fixture Org A" --if-not-exists

## Run the whole system locally (all four services in one process).
run: migrate
	./target/debug/elaaoms run

## Formatting and lints, as CI runs them.
check:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

## Render and validate the deployment manifests offline.
validate-deploy:
	bash deploy/validate.sh

## Every test, against the real NATS and Postgres.
test: setup check validate-deploy
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest is not installed: using cargo test"; \
		cargo test --workspace --no-fail-fast; \
	fi
	bash deploy/schemathesis.sh
