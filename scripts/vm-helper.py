#!/usr/bin/env python3
"""Small helpers for the guest scripts of scripts/vm-test and scripts/vm-bench.
(Python starts slowly under emulation, ~1 s: one call per cycle at most.)

    vm-helper.py flat FILE [FILE2]      every leaf of the first JSON line of
                                        FILE (a `run --json` line), or of
                                        the JSON document (`status --json`:
                                        keyed by volume), as KEY.PATH=VALUE
                                        lines; FILE2's keys get "status."
                                        (FILE "-": none)
    vm-helper.py get FILE KEY...        value at KEY path of the first JSON
                                        line of FILE
    vm-helper.py write DEV COUNT SEED CHUNK [LO HI]
                                        COUNT random 4 KiB writes at random
                                        4 KiB-aligned offsets in [LO, HI) of
                                        DEV (fsynced); prints how many
                                        distinct CHUNK-sized chunks they hit
    vm-helper.py writeblocks DEV COUNT SEED CHUNK [LO HI]
                                        the same writes; prints "CHUNKS
                                        BLOCKS": distinct chunks and distinct
                                        4 KiB blocks written
    vm-helper.py writechunks DEV COUNT SEED CHUNK
                                        COUNT distinct random whole chunks
                                        (fsynced); prints COUNT

Values print as JSON would spell them (null, true, false) except strings,
which print raw; a missing key prints "missing".
"""

import json
import os
import random
import time
import sys


def show(v):
    if isinstance(v, str):
        print(v)
    else:
        print(json.dumps(v))


def first_json(path):
    """The whole file as one JSON document, else its first JSON line."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in text.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON in {path}")


def walk(v, keys):
    for k in keys:
        if isinstance(v, list):
            v = v[int(k)]
        elif isinstance(v, dict) and k in v:
            v = v[k]
        else:
            return "missing"
        if v is None:
            return None
    return v


def flat(v, prefix, out):
    if isinstance(v, dict):
        for k, x in v.items():
            flat(x, f"{prefix}{k}.", out)
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        # Volumes by name (status), anything else (a volume's targets) by
        # position.
        names = [x.get("volume") for x in v]
        by_name = None not in names and len(set(names)) == len(names)
        for i, x in enumerate(v):
            flat(x, f"{prefix}{x['volume'] if by_name else i}.", out)
    else:
        text = v if isinstance(v, str) else json.dumps(v)
        out.append(prefix[:-1] + "=" + text.replace("\n", "\\n"))


def main(argv):
    cmd = argv[1]
    if cmd == "flat":
        out = []
        for path, prefix in zip(argv[2:4], ["", "status."]):
            if path == "-":
                continue
            try:
                flat(first_json(path), prefix, out)
            except (OSError, ValueError) as e:
                out.append(f"{prefix}unreadable={e}")
        print("\n".join(out))
    elif cmd == "get":
        try:
            show(walk(first_json(argv[2]), argv[3:]))
        except (OSError, ValueError) as e:
            print(f"unreadable: {e}")
    elif cmd in ("write", "writeblocks"):
        dev, count, seed, chunk = argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        fd = os.open(dev, os.O_RDWR)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            lo = int(argv[6]) if len(argv) > 6 else 0
            hi = int(argv[7]) if len(argv) > 7 else size
            rnd = random.Random(seed)
            chunks, blocks = set(), set()
            for _ in range(count):
                off = rnd.randrange(lo // 4096, hi // 4096) * 4096
                os.pwrite(fd, rnd.randbytes(4096), off)
                chunks.add(off // chunk)
                blocks.add(off)
            os.fsync(fd)
        finally:
            os.close(fd)
        print(len(chunks) if cmd == "write" else f"{len(chunks)} {len(blocks)}")
    elif cmd == "writechunks":
        dev, count, seed, chunk = argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        fd = os.open(dev, os.O_RDWR)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            rnd = random.Random(seed)
            for c in rnd.sample(range(size // chunk), count):
                os.pwrite(fd, rnd.randbytes(chunk), c * chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        print(count)
    elif cmd == "stall":
        # Forward stdin to stdout, flushing every chunk, then stop after N
        # bytes and hold both pipes open: a connection that hangs mid-session.
        limit, done = int(argv[2]), 0
        while done < limit:
            b = os.read(0, min(65536, limit - done))
            if not b:
                return 0
            os.write(1, b)
            done += len(b)
        time.sleep(600)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
