#!/usr/bin/env python3
"""Talks to a blobfs daemon's control socket directly (docs/CONTROL.md), for the tests.

    control_client.py SOCKET latency [--samples N] [--limit-ms MS]
        status and stats, alternately, N times: prints the answer times (connect to the
        last byte) and fails when the slowest exceeds the limit.
    control_client.py SOCKET ask COMMAND...
        prints the payload of every frame; exit 1 on an error frame.
"""
import argparse
import socket
import sys
import time


def ask(path, request):
    """The frames of one conversation: [(ok, payload)]."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall((request + "\n").encode())
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    frames = []
    while data:
        header, _, rest = data.partition(b"\n")
        kind, length = header.decode().split()
        frames.append((kind == "ok", rest[:int(length)].decode()))
        data = rest[int(length):]
    return frames


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("mode", choices=["latency", "ask"])
    parser.add_argument("words", nargs="*")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--limit-ms", type=float, default=50)
    args = parser.parse_args()
    if args.mode == "ask":
        ok = True
        for good, payload in ask(args.socket, " ".join(args.words)):
            sys.stdout.write(payload)
            ok = ok and good
        sys.exit(0 if ok else 1)
    times = []
    for index in range(args.samples):
        request = "status json" if index % 2 == 0 else "stats json"
        start = time.monotonic()
        frames = ask(args.socket, request)
        times.append((time.monotonic() - start) * 1000)
        if not frames or not frames[0][0]:
            print(f"control_client: {request}: {frames}")
            sys.exit(1)
        time.sleep(0.05)
    times.sort()
    print(f"control socket answers: {len(times)} (status and stats), median {times[len(times) // 2]:.1f} ms, "
          f"max {times[-1]:.1f} ms (limit {args.limit_ms:.0f} ms)")
    sys.exit(0 if times[-1] <= args.limit_ms else 1)


if __name__ == "__main__":
    main()
