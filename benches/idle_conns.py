#!/usr/bin/env python3
"""Memory per idle keep-alive connection of a proxy.

    idle_conns.py HOST:PORT COUNT tls|plain PID [PID...]

Opens COUNT connections to HOST:PORT (TLS handshakes with `tls`), sends one
request on each (`Host: bench.localhost`, a one-byte body back) so every
connection has served a request, and leaves them idle. Prints the growth of
the summed resident memory (VmRSS) of the PIDs divided by COUNT, in bytes,
after the connections are open and answered. The connections close when the
script exits.
"""
import socket
import ssl
import sys
import time


def rss(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def answered(sock):
    """Reads one response with a Content-Length body; True when whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        body += chunk
    return True


def main():
    addr, count, mode, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    host, port = addr.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    before = rss(pids)
    conns = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        if mode == "tls":
            s = ctx.wrap_socket(s, server_hostname="bench.localhost")
        s.sendall(b"GET /?bytes=1 HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
        if not answered(s):
            sys.exit(f"connection {len(conns)} was not answered")
        conns.append(s)
    # Let the proxy settle (buffers released after the response).
    time.sleep(0.5)
    after = rss(pids)
    print(max(after - before, 0) // count)


if __name__ == "__main__":
    main()
