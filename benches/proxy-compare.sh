#!/usr/bin/env bash
# Hangar's proxy against nginx and HAProxy, in front of the same machine.
#
#   benches/proxy-compare.sh [--rounds N] [--secs S] [--conns C] [--json]
#
# Starts `hangar dev` (port 0, temp dir) with one hangar/echo machine, then
# nginx and HAProxy from Debian (installed when missing) proxying to that
# machine with keep-alive upstream connections, 2 workers/threads each like
# Hangar's 2-core runtime, and X-Forwarded-For added by all three. wrk
# measures HTTP/1.1 keep-alive at saturation through each path and directly
# to the machine, in interleaved rounds (every path once per round, so drift
# on this shared machine hits them all); the table shows each path's median
# over the rounds and its ratios to direct, nginx and HAProxy.
#
# Not measured yet (the proxy issue asks for them): a fixed request rate,
# HTTPS keep-alive, new TLS handshakes per second, memory per idle
# connection.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3 secs=5 conns=32 json=false
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --json) json=true; shift ;;
    *) echo "usage: $0 [--rounds N] [--secs S] [--conns C] [--json]" >&2; exit 2 ;;
  esac
done

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
cargo build --release --quiet
bin=target/release/hangar

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

"$bin" dev --data-dir "$tmp/data" --flaps-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --https-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --flyd-addr 127.0.0.1:0 \
  >"$tmp/hangar.out" 2>"$tmp/hangar.err" &
pids+=($!)
for _ in $(seq 1 600); do [ -f "$tmp/data/addrs.json" ] && break; sleep 0.05; done
[ -f "$tmp/data/addrs.json" ] || { cat "$tmp/hangar.err"; exit 1; }

addr() { python3 -c "import json; print(json.load(open('$tmp/data/addrs.json'))['$1'])"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
flaps=$(addr flaps); hangar=$(addr http)
auth="Authorization: Bearer $(cat "$tmp/data/token")"
curl -sf -H "$auth" -X POST "http://$flaps/v1/apps" -d '{"app_name":"bench"}' >/dev/null
ip=$(curl -sf -H "$auth" -X POST "http://$flaps/v1/apps/bench/machines" \
  -d '{"config":{"image":"hangar/echo","services":[{"internal_port":8080,"ports":[{"port":80,"handlers":["http"]}]}]}}' \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['private_ip'])")
upstream="$ip:8080"

nginx_port=$(free_port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  upstream machine { server $upstream; keepalive 128; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://machine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" &
pids+=($!)

haproxy_port=$(free_port)
cat >"$tmp/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option forwardfor
  http-reuse always
frontend edge
  bind 127.0.0.1:$haproxy_port
  default_backend machine
backend machine
  server m1 $upstream
EOF
haproxy -f "$tmp/haproxy.cfg" -db >"$tmp/haproxy.log" 2>&1 &
pids+=($!)

# Every path answers before measuring.
for target in "$upstream" "$hangar" "127.0.0.1:$nginx_port" "127.0.0.1:$haproxy_port"; do
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null -H "Host: bench.localhost" "http://$target/" && break
    sleep 0.05
  done
  curl -sf -o /dev/null -H "Host: bench.localhost" "http://$target/" \
    || { echo "no answer from $target" >&2; cat "$tmp"/nginx/error.log "$tmp"/haproxy.log >&2; exit 1; }
done

# One wrk run: "req/s p50_ms p99_ms".
run() {
  wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Host: bench.localhost" "http://$1/?bytes=128" | python3 -c '
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

results="$tmp/results"
: >"$results"
for round in $(seq 1 "$rounds"); do
  for path in direct hangar nginx haproxy; do
    case $path in
      direct) target=$upstream ;;
      hangar) target=$hangar ;;
      nginx) target="127.0.0.1:$nginx_port" ;;
      haproxy) target="127.0.0.1:$haproxy_port" ;;
    esac
    echo "$path $(run "$target")" >>"$results"
    echo "round $round: $(tail -1 "$results")" >&2
  done
done

python3 - "$results" "$rounds" "$secs" "$conns" "$json" <<'EOF'
import json, statistics, sys
path, rounds, secs, conns, as_json = sys.argv[1:]
runs = {}
for line in open(path):
    name, rps, p50, p99 = line.split()
    runs.setdefault(name, []).append((float(rps), float(p50), float(p99)))
med = {n: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for n, rs in runs.items()}
print(f"HTTP/1.1 keep-alive, {conns} connections, {secs}s x {rounds} interleaved rounds (medians)")
print(f"{'path':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'rps/direct':>11} {'rps/nginx':>10} {'rps/haproxy':>12} {'p99/nginx':>10}")
for n in ["direct", "hangar", "nginx", "haproxy"]:
    rps, p50, p99 = med[n]
    print(f"{n:<10} {rps:>9.0f} {p50:>8.3f} {p99:>8.3f} {rps/med['direct'][0]:>11.2f} "
          f"{rps/med['nginx'][0]:>10.2f} {rps/med['haproxy'][0]:>12.2f} {p99/med['nginx'][2]:>10.2f}")
if as_json == "true":
    print(json.dumps({
        "bench": "proxy-compare", "conns": int(conns), "secs": float(secs), "rounds": int(rounds),
        "medians": {n: {"rps": v[0], "p50_ms": v[1], "p99_ms": v[2]} for n, v in med.items()},
        "hangar_vs": {n: med["hangar"][0] / med[n][0] for n in ["direct", "nginx", "haproxy"]},
        "runs": runs,
    }))
EOF
