#!/usr/bin/env python3
"""One client's slow uploads must not lock out another client of the same app.

Usage (against a running `hangar dev`; the open-files limit must allow the
connections, for example `ulimit -n 20000`):

    python3 benches/slow-uploads.py <data dir> [--conns N]

Creates app `slow` with one hangar/echo machine, opens N (default 10,000)
connections from 127.0.0.1 that each send a request head announcing a
100,000-byte body and then 5 bytes of it, waits a second, counts how many
the proxy closed, and then sends one GET from 127.0.0.2. Prints one JSON
object on its last line.
"""

import json
import socket
import sys
import time
import urllib.request


def api(flaps, token, method, path, body):
    req = urllib.request.Request(
        f"http://{flaps}{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status


def main():
    data_dir = sys.argv[1]
    conns = int(sys.argv[sys.argv.index("--conns") + 1]) if "--conns" in sys.argv else 10_000
    addrs = json.load(open(f"{data_dir}/addrs.json"))
    token = open(f"{data_dir}/token").read().strip()
    api(addrs["flaps"], token, "POST", "/v1/apps", {"app_name": "slow"})
    machine = {"config": {"image": "hangar/echo", "services": [
        {"protocol": "tcp", "internal_port": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}]}}
    api(addrs["flaps"], token, "POST", "/v1/apps/slow/machines", machine)

    host, port = addrs["http"].rsplit(":", 1)
    port = int(port)
    head = b"POST / HTTP/1.1\r\nHost: slow.localhost\r\nContent-Length: 100000\r\n\r\nfirst"
    started = time.time()
    held = []
    for _ in range(conns):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.connect((host, port))
        try:
            s.sendall(head)
        except OSError:
            pass  # closed by the proxy before the write
        held.append(s)
    opened_secs = time.time() - started
    time.sleep(1.0)
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass  # still open, waiting for the rest of the body
        except OSError:
            closed += 1

    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.connect((host, port))
    other.settimeout(10)
    other.sendall(b"GET / HTTP/1.1\r\nHost: slow.localhost\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := other.recv(65536):
        answer += chunk
    status = int(answer.split(b" ", 2)[1])
    print(f"{conns} slow uploads opened in {opened_secs:.1f} s; "
          f"the proxy closed {closed}; another client got {status}")
    print(json.dumps({"conns": conns, "closed": closed, "other_status": status,
                      "opened_secs": round(opened_secs, 1)}))


if __name__ == "__main__":
    main()
