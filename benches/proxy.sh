#!/usr/bin/env bash
# Whole-system comparison: the same hangar/echo machine measured directly
# (client -> machine) and through Hangar's proxy (client -> proxy -> machine),
# in the same run, with wrk. Prints a table and the proxy/direct ratios.
#
#   benches/proxy.sh [duration_seconds] [connections]
#
# Builds the release binary, starts `hangar dev` on port 0 in a temp dir,
# and stops it (and its machine) at the end. Needs wrk (installed from
# Debian when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-32}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release --quiet
bin=target/release/hangar

tmp=$(mktemp -d)
"$bin" dev --data-dir "$tmp/data" --flaps-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --https-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --flyd-addr 127.0.0.1:0 \
  >"$tmp/out.log" 2>"$tmp/err.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 600); do [ -f "$tmp/data/addrs.json" ] && break; sleep 0.05; done
[ -f "$tmp/data/addrs.json" ] || { cat "$tmp/err.log"; exit 1; }

addr() { python3 -c "import json,sys; print(json.load(open('$tmp/data/addrs.json'))['$1'])"; }
flaps=$(addr flaps); http=$(addr http)
auth="Authorization: Bearer $(cat "$tmp/data/token")"
curl -sf -H "$auth" -X POST "http://$flaps/v1/apps" -d '{"app_name":"bench"}' >/dev/null
ip=$(curl -sf -H "$auth" -X POST "http://$flaps/v1/apps/bench/machines" \
  -d '{"config":{"image":"hangar/echo","services":[{"internal_port":8080,"ports":[{"port":80,"handlers":["http"]}]}]}}' \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['private_ip'])")

# wrk prints latency percentiles with --latency; pull req/s, p50 and p99 (ms).
run() {
  wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Host: bench.localhost" "$1" | python3 -c '
import re, sys
text = sys.stdin.read()
def ms(v):
    n, unit = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")'
}
read -r d_rps d_p50 d_p99 < <(run "http://$ip:8080/?bytes=128")
read -r p_rps p_p50 p_p99 < <(run "http://$http/?bytes=128")

printf '%-22s %12s %10s %10s\n' "path ($conns conns, ${secs}s)" "req/s" "p50 ms" "p99 ms"
printf '%-22s %12s %10s %10s\n' "direct to machine" "$d_rps" "$d_p50" "$d_p99"
printf '%-22s %12s %10s %10s\n' "through hangar proxy" "$p_rps" "$p_p50" "$p_p99"
python3 -c "print(f'ratio proxy/direct: throughput {$p_rps/$d_rps:.2f}x, p50 {$p_p50/$d_p50:.2f}x, p99 {$p_p99/$d_p99:.2f}x')"
