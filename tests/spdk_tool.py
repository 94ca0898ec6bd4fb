"""Damage a block on an SPDK namespace from outside the daemon (its corruption test).

    python -m tests.spdk_tool flip "spdk:..." LIB_DIR MARKER_HEX

finds MARKER (some bytes of one block's payload) on the namespace, flips the 8 bytes
after its start, and prints the offset. A process of its own: SPDK's environment is
set up once per process, and the test session forks.
"""

from __future__ import annotations

import sys

from wqs.config import SpdkConfig
from wqs.nvme.buffers import aligned_buffer
from wqs.nvme.spdk import SpdkDevice

CHUNK = 4 << 20


def flip(name: str, lib_dir: str, marker: bytes) -> int:
    device = SpdkDevice(name, SpdkConfig(lib_dir=lib_dir, mem_size=128 << 20))
    try:
        buf = memoryview(aligned_buffer(CHUNK + 4096))
        for offset in range(0, device.size, CHUNK):
            n = min(CHUNK + 4096, device.size - offset)  # overlap: a marker across chunks
            device.read_into(offset, buf[:n])
            at = bytes(buf[:n]).find(marker)
            if at < 0:
                continue
            unit = (offset + at) // 4096 * 4096
            page = memoryview(aligned_buffer(8192))
            device.read_into(unit, page)
            for i in range(offset + at - unit, offset + at - unit + 8):
                page[i] ^= 0xFF
            device.write(unit, page)
            return offset + at
        raise SystemExit("marker not found on the device")
    finally:
        device.close()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "flip":
        raise SystemExit(__doc__)
    print(flip(sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])))
