#!/usr/bin/env bash
# Hangar's proxy against nginx and HAProxy, in front of the same machine.
#
#   benches/proxy-compare.sh [--rounds N] [--secs S] [--conns C] [--rate R]
#                            [--idle N] [--json] [--flamegraph FILE]
#                            [--instructions] [--bin FILE] [--pin]
#
# Starts `hangar dev` (port 0, temp dir) with one hangar/echo machine, then
# nginx and HAProxy from Debian (installed when missing, with wrk and
# openssl) proxying to that machine: keep-alive upstream connections, 2
# workers/threads each like Hangar's 2 workers, the same headers added by
# all three (Hangar's: Fly-*, X-Forwarded-*, Via to the machine, a request
# id and Via to the client), and TLS 1.2 and 1.3 with the same kind of key
# (ECDSA P-256: Hangar's dev certificate, a fresh openssl one for the
# others). Measured in interleaved
# rounds (every measure on every path once per round, paths in an order
# rotated every round, so drift on this shared machine hits them all and
# no path always runs after the same one):
#
#   - HTTP/1.1 keep-alive req/s and p50/p99 at saturation (wrk, C
#     connections), also directly to the machine; and the CPU time (user
#     and system, from /proc) each proxy's processes spent per request
#     in those runs (with --pin, also the static upstream's, as direct);
#   - p50/p99 at a fixed rate of R req/s (`hangar bench load`, open loop);
#   - HTTPS keep-alive req/s (wrk over TLS);
#   - new TLS sessions per second (`hangar bench handshakes`: full TLS 1.3
#     handshakes, never resumed, one `Connection: close` request each);
#   - new plain connections per second (wrk with `Connection: close`: a
#     connection per request);
#
# and once: memory per idle keep-alive connection, plain and TLS (N
# connections, each after one request: growth of the proxy's resident
# memory divided by N; benches/idle_conns.py), and the share of Hangar's
# upstream requests that went on a reused keep-alive connection. The table shows each
# figure's median and its ratios to direct, nginx and HAProxy; --json adds
# one JSON object on the last line.
#
# --flamegraph FILE profiles instead of comparing: Hangar's process under
# the keep-alive load (wrk, --secs, --conns) with `perf record` (call
# graphs from DWARF), drawn as an SVG flamegraph with inferno (perf from
# Debian and inferno from crates.io are installed when missing).
#
# --instructions counts instead of timing: the user-space instructions each
# proxy runs per request (plain and HTTPS keep-alive, wrk with one thread
# and 8 connections for --secs), every proxy under valgrind's callgrind
# (from Debian, installed when missing) with counting on only while the
# load runs, and with them the first-level cache misses (instruction and
# data) and branch mispredictions callgrind's simulation of this machine's
# caches sees. Unlike req/s on this shared machine, these do not move with
# what else runs, so a change to the request path can be judged by them;
# the kernel's share is not in them.
#
# --pin runs the layout fly-proxy lives in: each proxy with one worker
# (`proxy.workers = 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`)
# sharing core 0 with the upstream, at the same priority, and every load
# generator alone on core 1. The upstream is then a static nginx (one
# worker, a fixed 128-byte answer) run as the app's machine, so Hangar
# routes to it as to any machine and the upstream's own cost is small
# and the same for every proxy. Without --pin every process floats over
# both cores and the upstream is the hangar/echo machine.
#
# --bin FILE measures that hangar binary instead of building this
# checkout's release build: two builds compared under the same script
# and at the same hour (copy each target/release/hangar aside).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."

rounds=3 secs=5 conns=32 rate=5000 idle=1000 json=false flamegraph= instructions=false bin= pin=false
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --json) json=true; shift ;;
    --flamegraph) flamegraph=$2; shift 2 ;;
    --instructions) instructions=true; shift ;;
    --bin) bin=$2; shift 2 ;;
    --pin) pin=true; shift ;;
    *) echo "usage: $0 [--rounds N] [--secs S] [--conns C] [--rate R] [--idle N] [--json] [--flamegraph FILE] [--instructions] [--bin FILE] [--pin]" >&2; exit 2 ;;
  esac
