#!/usr/bin/env python3
"""Helpers for scripts/bench (python3 standard library only).

scripts/bench does the orchestration (page cache, timing, verification);
this file does the parts that are awkward in bash: deterministic workload
mutations, parsing of /usr/bin/time / rsync --stats / snapsync --json
output, and rendering the markdown report with the target checks.

Subcommands:
  gen-random PATH SIZE            random image (fallback when openssl is missing)
  gen-half PATH SIZE              image half text-like, half random (first copies)
  mutate PATH KIND SIZE           apply workload KIND to PATH, print changed bytes
  revert PATH KIND SIZE SRC       copy the ranges KIND touches back from SRC
  sparse-source PATH SIZE [KIND]  sparse file with a few MiB of random data
  same A B                        byte-exact compare that skips holes both files share
  size SPEC                       "64M" / "4G" / "1.5G" -> bytes
  record RESULTS key=value...     parse the raw output of one run, append a JSON line
  report RESULTS OUT.md           print the markdown report; exit 1 on mismatch/error
"""

import json
import os
import random
import re
import statistics
import sys

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
SUB = 4 * KIB  # the transfer unit of snapsync and the unit of our mutations

SCATTER_FRACTION = 0.01  # 1% of the 4 KiB blocks
CONTIGUOUS_LEN = 40 * MIB
# One seed per workload: re-applying a mutation must write exactly the same
# bytes, because that is how the target is restored between contenders.
SEEDS = {"scattered": 0x5CA77E, "contiguous": 0xC0471, "sparse": 0x59A125E,
         "sparse-new": 0x5EED14}


# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------

def parse_size(spec):
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", spec, re.I)
    if not m:
        raise SystemExit(f"bad size: {spec!r} (use e.g. 64M, 1G, 4G)")
    mult = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}[m.group(2).upper()]
    n = int(float(m.group(1)) * mult)
    return n - n % SUB  # keep everything 4 KiB aligned


