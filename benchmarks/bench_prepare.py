"""Time and peak memory of `prepare` on MovieLens-1M and on a synthetic world ten times larger.

Each case runs in a fresh process (so peak RSS is its own). Run: python benchmarks/bench_prepare.py
Memory should follow the number of kept interactions (the per-user sequences), not the raw file size.
"""

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from cprec.config import from_dict
from cprec.data.prepare import PrepareConfig, prepare
cfg = from_dict(PrepareConfig, json.loads(sys.argv[1]))
t = time.perf_counter()
m = prepare(cfg, sys.argv[2], overwrite=True)
files = m["source"]["files"]
import os
raw = sum(os.path.getsize(f) for f in files if os.path.exists(f))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows_read": m["rejects"]["rows_read"], "kept": m["counts"]["interactions"], "raw_bytes": raw}))
"""

CASES = {
    "movielens-1m": {},
    "synthetic x1 (~1M)": {"source": "synthetic", "downstream_domains": ["Garden", "Kitchen"],
                           "synthetic": {"users": 6000, "domains": 8, "items_per_domain": 2000,
                                         "interactions_per_user": 170}},
    "synthetic x10 (~10M)": {"source": "synthetic", "downstream_domains": ["Garden", "Kitchen"],
                             "synthetic": {"users": 60000, "domains": 8, "items_per_domain": 2000,
                                           "interactions_per_user": 170}},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    print("| case | rows read | kept interactions | raw MB | seconds | rows/s | peak RSS MB | RSS bytes/kept |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES[name]), f"{tmp}/out"],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['rows_read']:,} | {r['kept']:,} | {r['raw_bytes'] / 2**20:.1f} | {r['seconds']:.1f} | "
              f"{r['rows_read'] / r['seconds']:,.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] * 2**20 / r['kept']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