done

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
if [ -n "$flamegraph" ]; then
  command -v perf >/dev/null || need+=(linux-perf)
  command -v inferno-flamegraph >/dev/null || cargo install --locked --quiet inferno
  case "$flamegraph" in /*) ;; *) flamegraph="$caller/$flamegraph" ;; esac
fi
$pin && { [ "$(nproc)" -ge 2 ] || { echo "--pin needs two cores" >&2; exit 1; }; }
$instructions && { command -v callgrind_control >/dev/null || need+=(valgrind); }
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
# The idle measure holds 2 x --idle connections at once (plain and TLS,
# so that freed memory of one set does not hide the other's).
ulimit -n 100000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fds=$(ulimit -n)
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=target/release/hangar
else
  case "$bin" in /*) ;; *) bin="$caller/$bin" ;; esac
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# With --pin: the prefix that puts a process (and what it starts) on the
# proxies' core or on the load's; and each proxy's workers.
on() { if $pin; then case $1 in proxy) echo "taskset -c 0" ;; load) echo "taskset -c 1" ;; esac; fi; }
if $pin; then workers=1; else workers=2; fi

# Each proxy's command prefix: nothing, or callgrind with counting off
# until the load starts (one output file per process, by pid).
counted() {
  if $instructions; then
    echo "valgrind --tool=callgrind --cache-sim=yes --branch-sim=yes --instr-atstart=no --callgrind-out-file=$tmp/cg.$1.%p"
  fi
}

# The built-in config with no limit on one client's connections, as
# nginx and HAProxy have none here: the idle measure opens 2 x --idle
# connections from one address. Every proxy keeps an idle connection for
# $idle_secs s here (by default Hangar closes one after 10 s, nginx after
# 75, HAProxy at its `timeout client`): opening the idle sets takes longer
# than that, and a connection closed during the measure is not counted.
idle_secs=300
sed -e 's/^max_conns_per_ip = .*/max_conns_per_ip = 0/' \
  -e "s/^header_timeout_ms = .*/header_timeout_ms = ${idle_secs}000/" \
  -e "s/^workers = .*/workers = $($pin && echo 1 || echo 0)/" config/dev.toml >"$tmp/hangar.toml"
for set in "max_conns_per_ip = 0" "header_timeout_ms = ${idle_secs}000"; do
  grep -q "^$set\$" "$tmp/hangar.toml" || { echo "config/dev.toml has no ${set%% =*}" >&2; exit 1; }
done

$(on proxy) $(counted hangar) "$bin" dev --config "$tmp/hangar.toml" --data-dir "$tmp/data" --flaps-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --https-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --flyd-addr 127.0.0.1:0 \
  >"$tmp/hangar.out" 2>"$tmp/hangar.err" &
pids+=($!); hangar_pid=$!
for _ in $(seq 1 600); do [ -f "$tmp/data/addrs.json" ] && break; sleep 0.05; done
[ -f "$tmp/data/addrs.json" ] || { cat "$tmp/hangar.err"; exit 1; }

addr() { python3 -c "import json; print(json.load(open('$tmp/data/addrs.json'))['$1'])"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
flaps=$(addr flaps); hangar=$(addr http); hangar_tls=$(addr https)
auth="Authorization: Bearer $(cat "$tmp/data/token")"
curl -sf -H "$auth" -X POST "http://$flaps/v1/apps" -d '{"app_name":"bench"}' >/dev/null
services='"services":[{"internal_port":8080,
    "concurrency":{"type":"requests","soft_limit":10000,"hard_limit":10000},
    "ports":[{"port":80,"handlers":["http"]},{"port":443,"handlers":["tls","http"]}]}]'
