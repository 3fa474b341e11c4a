"""Peak memory, disk and time per round of `spafl run` as the number of clients grows.

For each size N: LeNet-5 on FMNIST, an iid split, 10 clients per round, one
local epoch, 100 evaluated clients, client states on disk, one thread. Each
run is a child process (`spafl run`), so its peak RSS is its own (from
``os.wait4``). Prints one JSON line per size, then one JSON object with all.

    .venv/bin/python benchmarks/scale.py --sizes 100,1000,10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "partition": "iid", "clients_per_round": 10, "local_epochs": 1, "eval_clients": 100,
    "client_store": "disk", "threads": 1, "checkpoint_every": 1,
}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(size: int, rounds: int, out: Path) -> dict:
    settings = {**SETTINGS, "num_clients": size, "rounds": rounds, "eval_clients": min(SETTINGS["eval_clients"], size)}
    command = [sys.executable, "-m", "spafl.cli", "run", "--preset", "fmnist-paper", "--out", str(out), "--quiet"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    with open(out.with_name(out.name + ".log"), "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"N={size}: spafl run exited with {child.returncode}; see {log.name}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r["seconds"] for r in rows if r["round"] > 0]
    return {
        "num_clients": size,
        "rounds": rounds,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "run_dir_mb": round(directory_bytes(out) / 2**20, 1),
        "client_files": sum(1 for _ in (out / "clients").glob("*.pt")) if (out / "clients").exists() else 0,
        "seconds_per_round": round(sum(trained) / len(trained), 3),
        "seconds_round0_eval": round(rows[0]["seconds"], 3),
        "clients_evaluated": rows[-1]["clients_evaluated"],
        "accuracy": round(rows[-1]["accuracy"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated numbers of clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="", help="where to keep the run directories (default: a temporary directory)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="spafl-scale-") as scratch:
        base = Path(args.out or scratch)
        base.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            result = measure(size, args.rounds, base / f"n{size}")
            print(json.dumps(result), flush=True)
            results.append(result)
    print(json.dumps({"benchmark": "scale", "settings": SETTINGS, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
