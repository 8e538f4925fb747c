"""Run bench/train_step.py over several (config, S) points, one process each, and print a Markdown table.

python bench/sweep.py --config configs/tiny.py --batch_size 8 --lengths 512 1024 2048 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--extra", default="", help="extra arguments for train_step.py")
    args = ap.parse_args()
    rows = []
    for config in args.config:
        for s in args.lengths:
            cmd = [
                sys.executable,
                str(HERE / "train_step.py"),
                "--config",
                config,
                "--batch_size",
                str(args.batch_size),
            ]
            cmd += ["--sequence_length", str(s), "--reps", str(args.reps)] + args.extra.split()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(out, file=sys.stderr)
            rows.append(json.loads(out))
    print("| config | S | params | train bytes/s | step s | MFU | forward bytes/s | XLA temp MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['sequence_length']} | {r['parameters'] / 1e6:.1f}M | {r['train_bytes_per_s']:.0f} | "
            f"{r['train_step_s']:.2f} | {r.get('train_mfu', float('nan')):.0%} | "
            f"{r.get('forward_bytes_per_s', 0):.0f} | "
            f"{r.get('xla_temp_mb', 0):.0f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
