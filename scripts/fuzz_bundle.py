#!/usr/bin/env python3
"""Fuzz the bundle reader and ``Upscale`` creation with mutated bundles (not part of CI: it runs for hours).

    python scripts/fuzz_bundle.py --cases 100000               # the hardening goal: 10^5 bundles without a crash
    python scripts/fuzz_bundle.py --cases 2000 --seed 7        # a quick run

Every case derives from a small valid bundle (a random 8-channel CARN-M x2 exported with export_bundle, so it has
a TorchScript member and a probe) by one seeded mutation:

  bytes      flips, truncation, insertion, deletion, magic values; anywhere or aimed at the zip structure
  manifest   JSON edits at random paths (random values, deep nesting, control characters, probe edits), the
             members' hashes kept consistent
  member     byte edits of model.onnx / weights.safetensors with the hashes recomputed (so the checks behind the
             hashes are reached: ONNX validation, weights dtype/finiteness, the probe)
  zip        structural edits: compressed members (deflate/bzip2/lzma, bombs), NUL and control characters in
             names, duplicates, comments, prepended data, zip64 records, data descriptors, overlapping entries

and goes through ``Bundle.open``, ``verify``, every ``member``, ``state_dict`` and, when all of that passes,
``vs_selftransfer.runtime.create`` with the ONNX Runtime backend. The property: only the documented errors come out
(BundleError from the reader; ValueError from ``create``, which names the argument; RuntimeError from a backend
that cannot load a graph, naming the bundle). Any other exception is a finding: the case is saved under --out with
its traceback. A crash of the process itself (a signal) is caught by a supervisor that runs the cases in a child
process, records the case, and continues after it.

Run it at low priority (``nice -n 19``); it prints the count and the rate every --report-every cases.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

KINDS = ("bytes", "manifest", "member", "zip")


# -- building blocks -----------------------------------------------------------------------------------------------
def make_seed_bundle(directory: str) -> str:
    import torch

    from selftransfer_trainer.export import export_bundle
    from vs_selftransfer.model import ModelConfig, build_model

    torch.manual_seed(0)
    path = os.path.join(directory, "seed_x2.stm")
    export_bundle(build_model(ModelConfig(scale=2, channels=8, group=4)).eval(), path, tensorrt=False)
    return path


def read_parts(path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    return manifest, members


def rehash(manifest: dict, members: dict) -> dict:
    m = dict(manifest)
    m["members"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in members.items()}
    return m


def zip_bytes(entries, compression=zipfile.ZIP_STORED, comment=b"", force_zip64=False) -> bytes:
    """A zip written exactly as given (duplicates allowed): what a hostile author can make."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(buf, "w", compression) as zf:
            for name, data in entries:
                if force_zip64:
                    with zf.open(zipfile.ZipInfo(name), "w", force_zip64=True) as f:
                        f.write(data)
                else:
                    zf.writestr(name, data)
            zf.comment = comment
    return buf.getvalue()


def entries_of(manifest: dict, members: dict) -> list[tuple[str, bytes]]:
    return [("manifest.json", json.dumps(manifest).encode()), *members.items()]


def structure_regions(data: bytes) -> list[tuple[int, int]]:
    regions, pos = [], 0
    while (pos := data.find(b"PK\x03\x04", pos)) >= 0:
        regions.append((pos, pos + 30 + 20))
        pos += 4
    first_cd = data.find(b"PK\x01\x02")
    if first_cd >= 0:
        regions.append((first_cd, len(data)))
    return regions or [(0, len(data))]


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([None, True, False, 0, -1, 2, 3, 4, 5, 2 ** 64, 1.5, float("nan"), float("inf"), "",
                           "x" * rng.randint(1, 40), "\x1b[2J\x1b]0;owned\x07", "ok\r\nvalid: yes", "\u202e",
                           "model.onnx", "carn_m", "RGB", [], {}])
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "format", "scale", "members", "probe", "\x00", "psnr_y", "validation"]) + str(i):
            random_json(rng, depth + 1) for i in range(rng.randint(0, 4))}


