"""Child process of test_crash.py: writes random blocks and reports every step.

Usage: python -m tests.crash_writer DEVICE SEED
Prints "put <id> <xxh3>" before a put and "ack" once it returned; "del <id>" before a
delete and "ack" once it returned. Flushes after every line; runs until killed.
"""

from __future__ import annotations

import random
import sys

import xxhash

from wqs.config import EngineConfig
from wqs.engine import open_or_create

MiB = 1024 * 1024
DEVICE_SIZE = 64 * MiB


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    config = EngineConfig(region_size=1 * MiB, max_block_size=4 * MiB, dram_cache_bytes=0)
    engine = open_or_create(path, DEVICE_SIZE, config)
    print("ready", flush=True)
    written: list[int] = []
    while True:
        r = rng.random()
        if r < 0.05 and written:
            key = rng.choice(written)
            print(f"del {key:032x}", flush=True)
            engine.delete(key.to_bytes(16, "big"))
            print("ack", flush=True)
            continue
        # Mostly new IDs, some rewrites, now and then a block split into segments.
        key = rng.choice(written) if (r < 0.25 and written) else rng.getrandbits(128)
        size = rng.choice([rng.randrange(1, 70_000), 65536, rng.randrange(1, 2 * MiB)]) \
            if rng.random() < 0.05 else rng.randrange(1, 70_000)
        data = rng.randbytes(size)
        print(f"put {key:032x} {xxhash.xxh3_64_hexdigest(data)}", flush=True)
        engine.put(key.to_bytes(16, "big"), data)
        written.append(key)
        print("ack", flush=True)


if __name__ == "__main__":
    main()
