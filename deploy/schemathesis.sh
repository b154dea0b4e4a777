#!/usr/bin/env bash
# Property-based API testing of the query service against its own OpenAPI
# document: schemathesis (from PyPI) reads /openapi.json and sends generated
# requests, valid and invalid, to every operation, and fails on any 5xx, a
# status code the document does not list, a wrong content type, or a body
# that breaks the documented schema.
#
#   bash deploy/schemathesis.sh
#
# What it sets up, all of it its own and removed at the end:
#   * a database `elaaoms_schemathesis_<pid>` (migrated by `elaaoms migrate`,
#     with the services' login role `elaaoms_schemathesis`), one organization
#     with an API key and an agent secret (the CLI), and one known caller
#     with three memories, so listings, context and the tool return data;
#   * `elaaoms query` on a free local port, on its own bus namespace and
#     payload directory.
# schemathesis sends the API key and the agent secret on every request (so
# most generated requests get past authentication) and runs every operation,
# erasure included.
#
# Idempotent; its tool (pinned with hashes in
# deploy/requirements-schemathesis.txt) goes into a virtualenv under
# data/cache/tools/ the first time (needs PyPI) and is reused afterwards.
# Needs the running PostgreSQL and NATS of deploy/local/setup.sh, and the
# embedding model it installs.
#
# Environment:
#   DATABASE_ADMIN_URL        default postgres://postgres@127.0.0.1:5432/postgres
#   NATS_URL                  default nats://127.0.0.1:4222
#   EMBEDDING_MODEL_DIR       default data/models/all-MiniLM-L6-v2
#   ELAAOMS_BIN               a built `elaaoms`; default: cargo build --bin elaaoms
#   ELAAOMS_TOOLS_DIR         default data/cache/tools
#   SCHEMATHESIS_MAX_EXAMPLES test cases per operation and phase, default 50
#   SCHEMATHESIS_SEED         default 1 (reproducible runs)
#   SCHEMATHESIS_REPORT_DIR   default data/cache/schemathesis-report (JUnit XML)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DATABASE_ADMIN_URL="${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
EMBEDDING_MODEL_DIR="${EMBEDDING_MODEL_DIR:-data/models/all-MiniLM-L6-v2}"
TOOLS_DIR="${ELAAOMS_TOOLS_DIR:-$ROOT/data/cache/tools}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
SEED="${SCHEMATHESIS_SEED:-1}"
REPORT_DIR="${SCHEMATHESIS_REPORT_DIR:-$ROOT/data/cache/schemathesis-report}"
REQUIREMENTS=deploy/requirements-schemathesis.txt
SLUG=schemathesis
SERVICE_ROLE=elaaoms_schemathesis
CALLER='+14155550123'

START=$SECONDS
WORK="$(mktemp -d -t elaaoms-schemathesis.XXXXXX)"
DB="elaaoms_schemathesis_$$"
QUERY_PID=""