# What every nginx here is told: its pid and error log, and temp paths of
# its own, all under DIR (`nginx_files DIR` at the top, `nginx_temp DIR`
# in `http`).
nginx_files() {
  echo "pid $1/nginx.pid;"
  echo "error_log $1/error.log warn;"
}
nginx_temp() {
  for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $1/${t#client_};"; done
}

if $pin; then
  # The static upstream: nginx as the machine's command, listening on the
  # machine's private address (known to the machine alone, hence the sed).
  mkdir -p "$tmp/static"
  cat >"$tmp/static/nginx.conf.in" <<EOF
worker_processes 1;
daemon off;
$(nginx_files "$tmp/static")
events { worker_connections 8192; }
http {
  access_log off;
$(nginx_temp "$tmp/static")
  keepalive_requests 1000000;
  server {
    listen @IP@:8080;
    location / { default_type text/plain; return 200 "$(printf 'x%.0s' $(seq 1 128))"; }
  }
}
EOF
  start="sed s/@IP@/\$FLY_PRIVATE_IP/ $tmp/static/nginx.conf.in >$tmp/static/nginx.conf && exec nginx -p $tmp/static -c $tmp/static/nginx.conf"
  machine='{"image":"bench/static-nginx","init":{"exec":["/bin/sh","-c","'"$start"'"]},'"$services"'}'
else
  machine='{"image":"hangar/echo",'"$services"'}'
fi
ip=$(curl -sf -H "$auth" -X POST "http://$flaps/v1/apps/bench/machines" -d '{"config":'"$machine"'}' \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['private_ip'])")
upstream="$ip:8080"

# One ECDSA P-256 certificate for nginx and HAProxy (Hangar has its own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=bench.localhost -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null
cat "$tmp/cert.pem" "$tmp/key.pem" >"$tmp/haproxy.pem"

nginx_port=$(free_port); nginx_tls=$(free_port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes $workers;
$($instructions && echo "master_process off;  # callgrind cannot reach forked workers" || true)
daemon off;
$(nginx_files "$tmp/nginx")
events { worker_connections $fds; }
http {
  access_log off;
$(nginx_temp "$tmp/nginx")
  upstream machine { server $upstream; keepalive 128; }
  map \$https \$forwarded_ssl { on on; default off; }
  server {
    listen 127.0.0.1:$nginx_port;
    listen 127.0.0.1:$nginx_tls ssl;
    ssl_certificate $tmp/cert.pem;
    ssl_certificate_key $tmp/key.pem;
    # Debian's nginx 1.22 offers TLS 1.2 only unless told; the others
    # offer 1.3 as well.
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
    keepalive_timeout ${idle_secs}s;
    location / {
      proxy_pass http://machine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # Hangar's headers to the machine and to the client, so that every
      # proxy does the same work per request.
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Port \$server_port;
      proxy_set_header X-Forwarded-SSL \$forwarded_ssl;
      proxy_set_header Fly-Client-IP \$remote_addr;
      proxy_set_header Fly-Forwarded-Port \$server_port;
      proxy_set_header Fly-Region dev;
      proxy_set_header Fly-Request-Id \$request_id;
      proxy_set_header Via "1.1 nginx";
      add_header Fly-Request-Id \$request_id;
      add_header Via "1.1 nginx";
    }
  }
}
EOF
$(on proxy) $(counted nginx) nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" &
pids+=($!); nginx_pid=$!

haproxy_port=$(free_port); haproxy_tls=$(free_port)
cat >"$tmp/haproxy.cfg" <<EOF
global
  nbthread $workers
  maxconn $(( (fds - 200) / 2 ))
defaults
  mode http
  timeout connect 5s
  timeout client ${idle_secs}s
  timeout server 30s
  option forwardfor
  http-reuse always
frontend edge
  bind 127.0.0.1:$haproxy_port
  bind 127.0.0.1:$haproxy_tls ssl crt $tmp/haproxy.pem alpn http/1.1
  unique-id-format "%{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid"
  http-request set-header X-Forwarded-Proto https if { ssl_fc }
  http-request set-header X-Forwarded-Proto http if !{ ssl_fc }
  http-request set-header X-Forwarded-SSL on if { ssl_fc }
  http-request set-header X-Forwarded-SSL off if !{ ssl_fc }
  http-request set-header X-Forwarded-Port %[dst_port]
  http-request set-header Fly-Client-IP %[src]
  http-request set-header Fly-Forwarded-Port %[dst_port]
  http-request set-header Fly-Region dev
  http-request set-header Fly-Request-Id %[unique-id]
  http-request add-header Via "1.1 haproxy"
  http-response set-header Fly-Request-Id %[unique-id]
  http-response add-header Via "1.1 haproxy"
  default_backend machine
backend machine
  server m1 $upstream
EOF
$(on proxy) $(counted haproxy) haproxy -f "$tmp/haproxy.cfg" -db >"$tmp/haproxy.log" 2>&1 &
pids+=($!); haproxy_pid=$!

# One wrk run: "req/s p50_ms p99_ms". Extra arguments go to wrk.
wrk_run() {
  local url=$1; shift
  $(on load) wrk -t"$workers" -c"$conns" -d"${secs}s" --latency -H "Host: bench.localhost" "$@" "$url" | python3 -c '
import re, sys
text = sys.stdin.read()
def ms(v):
    n, unit = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    sys.exit(f"{errors.group(1)} failed responses")
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")'
}

# One fixed-rate run: "p50_ms p99_ms achieved_rps".
fixed_run() {
  $(on load) "$bin" bench load --addr "$1" --host bench.localhost --path '/?bytes=128' \
    --rate "$rate" --secs "$secs" --conns "$conns" --json | tail -1 | python3 -c '
import json, sys
r = json.load(sys.stdin)
if r["errors"]:
    sys.exit("%d failed requests" % r["errors"])
print("%.3f %.3f %.0f" % (r["p50_ms"], r["p99_ms"], r["achieved_rps"]))'
}

# New TLS sessions per second: "rate p50_ms p99_ms". Full handshakes,
# never resumed (wrk resumes its sessions).
handshakes_run() {
  $(on load) "$bin" bench handshakes --addr "$1" --host bench.localhost --path '/?bytes=128' \
    --secs "$secs" --conns "$conns" --json | tail -1 | python3 -c '
import json, sys
r = json.load(sys.stdin)
if r["errors"]:
    sys.exit("%d failed sessions" % r["errors"])
print("%.0f %.3f %.3f" % (r["handshakes_per_sec"], r["p50_ms"], r["p99_ms"]))'
}

plain() { case $1 in direct) echo "$upstream" ;; hangar) echo "$hangar" ;;
  nginx) echo "127.0.0.1:$nginx_port" ;; haproxy) echo "127.0.0.1:$haproxy_port" ;; esac; }
