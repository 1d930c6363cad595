"""Convert the official CARN-M checkpoint (nmhkahn/CARN-pytorch, MIT) into the safetensors file the package ships.

    python scripts/convert_official_weights.py ../shared/data/carn_m_official_x234.pth

Checks the original's sha256 against the pinned one, loads it with ``torch.load(weights_only=True)`` (no code runs),
writes ``vs_selftransfer/official/carn_m_x234.safetensors`` with every tensor unchanged (the multi-scale x2/x3/x4
heads and their official names) and prints the sha256 of both files; ``vs_selftransfer.model.OFFICIAL_WEIGHTS``
records them. The .pth itself is never committed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vs_selftransfer.files import atomic_write, sha256_file  # noqa: E402
from vs_selftransfer.model import OFFICIAL_WEIGHTS, official_weights_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="the official carn_m.pth (x2/x3/x4)")
    ap.add_argument("-o", "--output", default=None, help="default: the file the package ships")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load as load_safetensors, save

    digest = sha256_file(args.checkpoint)
    if digest != OFFICIAL_WEIGHTS["source_sha256"]:
        sys.exit(f"{args.checkpoint}: sha256 {digest} is not the official carn_m.pth "
                 f"({OFFICIAL_WEIGHTS['source_sha256']})")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    data = save(tensors, metadata={"source": OFFICIAL_WEIGHTS["source"], "source_sha256": digest,
                                   "license": "MIT, Copyright (c) 2018 Namhyuk Ahn (see LICENSE.CARN-pytorch)"})
    back = load_safetensors(data)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), "round trip differs"
    out = Path(args.output) if args.output else official_weights_path(check=False)
    atomic_write(out, data)
    os.chmod(out, 0o644)
    print(f"{args.checkpoint}: sha256 {digest}")
    print(f"{out}: sha256 {sha256_file(out)} ({len(state)} tensors, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
