#!/usr/bin/env python3
"""Inputs for the peer_messages target that make the current decoders allocate far
more than they read (found while fuzzing, issue 10; reported, not fixed here: the
length caps of serve/proto.rs and index/ are being reworked on another branch).

    python3 allocation-bombs.py DIR
    B=target/x86_64-unknown-linux-gnu/release/peer_messages   # cargo xtask fuzz builds it
    /usr/bin/time -f 'maxrss %M KiB' $B -rss_limit_mb=4096 -malloc_limit_mb=4096 DIR/FILE

The harness decodes twice (decode, encode, decode again), so the RSS is about twice
what one decode allocates. Measured 2026-12-06 (GNU time, maxrss):
  status-8MiB   (a plain 8 MiB string, for comparison)  ~75 MiB
  blocks-8MiB   (Msg::Blocks, 8 Mi one-byte items)      ~707 MiB: ~40 B per item
  manifest-1MiB (Manifest, 8 Mi zero blocks, 1 MiB)     ~560 MiB: 33 B per bit
"""
import os
import struct
import sys

SELECT_MESSAGE, SELECT_MANIFEST = 0, 1
K_BLOCKS, K_STATUS_REPLY = 17, 25


def main(out):
    os.makedirs(out, exist_ok=True)
    n = 8 << 20
    # Msg::Blocks: count(1) admits one item per payload byte; status 1 (NotFound) is a
    # whole item, and Vec::with_capacity(n) holds BlockReply values (~40 B each).
    blocks = bytes([SELECT_MESSAGE, K_BLOCKS]) + struct.pack("<I", n) + b"\x01" * n
    # Manifest: block_size 1 and n blocks need an n-bit bitmap only (all zero: no
    # hashes); Vec::with_capacity(n) then holds 33-byte Option<BlockHash> values.
    # The harness appends the CRC32C.
    manifest = bytes([SELECT_MANIFEST]) + b"NBM1" + struct.pack("<QIQI", n, 1, n, 0) + bytes(n // 8)
    status = bytes([SELECT_MESSAGE, K_STATUS_REPLY]) + struct.pack("<I", n) + b"a" * n
    for name, data in [("blocks-8MiB", blocks), ("manifest-1MiB", manifest), ("status-8MiB", status)]:
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bombs")
