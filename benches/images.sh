#!/usr/bin/env bash
# Machines that run images: pull + unpack of a 50 MB image, and the
# lifecycle and cold start of a small registry image (busybox's httpd)
# beside the built-in hangar/echo, all in sandboxes.
#
#   benches/images.sh [--count N] [--bin FILE]
#
# Needs root (sandboxes). Installs Debian's docker-registry,
# busybox-static, runc and nftables when missing, starts a registry on a
# free loopback port in a temp dir, then runs with the release binary (or
# --bin), one after the other:
#
#   hangar bench images --registry R --json          (5 pulls of ~50 MB)
#   hangar bench lifecycle --image R/bench/httpd:v1 --count N --json
#   hangar bench coldstart --image R/bench/httpd:v1 --count N --json
#   hangar bench lifecycle --count N --json          (hangar/echo)
#   hangar bench coldstart --count N --json
#
# and prints each benchmark's JSON line last, one per line.
set -euo pipefail

count=50
bin="$(dirname "$0")/../target/release/hangar"
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "no $bin: cargo build --release first" >&2; exit 1; }

missing=()
for p in docker-registry busybox-static runc nftables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
fi

tmp=$(mktemp -d)
registry_pid=
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
cat > "$tmp/config.yml" <<YML
version: 0.1
log: {level: info, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $tmp/data}
http: {addr: 127.0.0.1:0, secret: bench-only}
YML
docker-registry serve "$tmp/config.yml" 2> "$tmp/registry.log" &
registry_pid=$!
registry=
for _ in $(seq 1 100); do
  registry=$(grep -o 'listening on [0-9.:]*' "$tmp/registry.log" | head -1 | cut -d' ' -f3 || true)
  [ -n "$registry" ] && break
  sleep 0.1
done
[ -n "$registry" ] || { echo "docker-registry did not start:" >&2; cat "$tmp/registry.log" >&2; exit 1; }

out=()
run() {
  echo "== hangar bench $*" >&2
  local last
  last=$("$bin" bench "$@" | tee /dev/stderr | tail -1)
  out+=("$last")
}
run images --registry "$registry" --json
image="$registry/bench/httpd:v1"
run lifecycle --image "$image" --count "$count" --json
run coldstart --image "$image" --count "$count" --json
run lifecycle --count "$count" --json
run coldstart --count "$count" --json
printf '%s\n' "${out[@]}"
