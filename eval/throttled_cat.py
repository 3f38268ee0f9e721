"""``cat`` for a simulated object store: a first-byte latency, then a capped rate (benchmarks only).

    pipe:python -m eval.throttled_cat --rate 8e6 --latency 0.05 --log reads.txt /data/00001.tar

Writes FILE to stdout after ``--latency`` seconds at ``--rate`` bytes/s. ``--log`` gets a line
"open FILE" at the start and "done FILE BYTES" at the end. ``UNCLIP_THROTTLE=off`` in the environment turns the throttle off (same command, full speed).
A reader that stops early ends it quietly (exit 141, as ``cat`` killed by SIGPIPE), which
webdataset's pipe treats as success.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CHUNK = 1 << 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.throttled_cat", description=__doc__.split("\n")[0])
    parser.add_argument("file")
    parser.add_argument("--rate", type=float, default=8e6, help="bytes per second")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before the first byte")
    parser.add_argument("--log", default=None, help="append 'FILE BYTES' here when done")
    args = parser.parse_args(argv)
    throttle = os.environ.get("UNCLIP_THROTTLE", "on") != "off"
    sent, status = 0, 0
    start = time.monotonic()
    if args.log:
        with open(args.log, "a") as log:
            log.write(f"open {args.file}\n")
    if throttle:
        time.sleep(args.latency)
    try:
        with open(args.file, "rb") as f:
            while chunk := f.read(CHUNK):
                sys.stdout.buffer.write(chunk)
                sent += len(chunk)
                if throttle:
                    ahead = args.latency + sent / args.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        status = 141
    if args.log:
        with open(args.log, "a") as log:
            log.write(f"done {args.file} {sent}\n")
    if status:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
    return status


if __name__ == "__main__":
    sys.exit(main())
