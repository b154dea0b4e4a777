#!/usr/bin/env bash
# Container health check without curl (the runtime image is debian slim):
# an HTTP/1.0 GET over bash's /dev/tcp. Installed in the image as
# /usr/local/bin/elaaoms-healthcheck; used by its HEALTHCHECK and by
# docker-compose.yml.
#
#   elaaoms-healthcheck [PORT [PATH]]
#
# With a PORT, that port must answer PATH (default /healthz) with 200.
# Without one, every service port of the image that accepts a connection
# (8080 ingest, 8081 query, 9091 extractor, 9092 indexer) must answer
# /healthz with 200, and at least one must: this fits `elaaoms run` (all
# four in one process) as well as a container that runs one service.
set -u

# 0: answered 200; 1: answered something else (or nothing); 2: not listening.
probe() {
  local port="$1" path="$2" status=""
  { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 2
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
  IFS= read -r -t 3 status <&3
  while IFS= read -r -t 1 _ <&3; do :; done  # drain, so the server sees a clean close
  exec 3<&-
  status="${status%$'\r'}"
  [[ "$status" == "HTTP/1."[01]" 200"* ]] && return 0
  echo "127.0.0.1:$port$path answered: ${status:-nothing}" >&2
  return 1
}

if [[ $# -ge 1 ]]; then
  probe "$1" "${2:-/healthz}"
  rc=$?
  [[ $rc -eq 2 ]] && echo "nothing listens on 127.0.0.1:$1" >&2
  [[ $rc -eq 0 ]]
  exit
fi

answered=0
for port in 8080 8081 9091 9092; do
  probe "$port" /healthz
  case $? in
    0) answered=1 ;;
    1) exit 1 ;;
    *) ;;  # nothing listens there: another service's port
  esac
done
[[ $answered -eq 1 ]] || { echo "no ELAAOMS service answers on 8080, 8081, 9091 or 9092" >&2; exit 1; }