tls() { case $1 in hangar) echo "$hangar_tls" ;; nginx) echo "127.0.0.1:$nginx_tls" ;;
  haproxy) echo "127.0.0.1:$haproxy_tls" ;; esac; }

# Every path answers before measuring.
for path in direct hangar nginx haproxy; do
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null -H "Host: bench.localhost" "http://$(plain $path)/" && break
    sleep 0.05
  done
  curl -sf -o /dev/null -H "Host: bench.localhost" "http://$(plain $path)/" \
    || { echo "no answer from $path" >&2; cat "$tmp"/nginx/error.log "$tmp"/haproxy.log >&2; exit 1; }
  [ $path = direct ] || curl -sfk -o /dev/null -H "Host: bench.localhost" "https://$(tls $path)/" \
    || { echo "no TLS answer from $path" >&2; exit 1; }
done

if [ -n "$flamegraph" ]; then
  perf record -F 499 -g --call-graph dwarf,16384 -p "$hangar_pid" -o "$tmp/perf.data" \
    -- sleep "$secs" 2>/dev/null &
  perf_pid=$!
  $(on load) wrk -t"$workers" -c"$conns" -d"${secs}s" -H "Host: bench.localhost" "http://$hangar/?bytes=128" | grep Requests/sec
  wait "$perf_pid"
  perf script -i "$tmp/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph >"$flamegraph"
  echo "flamegraph of Hangar's process under keep-alive load: $flamegraph"
  exit 0
fi

if $instructions; then
  # The process that serves requests (nginx's without workers here).
  served_by() { case $1 in hangar) echo "$hangar_pid" ;;
    nginx) echo "$nginx_pid" ;; haproxy) echo "$haproxy_pid" ;; esac; }
  # Per request of `wrk` on URL against the processes PIDS: instructions,
  # I1 misses, D1 misses, branch mispredictions.
  count() {
    local url=$1; shift
    for p in "$@"; do callgrind_control -i on "$p" >/dev/null 2>&1; done
    $(on load) wrk -t1 -c8 -d2s -H "Host: bench.localhost" "$url" >/dev/null
    for p in "$@"; do callgrind_control -z "$p" >/dev/null 2>&1; done
    local n
    n=$($(on load) wrk -t1 -c8 -d"${secs}s" -H "Host: bench.localhost" "$url" | awk '/requests in/ {print $1}')
    for p in "$@"; do
      callgrind_control -d "$p" >/dev/null 2>&1
      callgrind_control -i off "$p" >/dev/null 2>&1
    done
    # Each dump's "events:" line names the columns of its "summary:" line.
    local files=()
    for p in "$@"; do files+=("$tmp"/cg.*."$p".*); done
    python3 - "$n" "${files[@]}" <<'PY'
import sys
n, total = int(sys.argv[1]), {}
for path in sys.argv[2:]:
    lines = dict(l.split(":", 1) for l in open(path) if l.startswith(("events:", "summary:")))
    for event, v in zip(lines["events"].split(), lines["summary"].split()):
        total[event] = total.get(event, 0) + int(v)
per = lambda *events: round(sum(total[e] for e in events) / n)
print(per("Ir"), per("I1mr"), per("D1mr", "D1mw"), per("Bcm", "Bim"))
PY
    rm -f "${files[@]}"
  }
  declare -A counts
  for path in hangar nginx haproxy; do
    # shellcheck disable=SC2046
    counts[plain_$path]=$(count "http://$(plain $path)/?bytes=128" $(served_by $path))
    # shellcheck disable=SC2046
    counts[https_$path]=$(count "https://$(tls $path)/?bytes=128" $(served_by $path))
    echo "$path counted" >&2
  done
  python3 - "$secs" "$json" "${counts[plain_hangar]}" "${counts[plain_nginx]}" "${counts[plain_haproxy]}" \
    "${counts[https_hangar]}" "${counts[https_nginx]}" "${counts[https_haproxy]}" <<'PY'