say() { printf 'schemathesis.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The server's admin URL (DATABASE_ADMIN_URL is pointed at our database below).
SERVER_ADMIN_URL="$DATABASE_ADMIN_URL"
psql_admin() { psql "$SERVER_ADMIN_URL" -X -w -q -v ON_ERROR_STOP=1 -Atc "$1"; }

cleanup() {
  local rc=$?
  if [[ -n "$QUERY_PID" ]] && kill -0 "$QUERY_PID" 2>/dev/null; then
    kill "$QUERY_PID" 2>/dev/null || true
    wait "$QUERY_PID" 2>/dev/null || true
  fi
  psql_admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  if [[ $rc -ne 0 && -f "$WORK/query.log" ]]; then
    say "the service's last log lines:"
    tail -n 20 "$WORK/query.log" >&2 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# A URL with another database (and optionally another user and password).
with_database() { # URL DB [USER PASSWORD]
  python3 - "$@" <<'PY'
import sys
from urllib.parse import urlsplit, urlunsplit, quote
url, db = sys.argv[1], sys.argv[2]
parts = urlsplit(url)
netloc = parts.netloc
if len(sys.argv) > 4:
    host = netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(sys.argv[3], safe='')}:{quote(sys.argv[4], safe='')}@{host}"
print(urlunsplit((parts.scheme, netloc, "/" + db, parts.query, "")))
PY
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ------------------------------------------------------------------ tools

ensure_schemathesis() {
  local key venv
  key="$(sha256sum "$REQUIREMENTS" | cut -c1-12)"
  venv="$TOOLS_DIR/schemathesis-$key"
  if [[ ! -f "$venv/.complete" ]]; then
    say "installing schemathesis into ${venv#"$ROOT"/} (pinned with hashes)"
    mkdir -p "$TOOLS_DIR"
    rm -rf "$venv"
    python3 -m venv "$venv" >"$WORK/venv.log" 2>&1 \
      || die "cannot create a virtualenv (install python3-venv): $(tail -n 3 "$WORK/venv.log")"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
      -r "$REQUIREMENTS" >"$WORK/pip.log" 2>&1 \
      || die "pip install --require-hashes -r $REQUIREMENTS failed: $(tail -n 6 "$WORK/pip.log")"
    touch "$venv/.complete"
    # Virtualenvs of earlier pins.
    find "$TOOLS_DIR" -maxdepth 1 -name 'schemathesis-*' ! -name "schemathesis-$key" -exec rm -rf {} +
  fi
  ST="$venv/bin/st"
  say "$("$ST" --version)"
}

ensure_binary() {
  if [[ -n "${ELAAOMS_BIN:-}" ]]; then
    BIN="$ELAAOMS_BIN"
  else
    say "building elaaoms (debug)"
    cargo build --quiet --bin elaaoms
    BIN="$ROOT/target/debug/elaaoms"
  fi
  [[ -x "$BIN" ]] || die "$BIN is not an executable"
}

# ------------------------------------------------------------------ setup

setup_database() {
  local password
  password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  ADMIN_URL="$(with_database "$SERVER_ADMIN_URL" "$DB")"
  SERVICE_URL="$(with_database "$SERVER_ADMIN_URL" "$DB" "$SERVICE_ROLE" "$password")"
  export DATABASE_ADMIN_URL="$ADMIN_URL" DATABASE_URL="$SERVICE_URL"
  "$BIN" migrate >"$WORK/migrate.log" 2>&1 || die "elaaoms migrate failed: $(tail -n 5 "$WORK/migrate.log")"

  "$BIN" org create --slug "$SLUG" --hmac-secret "$(python3 -c 'import secrets; print(secrets.token_hex(24))')" \
    >"$WORK/org.log" 2>&1 || die "elaaoms org create failed: $(tail -n 5 "$WORK/org.log")"
  API_KEY="$(grep -oE 'elk_[0-9a-f]{64}' "$WORK/org.log" | head -n 1)"
  [[ -n "$API_KEY" ]] || die "no API key in the output of elaaoms org create"
  "$BIN" org agent-secret --slug "$SLUG" >"$WORK/secret.log" 2>&1 \
    || die "elaaoms org agent-secret failed: $(tail -n 5 "$WORK/secret.log")"
  AGENT_SECRET="$(grep -oE 'eas_[0-9a-f]{64}' "$WORK/secret.log" | head -n 1)"
  [[ -n "$AGENT_SECRET" ]] || die "no agent secret in the output of elaaoms org agent-secret"

  # One known caller with memories; the embedding is a constant unit vector
  # (search scores do not matter here, shapes do).
  psql "$ADMIN_URL" -X -w -q -v ON_ERROR_STOP=1 -v caller="$CALLER" -v slug="$SLUG" >/dev/null <<'SQL'
WITH org AS (SELECT id FROM organizations WHERE slug = :'slug')
INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
SELECT id, :'caller', now() - interval '30 days', now() - interval '1 day', 1 FROM org;
INSERT INTO agents (organization_id, agent_id)
SELECT id, 'agent_schemathesis' FROM organizations WHERE slug = :'slug';
INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
SELECT id, 'conv_schemathesis_1', 'agent_schemathesis', :'caller', now() - interval '1 day', 'completed'
  FROM organizations WHERE slug = :'slug';
INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type, importance,
                      confidence, status, metadata, embedding, embedding_model, created_at)
SELECT o.id, :'caller', 'agent_schemathesis', 'conv_schemathesis_1', m.content, m.type, m.importance,
       0.9, m.status, '{}'::jsonb, array_fill(0.05103103630798288::real, ARRAY[384])::vector,
       'all-MiniLM-L6-v2', now() - m.age
  FROM organizations o,
       (VALUES ('The caller is allergic to penicillin', 'factual', 9, NULL, interval '3 hours'),
               ('The caller prefers morning appointments', 'preference', 5, NULL, interval '2 hours'),
               ('The caller waits for a refund', 'issue', 7, 'open', interval '1 hour'))
         AS m(content, type, importance, status, age)
 WHERE o.slug = :'slug';
SQL
  say "database $DB: organization $SLUG with an API key, an agent secret and caller $CALLER"
}

start_query() {
  local port
  port="$(free_port)"
  BASE="http://127.0.0.1:$port"
  mkdir -p "$WORK/payloads"
  QUERY_ADDR="127.0.0.1:$port" NATS_URL="$NATS_URL" BUS_NAMESPACE="schemathesis_$$" \
    PAYLOAD_DIR="$WORK/payloads" EMBEDDING_MODEL_DIR="$EMBEDDING_MODEL_DIR" \
    "$BIN" query >"$WORK/query.log" 2>&1 &
  QUERY_PID=$!
  for _ in $(seq 1 300); do
    if curl -fsS "$BASE/readyz" >/dev/null 2>&1; then
      say "elaaoms query ready on $BASE"
      return 0
    fi
    kill -0 "$QUERY_PID" 2>/dev/null || die "elaaoms query exited: $(tail -n 5 "$WORK/query.log")"
    sleep 0.2
  done
  die "elaaoms query did not become ready within 60 s"
}

# ------------------------------------------------------------------ run

ensure_schemathesis
ensure_binary
setup_database
start_query

# Known identifiers, so that generated requests reach past "not found":
# the organization of the agent endpoints everywhere, and for reads the
# seeded caller, conversation and a memory (erasure and deletion keep
# generated identifiers, so they do not remove the seeded data early).
MEMORY_ID="$(psql "$ADMIN_URL" -X -w -Atc "SELECT id FROM memories ORDER BY created_at LIMIT 1")"
cat >"$WORK/schemathesis.toml" <<TOML
[parameters]
"path.org" = "$SLUG"

[[operations]]
include-method = "GET"
parameters = { "path.caller_id" = "$CALLER", "path.conversation_id" = "conv_schemathesis_1", "path.memory_id" = "$MEMORY_ID" }
TOML

mkdir -p "$REPORT_DIR"
say "running schemathesis: $MAX_EXAMPLES examples per operation, seed $SEED"
rc=0
"$ST" --config-file "$WORK/schemathesis.toml" run "$BASE/openapi.json" \
  --url "$BASE" \
  --header "Authorization: Bearer $API_KEY" \
  --header "X-Elaaoms-Secret: $AGENT_SECRET" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 2 \
  --request-timeout 30 \
  --report junit --report-dir "$REPORT_DIR" \
  --output-sanitize true || rc=$?

# The service must also have survived the run.
curl -fsS "$BASE/healthz" >/dev/null || { say "the service stopped answering"; rc=1; }
if grep -q 'panicked' "$WORK/query.log"; then
  say "the service panicked:"; grep -m 3 -A 3 'panicked' "$WORK/query.log" >&2; rc=1
fi
say "finished in $((SECONDS - START)) s (exit $rc); JUnit report in ${REPORT_DIR#"$ROOT"/}"
exit "$rc"
