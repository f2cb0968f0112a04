"""Peak memory of one prompt's prefill: the full prefill (every layer's K/V kept until decode
starts, today's evaluation path) against the engine's layer-by-layer prefill that hands each
layer to its cache as soon as the layer is done (dense layers' K/V + one layer's working set).

Each path runs in a fresh subprocess after the model is loaded and reports its peak of memory
in use over that baseline: on CUDA torch.cuda.max_memory_allocated; on the CPU glibc's count of
bytes malloc has handed out (mallinfo2: heap + mmapped chunks, where large tensors live),
sampled every 0.5 ms by a thread while the prefill runs (the peak resident set would also count
pages malloc keeps after a free). Side by side from one command:

    python scripts/bench_prefill_memory.py [--tokens 7000] [--device cpu] [--json PATH]

The library side of ``scripts/bench_prefill_memory.py`` (:func:`parse_args`, :func:`run`,
:func:`main`); each path's subprocess runs this module (``python -m``) with ``--child``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

PATHS = ("full", "layer_by_layer")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HostPeak:
    """Peak of glibc's bytes in use (uordblks + hblkhd) while the ``with`` block runs."""

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._info = libc.mallinfo2
        self.peak, self._stop = 0, threading.Event()

    def now(self) -> int:
        info = self._info()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.0005)

    def __enter__(self) -> "HostPeak":
        self.base = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def measure(path: str, tokens: int, device: str) -> dict:
    """Run one prefill path in this process; returns its peak growth in bytes and the state."""
    import torch

    from magicpig import LongContextModel, MagicPIGConfig
    from magicpig.core.kv_budget import blocks_for
    from magicpig.runtime.prefill import prefill
    from magicpig.runtime.standalone import StandaloneRunner

    model = LongContextModel.from_pretrained(device=device, dtype=torch.float32)
    config = MagicPIGConfig(K=10, L=400, min_collisions=4)
    ids = (model.encode("The quick brown fox jumps over the lazy dog. " * (tokens // 8))[0][0])[:tokens]
    runner = StandaloneRunner(model.model, config, 1, blocks_for(tokens + 1, 256), 256)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with HostPeak() as host:
        if path == "full":
            state = prefill(model.model, [ids], progress=False)  # every layer's K/V at once
            seq = runner.add_prefilled(state.keys[0], state.values[0])
            del state
        else:
            seq, _ = runner.prefill(ids)
    peak = torch.cuda.max_memory_allocated() - base if cuda else host.peak - host.base
    kv_all = 2 * model.args.num_layers * model.args.num_kv_heads * model.args.head_dim * 4 * len(ids)
    store = runner.runner.cpu_bytes(seq)  # host memory by design: on a CPU-only run it counts in the peak
    runner.release(seq)
    return {"path": path, "tokens": len(ids), "peak_growth_bytes": peak, "all_layers_kv_bytes": kv_all,
            "cpu_store_bytes": store, "device_peak_bytes": peak if cuda else peak - store}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=7000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Both paths, each in a fresh subprocess (or, with --child, one path here); prints the
    comparison (and writes --json). Returns the exit status."""
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.device)))
        return 0
    rows = {}
    for path in PATHS:
        cmd = [sys.executable, "-m", "magicpig.bench.prefill_memory", "--child", path,
               "--tokens", str(args.tokens), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    full, lbl = rows["full"]["device_peak_bytes"], rows["layer_by_layer"]["device_peak_bytes"]
    mib = 1 << 20
    print(f"prefill of {rows['full']['tokens']} tokens on {args.device} (fp32 SmolLM2-135M, magicpig K=10 L=400):")
    print(f"  all layers' K/V: {rows['full']['all_layers_kv_bytes'] / mib:8.1f} MiB; "
          f"CPU store after prefill: {rows['full']['cpu_store_bytes'] / mib:.1f} MiB")
    for name, row in rows.items():
        print(f"  {name:>15}: peak growth {row['peak_growth_bytes'] / mib:8.1f} MiB, "
              f"less the CPU store (device side): {row['device_peak_bytes'] / mib:8.1f} MiB")
    print(f"  device side: layer-by-layer needs {full / max(lbl, 1):.2f}x less than the full prefill")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratio": full / max(lbl, 1)}, f, indent=2)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":  # the children: python -m magicpig.bench.prefill_memory --child PATH ...
    sys.exit(main())
