"""`cprec pack` against the usual Hugging Face route, on the MovieLens-1M documents with the SmolLM2 tokenizer.

Prints, in one run:
  * tokens per second per core: `cprec pack` vs `datasets.map` (same fast tokenizer, batched, the same number
    of processes, EOS appended) followed by `group_texts`-style chunking; both end to end, from the prepared
    JSONL files to packed rows on disk;
  * slot use and split documents for pack, for that route and for padding to the longest (batches of 16);
  * peak memory of pack on the corpus and on ten times the corpus.

Run: python benchmarks/bench_pack.py [--workers 2] [--seq-len 1024]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PACK_CHILD = r"""
import json, resource, sys, time
from cprec.data.pack import PackConfig, pack
t = time.perf_counter()
index = pack(sys.argv[1], "smollm2", sys.argv[2], PackConfig(seq_len=int(sys.argv[3]), workers=int(sys.argv[4]),
                                                                line_cache=sys.argv[5] == "1"))
wall = time.perf_counter() - t
st = index["streams"].values()
print(json.dumps({"wall": wall, "tokens": sum(s["tokens"] for s in st), "rows": sum(s["rows"] for s in st),
                  "split": sum(s["split_documents"] for s in st), "docs": sum(s["documents"] for s in st),
                  "shards": index["report"]["shards"],
                  "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

HF_CHILD = r"""
import json, sys, time
from itertools import chain
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
files, folder, seq_len, workers, out = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t = time.perf_counter()
tok = AutoTokenizer.from_pretrained(folder)
ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=out)
def tokenize(batch):
    ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [x + [tok.eos_token_id] for x in ids]}
ds = ds.map(tokenize, batched=True, num_proc=workers, remove_columns=ds.column_names)
def group_texts(batch):  # as in the transformers language-modelling examples
    concatenated = list(chain(*batch["input_ids"]))
    total = len(concatenated) // seq_len * seq_len
    return {"input_ids": [concatenated[i:i + seq_len] for i in range(0, total, seq_len)]}
lengths = [len(x) for x in ds["input_ids"]]
grouped = ds.map(group_texts, batched=True, batch_size=1000, num_proc=workers)
wall = time.perf_counter() - t
# documents cut by a row boundary: with batch_size=1000 every group of 1000 documents is chunked on its own
split = dropped = 0
for start in range(0, len(lengths), 1000):
    group = lengths[start:start + 1000]
    ends = list(__import__("itertools").accumulate(group))
    total = ends[-1] // seq_len * seq_len
    dropped += ends[-1] - total
    begin = 0
    for end in ends:
        if begin // seq_len != (end - 1) // seq_len or end > total:
            split += 1
        begin = end
print(json.dumps({"wall": wall, "tokens": sum(lengths), "rows": len(grouped), "split": split,
                  "docs": len(lengths), "dropped": dropped, "lengths": lengths}))
"""


def run(code, *args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stream_files(prepared: Path) -> list[str]:
    return sorted(str(p) for p in (prepared / "documents").glob("*.jsonl")) + \
        sorted(str(p) for p in (prepared / "downstream").glob("*/sft.jsonl"))


def times_ten(prepared: Path, target: Path) -> Path:
    """A prepared directory whose every document file holds the corpus ten times."""
    shutil.copytree(prepared, target)
    for path in stream_files(target):
        data = Path(path).read_bytes()
        with open(path, "wb") as fh:
            for _ in range(10):
                fh.write(data)
    return target


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--prepared", help="a prepared MovieLens-1M directory (default: made here)")
    args = parser.parse_args()
    from cprec.backbone import resolve_tokenizer
    from cprec.data.prepare import PrepareConfig, prepare

    folder = resolve_tokenizer("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = Path(args.prepared) if args.prepared else tmp / "prepared"
        if not args.prepared:
            prepare(PrepareConfig(tokenizer="smollm2", window_tokens=args.seq_len - 1), prepared)
        w = args.workers
        ours = run(PACK_CHILD, prepared, tmp / "shards", args.seq_len, w, 1)
        whole = run(PACK_CHILD, prepared, tmp / "shards_whole", args.seq_len, w, 0)
        hf = run(HF_CHILD, json.dumps(stream_files(prepared)), folder, args.seq_len, w, tmp / "hf")
        big = run(PACK_CHILD, times_ten(prepared, tmp / "prepared10"), tmp / "shards10", args.seq_len, w, 1)

    lengths = np.array(hf.pop("lengths"))
    pad_slot = []
    for start in range(0, len(lengths), 16):
        batch = lengths[start:start + 16]
        pad_slot.append((batch.sum(), len(batch) * batch.max()))
    pad_use = sum(a for a, _ in pad_slot) / sum(b for _, b in pad_slot)
    print(f"corpus: {ours['docs']:,} documents, {ours['tokens']:,} tokens (EOS included), seq_len {args.seq_len}, "
          f"{w} processes on {os.cpu_count()} cores\n")
    print("| route | wall s | tokens/s | tokens/s per core | slot use | split documents | dropped tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("cprec pack (best-fit, line cache)", ours), ("cprec pack, line_cache=false", whole),
                    ("HF datasets.map + group_texts", hf)):
        use = r["tokens"] / (r["rows"] * args.seq_len) if name.startswith("cprec") else 1.0
        dropped = r.get("dropped", 0)
        print(f"| {name} | {r['wall']:.1f} | {r['tokens'] / r['wall']:,.0f} | {r['tokens'] / r['wall'] / w:,.0f} | "
              f"{use:.2%} | {r['split']:,} | {dropped:,} |")
    print(f"| pad to longest (batches of 16) | – | – | – | {pad_use:.2%} | 0 | 0 |")
    print(f"\nspeed-up per core over the HF route: {hf['wall'] / ours['wall']:.2f}x with the line cache, "
          f"{hf['wall'] / whole['wall']:.2f}x without\n")
    print("| pack input | documents | wall s | main process peak RSS MB | largest worker peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, r in (("corpus", ours), ("10 x corpus", big)):
        print(f"| {name} | {r['docs']:,} | {r['wall']:.1f} | {r['main_rss_mb']:.0f} | {r['worker_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