def json_paths(node, max_depth: int = 8):
    """Paths (tuples of keys) into a JSON value, down to ``max_depth``, without recursion."""
    stack = [((), node)]
    while stack:
        prefix, value = stack.pop()
        yield prefix
        if len(prefix) < max_depth:
            children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            stack.extend((prefix + (k,), v) for k, v in children)


# -- mutations -----------------------------------------------------------------------------------------------------
def edit_bytes(rng, buf: bytearray, pos: int, op: str, *, insert_max: int, delete_max: int) -> bool:
    """The byte edits both mutators share, applied to ``buf`` at ``pos``; False when ``op`` is not one of them."""
    if op == "flip":
        buf[pos] ^= rng.randint(1, 255)
    elif op == "truncate":
        del buf[pos:]
    elif op == "insert":
        buf[pos:pos] = os.urandom(rng.randint(1, insert_max))
    elif op == "delete":
        del buf[pos:pos + rng.randint(1, delete_max)]
    else:
        return False
    return True


def mutate_bytes(rng, original: bytes, regions) -> bytes:
    buf = bytearray(original)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        lo, hi = rng.choice(regions) if rng.random() < 0.7 else (0, len(buf))
        lo, hi = min(lo, len(buf) - 1), max(min(hi, len(buf)), min(lo, len(buf) - 1) + 1)
        pos = rng.randrange(lo, hi)
        op = rng.choice(["flip", "flip", "truncate", "insert", "delete", "magic"])
        if not edit_bytes(rng, buf, pos, op, insert_max=16, delete_max=64):
            magic = rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\xff\xff", b"\x08\x00", b"\x0c\x00",
                                b"\x0e\x00", b"\x01\x00", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"PK\x01\x02"])
            buf[pos:pos + len(magic)] = magic
    return bytes(buf)


def mutate_manifest(rng, manifest: dict, members: dict) -> bytes:
    m = json.loads(json.dumps(manifest))
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.08:  # deep nesting somewhere
            depth = rng.choice([10, 31, 33, 200, 1200, 5000])
            node = {}
            for _ in range(depth):
                node = {"n": node}
            m[rng.choice(["validation", "source", "x", "precision"])] = node
            continue
        if op < 0.2 and isinstance(m.get("probe"), dict):  # the probe
            probe = m["probe"]
            key = rng.choice(["shape", "input", "output", "int8_output", "extra"])
            probe[key] = rng.choice([random_json(rng), "AAAA", probe.get("output", ""), probe.get("input", ""),
                                     [1, 3, 16, 16], [1, 3, 8, 8], [1, 3, 64, 64], [2, 3, 16, 16]])
            continue
        paths = list(json_paths(m))
        path = rng.choice(paths)
        if not path:
            continue
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        action = rng.choice(["set", "set", "delete", "add"])
        if action == "set":
            parent[path[-1]] = random_json(rng)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["x", "members", "input", "tensorrt", "model.ts", "\x1b[31m"])] = random_json(rng)
    if rng.random() < 0.8 and isinstance(m, dict):
        m["members"] = rehash({}, members)["members"] if not isinstance(m.get("members"), dict) or rng.random() < 0.9 \
            else m["members"]
    try:
        raw = json.dumps(m, allow_nan=True).encode()
    except (RecursionError, ValueError):
        raw = b"{" * 3000
    return zip_bytes([("manifest.json", raw), *members.items()])