import json, sys
secs, as_json, *counts = sys.argv[1:]
names = ["hangar", "nginx", "haproxy"]
events = ["instructions", "I1 misses", "D1 misses", "mispredicts"]
per = {kind: {name: dict(zip(events, map(int, counts[3 * k + i].split())))
              for i, name in enumerate(names)}
       for k, kind in enumerate(["plain", "https"])}
print(f"per request, user space (callgrind with simulated caches; wrk -t1 -c8, {secs}s each)")
print(f"{'measure':<30}" + "".join(f"{n:>10}" for n in names) + f"{'h/nginx':>10}{'h/haproxy':>11}")
for kind, by in per.items():
    for event in events:
        h, n, x = (by[name][event] for name in names)
        print(f"{kind + ' keep-alive ' + event:<30}{h:>10}{n:>10}{x:>10}{h / n:>10.2f}{h / x:>11.2f}")
if as_json == "true":
    print(json.dumps({"bench": "proxy-compare-instructions", "secs": float(secs), **per}))
PY
  exit 0
fi

# A path's processes: the proxy's (nginx's workers, HAProxy's one
# process, Hangar's whole process); for `direct`, with --pin, the static
# upstream's.
pids_of() { case $1 in hangar) echo "$hangar_pid" ;;
  nginx) pgrep -P "$nginx_pid" | tr '\n' ' ' ;;
  haproxy) echo "$haproxy_pid" ;;
  direct) if $pin; then
      local master; master=$(pgrep -f -- "-c $tmp/static/nginx.conf")
      echo "$master $(pgrep -P "$master" | tr '\n' ' ')"
    fi ;; esac; }

# CPU time the processes of a path have used: "user system", in clock
# ticks.
ticks() {
  # shellcheck disable=SC2046
  python3 - $(pids_of "$1") <<'PY'
import sys
user = system = 0
for pid in sys.argv[1:]:
    # After the command's closing parenthesis: field 3 on; utime is 14.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    user += int(fields[11]); system += int(fields[12])
print(user, system)
PY
}

# A keep-alive run, and the CPU its path's processes spent on each
# request: "keepalive req/s p50 p99", then "cpu user_us system_us".
keepalive_run() {
  local path=$1 before after line hz
  hz=$(getconf CLK_TCK)
  before=$(ticks "$path")
  line=$(wrk_run "http://$(plain "$path")/?bytes=128")
  after=$(ticks "$path")
  echo "keepalive $path $line"
  [ -n "$(pids_of "$path")" ] || return 0
  python3 -c '
import sys
before, after, line, secs, hz = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3].split(), float(sys.argv[4]), int(sys.argv[5])
requests = float(line[0]) * secs
us = [(int(a) - int(b)) * 1e6 / hz / requests for a, b in zip(after, before)]
print("cpu", sys.argv[6], "%.2f %.2f" % tuple(us))' "$before" "$after" "$line" "$secs" "$hz" "$path"
}

