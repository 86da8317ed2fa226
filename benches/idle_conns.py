#!/usr/bin/env python3
"""Memory per idle keep-alive connection of a proxy, plain and TLS.

    idle_conns.py PLAIN_ADDR TLS_ADDR COUNT PID [PID...]

Opens COUNT plain connections to PLAIN_ADDR, sends one request on each
(`Host: bench.localhost`, a one-byte body back) so every connection has
served a request, and leaves them idle; then the same over TLS to TLS_ADDR,
keeping the plain ones open (so memory the plain ones freed cannot be
counted again). Prints two numbers: the growth of the summed resident memory
(VmRSS) of the PIDs divided by COUNT, in bytes, for each set. Everything
closes when the script exits. Fails if the proxy closed any connection
before the end (an idle timeout shorter than the measure): memory of
connections it let go would not be counted.
"""
import select
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


def open_idle(addr, count, tls, ctx, keep):
    host, port = addr.rsplit(":", 1)
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        if tls:
            s = ctx.wrap_socket(s, server_hostname="bench.localhost")
        s.sendall(b"GET /?bytes=1 HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
        if not answered(s):
            sys.exit(f"connection {len(keep)} to {addr} was not answered")
        keep.append(s)


def closed_by_peer(socks):
    """How many of the sockets the other side has closed (FIN or reset)."""
    poller = select.poll()
    for s in socks:
        poller.register(s.fileno(), select.POLLRDHUP)
    return sum(1 for _, ev in poller.poll(0) if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR))


def main():
    plain, tls, count, pids = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    keep = []
    grown = []
    for addr, is_tls in [(plain, False), (tls, True)]:
        before = rss(pids)
        open_idle(addr, count, is_tls, ctx, keep)
        # Let the proxy settle (buffers released after the response).
        time.sleep(0.5)
        grown.append(max(rss(pids) - before, 0) // count)
    closed = closed_by_peer(keep)
    if closed:
        sys.exit(f"{closed} of {len(keep)} idle connections were closed by the proxy during the measure")
    print(*grown)


if __name__ == "__main__":
    main()