def mutate_member(rng, manifest: dict, members: dict) -> bytes:
    name = rng.choice(["model.onnx", "weights.safetensors", "weights.safetensors", "model.onnx", "model.ts"])
    blob = bytearray(members[name])
    for _ in range(rng.randint(1, 3)):
        if not blob:
            break
        region = min(len(blob), 512) if rng.random() < 0.6 else len(blob)
        pos = rng.randrange(max(region, 1))
        op = rng.choice(["flip", "flip", "truncate", "insert", "delete", "nan"])
        if not edit_bytes(rng, blob, pos, op, insert_max=8, delete_max=32):  # a float32 NaN / inf / huge value
            blob[pos:pos + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f"])
    mutated = {**members, name: bytes(blob)}
    return zip_bytes(entries_of(rehash(manifest, mutated), mutated))


def mutate_zip(rng, manifest: dict, members: dict) -> bytes:
    m = rehash(manifest, members)
    entries = entries_of(m, members)
    op = rng.choice(["compress", "bomb", "nul", "control", "duplicate", "comment", "prepend", "zip64", "descriptor",
                     "overlap", "extra_entry", "reorder", "empty_name"])
    if op == "compress":
        method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        return zip_bytes(entries, compression=method)
    if op == "bomb":
        size = rng.choice([1 << 20, 1 << 24, 1 << 26])
        bombed = {**members, rng.choice(["model.ts", "model.trt.ts", "model.int8.onnx"]): bytes(size)}
        return zip_bytes(entries_of(rehash(manifest, bombed), bombed), compression=zipfile.ZIP_DEFLATED)
    if op in ("nul", "control", "empty_name"):
        target = rng.randrange(len(entries))
        name, data = entries[target]
        extra = {"nul": "\x00.exe", "control": rng.choice(["\x1b[2J", "\r", "\n", "\x7f", "\t"]), "empty_name": ""}[op]
        placeholder = "Q" * len(extra.encode()) if extra else ""
        raw = zip_bytes(entries[:target] + [(name + placeholder if extra else "", data)] + entries[target + 1:])
        if extra:
            raw = raw.replace((name + placeholder).encode(), (name + extra).encode())
        return raw
    if op == "duplicate":
        name, data = rng.choice(entries)
        return zip_bytes(entries + [(name, rng.choice([data, b"other"]))])
    if op == "comment":
        return zip_bytes(entries, comment=rng.choice([b"hello", b"PK\x05\x06" + b"\x00" * 18, os.urandom(100)]))
    if op == "prepend":
        return os.urandom(rng.randint(1, 64)) + zip_bytes(entries)
    if op == "zip64":
        return zip_bytes(entries, force_zip64=True)
    if op == "descriptor":  # streamed writing: data descriptors after each member
        buf = _Unseekable()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name, data in entries:
                with zf.open(name, "w") as f:
                    f.write(data)
        return buf.getvalue()
    if op == "overlap":  # point a central entry's local-header offset at another entry
        raw = bytearray(zip_bytes(entries))
        cds = [i for i in range(len(raw)) if raw[i:i + 4] == b"PK\x01\x02"]
        if len(cds) >= 2:
            a, b = rng.sample(cds, 2)
            raw[a + 42:a + 46] = raw[b + 42:b + 46]
        return bytes(raw)
    if op == "extra_entry":
        return zip_bytes(entries + [(rng.choice(["model.pkl", "../x", "/etc/passwd", "model.ts"]), b"payload")])
    entries = entries[:]
    rng.shuffle(entries)
    return zip_bytes(entries)


class _Unseekable(io.RawIOBase):
    def __init__(self):
        self._buf = io.BytesIO()

    def writable(self):
        return True

    def write(self, b):
        return self._buf.write(b)

    def getvalue(self):
        return self._buf.getvalue()


def make_case(seed: int, index: int, original: bytes, regions, manifest, members) -> tuple[str, bytes]:
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.choices(KINDS, weights=(35, 30, 20, 15))[0]
    if kind == "bytes":
        return kind, mutate_bytes(rng, original, regions)
    if kind == "manifest":
        return kind, mutate_manifest(rng, manifest, members)
    if kind == "member":
        return kind, mutate_member(rng, manifest, members)
    return kind, mutate_zip(rng, manifest, members)


# -- the property --------------------------------------------------------------------------------------------------
def run_case(path: str) -> str:
    """'refused' / 'accepted' / 'created'; raises on anything outside the documented errors."""
    from vs_selftransfer.bundle import Bundle, BundleError
    from vs_selftransfer.runtime import create

    try:
        b = Bundle.open(path).verify()
        for name in b.manifest["members"]:
            b.member(name)
        b.state_dict()
    except BundleError:
        return "refused"
    try:
        create(path, backend="ort", threads=1, width=16, height=16)
    except ValueError:  # BundleError is one: every create error names its argument (model: ...)
        return "accepted"
    except RuntimeError as e:
        if str(e).startswith(path):  # a backend that cannot load the graph says so, naming the bundle
            return "accepted"
        raise
    return "created"


def worker(args) -> int:
    import warnings

    warnings.simplefilter("ignore")
    import vs_selftransfer.runtime  # noqa: F401 - imported before the clock starts

    original = Path(args.model).read_bytes()
    regions = structure_regions(original)
    manifest, members = read_parts(args.model)
    out = Path(args.out)
    work = Path(args.work)
    progress = Path(args.progress)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for index in range(args.start, args.cases):
        progress.write_text(str(index))
        kind, data = make_case(args.seed, index, original, regions, manifest, members)
        path = str(work / "case.stm")
        with open(path, "wb") as f:
            f.write(data)
        try:
            # ONNX Runtime prints its provider fallbacks ("EP Error ...") to stdout before raising.
            with contextlib.redirect_stdout(io.StringIO()):
                outcome = run_case(path)
        except Exception as e:  # noqa: BLE001 - the finding this script exists for
            outcome = "FINDING"
            (out / f"case_{index}.stm").write_bytes(data)
            (out / f"case_{index}.txt").write_text(f"{kind}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            print(f"fuzz: case {index} ({kind}): {type(e).__name__}: {str(e)[:200]}", flush=True)
        counts[f"{kind}:{outcome}"] = counts.get(f"{kind}:{outcome}", 0) + 1
        done = index + 1 - args.start
        if done % args.report_every == 0 or index + 1 == args.cases:
            rate = done / (time.perf_counter() - start)
            print(f"fuzz: {index + 1} cases, {rate:.1f}/s; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                  flush=True)
    progress.write_text(str(args.cases))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=100_000, help="number of mutated bundles (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed: a case is reproducible from (seed, index)")
    p.add_argument("--start", type=int, default=0, help="first case index (to rerun one: --start N --cases N+1)")
    p.add_argument("--model", help="the valid bundle to mutate (default: a random 8-channel CARN-M x2, exported)")
    p.add_argument("--out", default="fuzz-findings", help="folder for findings (default ./fuzz-findings)")
    p.add_argument("--report-every", type=int, default=1000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="fuzz-bundle-", dir=base) as tmp:
        model = args.model or make_seed_bundle(tmp)
        progress = os.path.join(tmp, "progress")
        start, crashes, begun = args.start, 0, time.perf_counter()
        print(f"fuzz: {args.cases - args.start} cases from {model}, seed {args.seed}", flush=True)
        while start < args.cases:
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--out", args.out, "--work", tmp,
                   "--progress", progress, "--seed", str(args.seed), "--start", str(start), "--cases",
                   str(args.cases), "--report-every", str(args.report_every)]
            rc = subprocess.call(cmd)
            reached = int(Path(progress).read_text()) if os.path.exists(progress) else start
            if rc == 0 and reached >= args.cases:
                break
            crashes += 1
            case = Path(tmp) / "case.stm"
            if case.exists():
                (Path(args.out) / f"crash_{reached}.stm").write_bytes(case.read_bytes())
            print(f"fuzz: the worker died (rc {rc}) on case {reached}; saved it, continuing after it", flush=True)
            start = reached + 1
        elapsed = time.perf_counter() - begun
        print(f"fuzz: done, {args.cases - args.start} cases in {elapsed:.0f} s "
              f"({(args.cases - args.start) / elapsed:.1f}/s), {crashes} worker crashes; findings in {args.out}")
        return 1 if crashes or any(Path(args.out).glob("case_*.txt")) else 0


if __name__ == "__main__":
    sys.exit(main())