results="$tmp/results"
: >"$results"
paths=(direct hangar nginx haproxy)
for round in $(seq 1 "$rounds"); do
  # Each measure runs on every path in turn, in an order rotated every
  # round: a run follows a run of the same kind, and no path always
  # follows the same one (what ran just before moves a path's figure here).
  by=$(( (round - 1) % ${#paths[@]} ))
  order=("${paths[@]:by}" "${paths[@]:0:by}")
  for path in "${order[@]}"; do
    keepalive_run "$path" >>"$results"
  done
  for path in "${order[@]}"; do
    echo "fixed $path $(fixed_run "$(plain $path)")" >>"$results"
  done
  for path in "${order[@]}"; do
    [ "$path" = direct ] && continue
    echo "https $path $(wrk_run "https://$(tls $path)/?bytes=128")" >>"$results"
  done
  for path in "${order[@]}"; do
    echo "connects $path $(wrk_run "http://$(plain $path)/?bytes=128" -H "Connection: close")" >>"$results"
  done
  for path in "${order[@]}"; do
    [ "$path" = direct ] && continue
    echo "handshakes $path $(handshakes_run "$(tls $path)")" >>"$results"
  done
  echo "round $round done" >&2
done

# Upstream keep-alive reuse over everything Hangar forwarded above.
curl -sf "http://$(addr metrics)/metrics" | python3 -c '
import re, sys
text = sys.stdin.read()
n = {k: float(v) for k, v in re.findall(r"fly_edge_upstream_requests_total\{connection=\"(\w+)\"\} (\S+)", text)}
total = n.get("new", 0) + n.get("reused", 0)
print("reuse hangar", 100 * n.get("reused", 0) / total if total else 0)' >>"$results"

# Memory per idle connection: the proxy processes only (see pids_of).
for path in hangar nginx haproxy; do
  # shellcheck disable=SC2046
  # A proxy that cannot hold them (HAProxy takes two descriptors a
  # connection) gets no figure rather than ending the run.
  # shellcheck disable=SC2046
  if grown=$($(on load) python3 benches/idle_conns.py "$(plain $path)" "$(tls $path)" "$idle" $(pids_of $path)); then
    read -r plain_bytes tls_bytes <<<"$grown"
    echo "idle_plain $path $plain_bytes" >>"$results"
    echo "idle_tls $path $tls_bytes" >>"$results"
  else
    echo "idle: $path could not hold 2 x $idle connections (open files: $fds)" >&2
  fi
done

layout=$($pin && echo "pinned: proxies and a static upstream on core 0, load on core 1, one worker each" || echo "unpinned: every process on both cores, echo upstream, two workers each")
python3 - "$results" "$rounds" "$secs" "$conns" "$rate" "$idle" "$json" "$layout" <<'PYEOF'
import json, statistics, sys
path, rounds, secs, conns, rate, idle, as_json, layout = sys.argv[1:]
runs = {}
for line in open(path):
    kind, name, *values = line.split()
    runs.setdefault(kind, {}).setdefault(name, []).append([float(v) for v in values])
def med(kind, name, i):
    rs = runs.get(kind, {}).get(name)
    return statistics.median(r[i] for r in rs) if rs else None
# (label, kind, column)
rows = [
    ("keep-alive req/s", "keepalive", 0),
    ("keep-alive p50 ms", "keepalive", 1),
    ("keep-alive p99 ms", "keepalive", 2),
    ("keep-alive CPU user us/req", "cpu", 0),
    ("keep-alive CPU system us/req", "cpu", 1),
    (f"fixed {rate}/s p50 ms", "fixed", 0),
    (f"fixed {rate}/s p99 ms", "fixed", 1),
    ("https keep-alive req/s", "https", 0),
    ("https p99 ms", "https", 2),
    ("new connections/s", "connects", 0),
    ("new TLS handshakes/s", "handshakes", 0),
    ("idle conn bytes, plain", "idle_plain", 0),
    ("idle conn bytes, TLS", "idle_tls", 0),
    ("upstream reuse %", "reuse", 0),
]
names = ["direct", "hangar", "nginx", "haproxy"]
fmt = lambda v: "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.3f}")
ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"
print(f"{rounds} interleaved rounds of {secs}s, {conns} connections (medians); idle memory over {idle} connections")
print(layout)
print(f"{'measure':<24}" + "".join(f"{n:>10}" for n in names) + f"{'h/direct':>10}{'h/nginx':>10}{'h/haproxy':>10}")
table = {}
for label, kind, i in rows:
    vals = {n: med(kind, n, i) for n in names}
    table[label] = vals
    h = vals["hangar"]
    print(f"{label:<24}" + "".join(f"{fmt(vals[n]):>10}" for n in names)
          + f"{ratio(h, vals['direct']):>10}{ratio(h, vals['nginx']):>10}{ratio(h, vals['haproxy']):>10}")
if as_json == "true":
    print(json.dumps({
        "bench": "proxy-compare", "rounds": int(rounds), "secs": float(secs), "conns": int(conns),
        "rate": int(rate), "idle": int(idle), "pinned": layout.startswith("pinned"),
        "medians": table, "runs": runs,
    }))
PYEOF