def ranges(kind, size):
    """Yield (offset, length, rng) for every region workload KIND changes.

    The generator owns the RNG so that the data bytes are a pure function of
    (kind, size): offsets first, then the data in the same order each time.
    """
    rng = random.Random(SEEDS[kind])
    if kind == "scattered":
        nblocks = size // SUB
        k = max(1, round(nblocks * SCATTER_FRACTION))
        for b in sorted(rng.sample(range(nblocks), k)):
            yield b * SUB, SUB, rng
    elif kind == "contiguous":
        length = min(CONTIGUOUS_LEN, (size // 2) - (size // 2) % SUB)
        off = rng.randrange(0, (size - length) // SUB + 1) * SUB
        yield off, length, rng
    elif kind == "sparse":
        # a few 1 MiB islands: start, two in the middle (one unaligned to
        # any power-of-two segment), and the very end of the volume
        chunk = MIB
        offs = [0, (size // 3) - (size // 3) % SUB,
                (2 * size // 3) - (2 * size // 3) % SUB + 123 * SUB,
                size - chunk]
        for off in sorted(set(offs)):
            yield off, chunk, rng
    elif kind == "sparse-new":
        # five 1 MiB islands (5 MiB) spread over the volume, two
        # of them off any 64 KiB block boundary
        for i in range(5):
            off = (size - MIB) * i // 4
            off -= off % SUB
            if i in (1, 3):
                off = min(off + 3 * SUB, size - MIB)
            yield off, MIB, rng
    else:
        raise SystemExit(f"unknown workload kind {kind!r}")


def write_ranges(path, kind, size):
    changed = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, length, rng in ranges(kind, size):
            done = 0
            while done < length:
                n = min(4 * MIB, length - done)
                os.pwrite(fd, rng.randbytes(n), off + done)
                done += n
            changed += length
    finally:
        os.close(fd)
    return changed


def cmd_mutate(path, kind, size):
    print(write_ranges(path, kind, parse_size(size)))


def cmd_revert(path, kind, size, src):
    size = parse_size(size)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(path, os.O_WRONLY)
    try:
        for off, length, _ in ranges(kind, size):
            os.pwrite(dfd, os.pread(sfd, length, off), off)
    finally:
        os.close(sfd)
        os.close(dfd)


def cmd_sparse_source(path, size, kind="sparse"):
    size = parse_size(size)
    with open(path, "wb") as f:
        f.truncate(size)
    print(write_ranges(path, kind, size))


HALF_SEED = 0x4A1F


def half_compressible_regions(size):
    """(offset, length, compressible) regions of the first-copy source:
    random (incompressible, like media or already compressed files) and
    text-like regions alternate, each 64 KiB to 1 MiB long."""
    rng = random.Random(HALF_SEED)
    off, text = 0, False
    while off < size:
        n = min(size - off, rng.randrange(16, 257) * SUB)
        yield off, n, text
        off += n
        text = not text


def cmd_gen_half(path, size):
    """A volume about half of which zstd compresses (log-like text of
    Zipf-distributed words, ~3x in 64 KiB frames) and half of which it
    cannot (random regions); deterministic."""
    size = parse_size(size)
    rng = random.Random(HALF_SEED + 1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 11)))
             for _ in range(400)]
    weights = [1 / (i + 1) for i in range(len(words))]
    lines, n = [], 0
    while n < 2 * MIB:
        line = f"{rng.randrange(10**6):06d} " + " ".join(rng.choices(words, weights, k=rng.randrange(4, 14))) + "\n"
        lines.append(line)
        n += len(line)
    text = "".join(lines).encode()
    with open(path, "wb") as f:
        for off, n, compressible in half_compressible_regions(size):
            if compressible:
                start = rng.randrange(0, len(text) - n)
                f.write(text[start:start + n])
            else:
                f.write(rng.randbytes(n))


def cmd_gen_random(path, size):
    size = parse_size(size)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MIB, left)
            f.write(os.urandom(n))
            left -= n


def data_extents(fd, size):
    """(start, end) ranges that may hold data, from SEEK_DATA/SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def cmd_same(a, b):
    """Exit 0 if A and B are byte-identical, 1 if not.

    Exact like cmp, but fast on big sparse files: outside the union of both
    files' data extents both read as zeros, so only the union is compared.
    """
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        if os.fstat(fb).st_size != size:
            return 1
        spans = sorted(data_extents(fa, size) + data_extents(fb, size))
        merged = []
        for s0, e0 in spans:
            if merged and s0 <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e0)
            else:
                merged.append([s0, e0])
        for s0, e0 in merged:
            pos = s0
            while pos < e0:
                n = min(8 * MIB, e0 - pos)
                if os.pread(fa, n, pos) != os.pread(fb, n, pos):
                    return 1
                pos += n
        return 0
    finally:
        os.close(fa)
        os.close(fb)


# --------------------------------------------------------------------------
# recording one run
# --------------------------------------------------------------------------

def parse_time_file(path):
    """Lines written by /usr/bin/time -f '%e %U %S %M' (maybe several, -a).

    Returns a list of (wall, user, sys, maxrss_kib); lines like
    "Command exited with non-zero status 1" are skipped.
    """
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4:
                try:
                    out.append((float(parts[0]), float(parts[1]),
                                float(parts[2]), int(parts[3])))
                except ValueError:
                    pass
    return out


def parse_snapsync_json(path):
    if not path or not os.path.exists(path):
        return None
    text = open(path, errors="replace").read().strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):  # tolerate chatter before it
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def parse_rsync_stats(path):
    if not path or not os.path.exists(path):
        return None
    text = open(path, errors="replace").read()
    sent = re.search(r"Total bytes sent:\s*([\d,.]+)", text)
    recv = re.search(r"Total bytes received:\s*([\d,.]+)", text)
    if not (sent and recv):
        return None

    def num(m):
        return int(m.group(1).replace(",", "").replace(".", ""))
    return num(sent) + num(recv)


def cmd_record(results, *pairs):
    a = dict(p.split("=", 1) for p in pairs)
    rec = {k: a.get(k, "") for k in ("workload", "cache", "tool", "verify", "note")}
    rec["rc"] = int(a.get("rc", "0"))
    rec["volume"] = int(a.get("volume", "0"))
    rec["changed"] = int(a.get("changed", "0"))
    rec["wall"] = float(a["end"]) - float(a["start"])
    notes = [rec["note"]] if rec["note"] else []

    times = parse_time_file(a.get("timefile"))
    if times:
        _, user, sys_, rss = times[-1]
        rec["cpu"] = user + sys_
        rec["rss_kib"] = rss  # includes reaped children (wait4 RUSAGE_BOTH)
    if a.get("server_cpu"):
        # through a real sshd the remote end is not our child: sshd's
        # reaped-children CPU (its session processes and the remote end)
        rec["server_cpu"] = float(a["server_cpu"])
        rec["cpu"] = rec.get("cpu", 0.0) + rec["server_cpu"]
    serve = parse_time_file(a.get("serve_time"))
    if serve:
        # the serve end is already a (grand)child of the measured process,
        # so its CPU is in rec["cpu"]; report its RSS separately too
        rec["serve_rss_kib"] = max(t[3] for t in serve)
        rec["rss_kib"] = max(rec.get("rss_kib", 0), rec["serve_rss_kib"])

    js = parse_snapsync_json(a.get("json"))
    if a.get("json"):
        if js is None:
            # --json is part of the contract; a binary that prints nothing
            # probably did nothing (and "unchanged" would still verify)
            notes.append("no --json output")
            rec["error"] = True
        else:
            rec["json"] = js
            if "wire_bytes_sent" in js or "wire_bytes_received" in js:
                rec["wire"] = int(js.get("wire_bytes_sent", 0)) + int(js.get("wire_bytes_received", 0))
            if "target_bytes_written" in js:
                rec["target_written"] = int(js["target_bytes_written"])
            if "journal_bytes" in js:
                rec["journal_bytes"] = int(js["journal_bytes"])
            vb = js.get("volume_bytes")
            if vb is not None and int(vb) != rec["volume"]:
                notes.append(f"json volume_bytes={vb} != {rec['volume']}")
    if a.get("stats"):
        w = parse_rsync_stats(a.get("stats"))
        if w is None:
            notes.append("no rsync --stats")
        else:
            rec["wire"] = w
    if rec["rc"] == 124:
        notes.append("timed out")
    elif rec["rc"] != 0:
        notes.append(f"exit status {rec['rc']}")
    rec["note"] = "; ".join(notes)
    rec["ok"] = rec["verify"] in ("ok", "n/a", "skipped") and rec["rc"] == 0 and not rec.get("error")
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def aggregate(records):
    """Group repeated runs: median wall/CPU, max RSS, worst verification."""
    groups = {}
    for r in records:
        groups.setdefault((r["workload"], r["cache"], r["tool"]), []).append(r)
    out = []
    for (wl, cache, tool), rs in groups.items():
        ran = [r for r in rs if r["verify"] != "skipped"]
        g = {"workload": wl, "cache": cache, "tool": tool, "runs": len(ran),
             "volume": rs[0]["volume"], "changed": rs[0]["changed"],
             "notes": sorted({r["note"] for r in rs if r["note"]})}
        if not ran:
            g["status"] = "skipped"
            out.append(g)
            continue
        bad = [r for r in ran if not r["ok"]]
        g["status"] = "FAIL" if bad else "ok"
        g["wall"] = statistics.median(r["wall"] for r in ran)
        cpus = [r["cpu"] for r in ran if "cpu" in r]
        g["cpu"] = statistics.median(cpus) if cpus else None
        rss = [r["rss_kib"] for r in ran if "rss_kib" in r]
        g["rss_kib"] = max(rss) if rss else None
        srss = [r["serve_rss_kib"] for r in ran if "serve_rss_kib" in r]
        g["serve_rss_kib"] = max(srss) if srss else None
        wires = [r["wire"] for r in ran if "wire" in r]
        g["wire"] = statistics.median(wires) if wires else None
        tw = [r["target_written"] for r in ran if "target_written" in r]
        g["target_written"] = statistics.median(tw) if tw else None
        jb = [r["journal_bytes"] for r in ran if "journal_bytes" in r]
        g["journal_bytes"] = statistics.median(jb) if jb else None
        out.append(g)
    return out


def peer_of(tool):
    """The rsync row a tool is compared with: over a real sshd, rsync over
    the same sshd; otherwise rsync through the fake remote shell."""
    return "rsync ssh" if tool.endswith(" ssh") else "rsync"


def find(groups, wl, cache, tool):
    for g in groups:
        if (g["workload"], g["cache"], g["tool"]) == (wl, cache, tool) and g["status"] != "skipped":
            return g
    return None


def fmt_ratio_rsync(g, rs):
    if rs is None or not g.get("wall"):
        return "-"
    if g["tool"] == rs["tool"]:
        return "1.0x"
    r = rs["wall"] / g["wall"]
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def fmt_ratio_floor(g, fl):
    if fl is None or not g.get("wall") or not fl["wall"]:
        return "-"
    return f"{g['wall'] / fl['wall']:.2f}x"


def mib(n, digits=1):
    return "-" if n is None else f"{n / MIB:.{digits}f}"


def table(groups):
    lines = ["| workload | cache | tool | wall s | CPU s | max RSS MiB | wire MiB | vs rsync | vs floor |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    footnotes = []
    for g in groups:
        if g["workload"] == "journal":
            continue
        tool = g["tool"]
        if g["notes"]:
            footnotes.append(g["notes"])
            tool += f" [{len(footnotes)}]"
        if g["status"] == "skipped":
            lines.append(f"| {g['workload']} | {g['cache']} | {tool} | skipped | | | | | |")
            continue
        if g["status"] == "FAIL":
            tool += " **FAIL**"
        rs = find(groups, g["workload"], g["cache"], peer_of(g["tool"]))
        fl = find(groups, g["workload"], g["cache"], "floor")
        cpu = "-" if g["cpu"] is None else f"{g['cpu']:.2f}"
        rss = "-" if g["rss_kib"] is None else f"{g['rss_kib'] / 1024:.1f}"
        wire = mib(g["wire"], 2)
        lines.append(f"| {g['workload']} | {g['cache']} | {tool} | {g['wall']:.2f} | {cpu} | "
                     f"{rss} | {wire} | {fmt_ratio_rsync(g, rs)} | {fmt_ratio_floor(g, fl)} |")
    notes = [f"[{i}] " + "; ".join(n) for i, n in enumerate(footnotes, 1)]
    return lines, notes


def journal_table(groups):
    js = [g for g in groups if g["workload"] == "journal" and g["status"] != "skipped"]
    if not js:
        return []
    lines = ["", "Journal comparison (scattered, hot cache, snapsync local):", "",
             "| flags | wall s | target bytes written MiB | journal bytes MiB |", "|---|---:|---:|---:|"]
    for g in js:
        tw = "n/a (no target_bytes_written in --json)" if g["target_written"] is None else mib(g["target_written"], 2)
        st = " **FAIL**" if g["status"] == "FAIL" else ""
        lines.append(f"| {g['tool']}{st} | {g['wall']:.2f} | {tw} | {mib(g['journal_bytes'], 2)} |")
    return lines


def checks(groups):
    """Informational PASS/FAIL lines against the project's performance targets."""
    out = []

    def line(ok, what):
        out.append(("PASS" if ok else "FAIL") + " " + what)

    snap = [g for g in groups if g["tool"].startswith("snapsync") and g["workload"] != "journal"
            and g["status"] != "skipped"]
    for g in snap:
        name = f"{g['workload']} {g['cache']} {g['tool']}"
        if g["status"] == "FAIL":
            out.append(f"SKIP {name}: the run failed, its numbers mean nothing")
            continue
        rs = find(groups, g["workload"], g["cache"], peer_of(g["tool"]))
        fl = find(groups, g["workload"], g["cache"], "floor")
        ssh = g["tool"].endswith(" ssh")
        # the sparse case is a memory check: rsync is normally skipped there
        if g["cache"] == "hot" and not g["workload"].startswith("sparse"):
            if g["workload"].startswith("first"):
                need = 1.5
            elif g["workload"].startswith("scattered") and not ssh:
                need = 10.0
            else:
                need = 2.0
            if rs is None:
                out.append(f"SKIP {name}: no rsync run to compare (target >= {need:g}x faster)")
            else:
                r = rs["wall"] / g["wall"] if g["wall"] else float("inf")
                how = f"{r:.1f}x faster than" if r >= 1 else f"{1 / r:.1f}x slower than"
                line(r >= need, f"{name}: {how} {rs['tool']} (target >= {need:g}x faster)")
        if g["cache"] == "cold" and not g["workload"].startswith(("sparse", "first")):
            if fl is None:
                out.append(f"SKIP {name}: no floor run (target <= 1.25x floor)")
            else:
                r = g["wall"] / fl["wall"] if fl["wall"] else float("inf")
                line(r <= 1.25, f"{name}: {r:.2f}x floor wall time (target <= 1.25x)")
        if g["workload"].startswith("first"):
            pass  # a first copy sends the volume: no delta bound
        elif g["wire"] is None:
            out.append(f"SKIP {name}: wire bytes unknown")
        else:
            limit = 1.1 * g["changed"] + 0.001 * g["volume"]
            line(g["wire"] <= limit,
                 f"{name}: wire {g['wire'] / MIB:.2f} MiB (target <= {limit / MIB:.2f} MiB = "
                 f"1.1 x {g['changed'] / MIB:.2f} MiB changed + 0.1% of volume)")
        if g["rss_kib"] is None:
            out.append(f"SKIP {name}: max RSS unknown")
        else:
            line(g["rss_kib"] < 64 * 1024,
                 f"{name}: max RSS {g['rss_kib'] / 1024:.1f} MiB (target < 64 MiB)")
    return out


def cmd_report(results, out_md, header_file=None):
    records = []
    if os.path.exists(results):
        with open(results) as f:
            records = [json.loads(l) for l in f if l.strip()]
    groups = aggregate(records)
    header = open(header_file).read().rstrip("\n").splitlines() if header_file else []
    lines, notes = table(groups)
    body = header + [""] + lines
    if notes:
        body += [""] + notes
    rss_notes = [f"- {g['workload']} {g['cache']} {g['tool']}: serve side max RSS "
                 f"{g['serve_rss_kib'] / 1024:.1f} MiB, client side included in the table's max"
                 for g in groups if g.get("serve_rss_kib")]
    if rss_notes:
        body += ["", "Per-process RSS (remote-style runs):", ""] + rss_notes
    body += journal_table(groups)

    ran = [r for r in records if r["verify"] != "skipped"]
    bad = [r for r in ran if not r["ok"]]
    writing = [r for r in ran if r["verify"] != "n/a"]
    verified = [r for r in writing if r["verify"] == "ok"]
    body += ["", "## Verification", ""]
    body.append(f"{len(verified)} of {len(writing)} syncs left the target byte-identical to the "
                f"source (cmp, or a hole-aware byte compare for the sparse case); floor runs only read.")
    for r in bad:
        body.append(f"FAIL {r['workload']} {r['cache']} {r['tool']}: verify={r['verify']}, "
                    f"exit status {r['rc']}" + (f" ({r['note']})" if r["note"] else ""))

    if os.environ.get("BENCH_MODE") == "smoke":
        # 64 MiB volumes take hundredths of a second: ratios would be noise.
        body += ["", "## Targets", "", "not checked: a smoke run checks correctness only"]
    else:
        body += ["", "## Targets (informational; timings are noisy)", ""]
        body += checks(groups) or ["(no snapsync runs)"]
    text = "\n".join(body) + "\n"
    sys.stdout.write(text)
    with open(out_md, "w") as f:
        f.write(text)
    return 1 if bad else 0


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "gen-random":
        cmd_gen_random(*args)
    elif cmd == "gen-half":
        cmd_gen_half(*args)
    elif cmd == "mutate":
        cmd_mutate(*args)
    elif cmd == "revert":
        cmd_revert(*args)
    elif cmd == "sparse-source":
        cmd_sparse_source(*args)
    elif cmd == "same":
        return cmd_same(*args)
    elif cmd == "size":
        print(parse_size(args[0]))
    elif cmd == "record":
        cmd_record(*args)
    elif cmd == "report":
        return cmd_report(*args)
    else:
        raise SystemExit(f"unknown subcommand {cmd!r}\n{__doc__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
