#!/usr/bin/env bash
# runc alone on a machine's own sandbox config: how much of a start is the
# OCI runtime's, whatever Hangar does around it.
#
#   benches/runc-alone.sh [--count N] [--bin FILE]
#
# Needs root. Starts `hangar dev` (release binary, or --bin) in a temp dir
# with one hangar/echo machine, copies that machine's bundle config (its
# namespaces, user mapping, seccomp profile, cgroup limits, mounts, network
# hook) with `/bin/true` as the command, and times N `runc run` of it
# (create to exit, foreground) in three variants: as Hangar runs it
# (`hook`), without the network hook (`nohook`), and without a network
# namespace at all (`nonet`, the host's /sys). Prints p50 and p90 per
# variant, and one JSON object last.
set -euo pipefail

count=30
bin="$(dirname "$0")/../target/release/hangar"
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
bin=$(realpath "$bin")
tmp=$(mktemp -d)
dev_pid=
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

data="$tmp/data"
RUST_LOG=warn "$bin" dev --data-dir "$data" --flaps-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --https-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 > "$tmp/hangar.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 300); do [ -f "$data/addrs.json" ] && break; sleep 0.1; done
flaps=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['flaps'])" "$data/addrs.json")
auth="Authorization: Bearer $(cat "$data/token")"
curl -sf -XPOST -H "$auth" "http://$flaps/v1/apps" -d '{"app_name":"runc"}' > /dev/null
id=$(curl -sf -XPOST -H "$auth" "http://$flaps/v1/apps/runc/machines" \
  -d '{"config":{"image":"hangar/echo","services":[{"protocol":"tcp","internal_port":8080,"ports":[{"port":80,"handlers":["http"]}]}]}}' \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['id'])")
bundle=$(ls -d /run/hangar/*/private/bundles/"$id")

mkdir -p "$tmp/state"
for variant in hook nohook nonet; do
  mkdir -p "$tmp/$variant"
  python3 - "$bundle/config.json" "$variant" "$tmp/$variant/config.json" <<'PY'
import json, sys
config, variant, out = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
config["process"]["args"] = ["/bin/true"]
if variant != "hook":
    config.pop("hooks", None)
if variant == "nonet":
    linux = config["linux"]
    linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"]
    for m in config["mounts"]:
        if m["destination"] == "/sys":
            m.update(type="none", source="/sys", options=["rbind", "nosuid", "noexec", "nodev", "ro"])
json.dump(config, open(out, "w"))
PY
done
for variant in nonet nohook hook; do
  for i in $(seq 1 "$count"); do
    python3 - "$tmp/$variant/config.json" "/hangar-runc-bench/$variant-$i" <<'PY'
import json, sys
config = json.load(open(sys.argv[1])); config["linux"]["cgroupsPath"] = sys.argv[2]
json.dump(config, open(sys.argv[1], "w"))
PY
    start=$(date +%s%N)
    runc --root "$tmp/state" run --bundle "$tmp/$variant" "bench-$variant-$i" > /dev/null
    echo "$variant $(( ($(date +%s%N) - start) / 1000 ))"
    runc --root "$tmp/state" delete -f "bench-$variant-$i" > /dev/null 2>&1 || true
  done
done > "$tmp/times"
python3 - "$tmp/times" "$count" <<'PY'
import collections, json, sys
times = collections.defaultdict(list)
for line in open(sys.argv[1]):
    variant, micros = line.split()
    times[variant].append(int(micros) / 1000)
out = {"bench": "runc_alone", "count": int(sys.argv[2])}
for variant, ms in times.items():
    ms.sort()
    p50, p90 = ms[len(ms) // 2], ms[int(len(ms) * 0.9)]
    print(f"runc run, {variant:<7} p50 {p50:6.1f} ms  p90 {p90:6.1f} ms")
    out[f"{variant}_ms"] = {"p50": round(p50, 2), "p90": round(p90, 2)}
print(json.dumps(out))
PY
