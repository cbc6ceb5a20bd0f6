"""The long fuzz run of the intake path (tests/fuzz.py): mutated real files through the
receiver's header parsing and the worker's prepare_data, in parallel processes.

Every input must get a result or a reason; an exception that escapes, an input slower than
--timeout seconds (a hang) or memory growth past --max-rss-mb is a finding, and its bytes are
kept under --findings for a regression test. Prints a table of outcomes and findings.
Run: .venv/bin/python stress/fuzz_intake.py --inputs 1000000 [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def work(args: tuple[int, int, float, str]) -> tuple[Counter, Counter, int]:
    """One worker's share: (outcomes, findings, peak RSS in KiB)."""
    seed, count, timeout, findings_dir = args
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    os.environ["RUST_BACKTRACE"] = "0"
    from tests.fuzz import ingest, mutate, seed_files

    seeds = [p.read_bytes() for p in seed_files()]
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    findings: Counter = Counter()
    signal.signal(signal.SIGALRM, _alarm)
    for _ in range(count):
        data = mutate(rng.choice(seeds), rng)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            outcomes[ingest(data)] += 1
        except Hang:
            findings[f"slower than {timeout:g} s"] += 1
            _keep(findings_dir, data)
        except BaseException as exc:  # the finding sought: anything that escapes
            findings[f"{type(exc).__name__}: {' '.join(str(exc).split())[:80]}"] += 1
            _keep(findings_dir, data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return outcomes, findings, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _keep(directory: str, data: bytes) -> None:
    path = Path(directory) / f"{hashlib.sha256(data).hexdigest()[:16]}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, default=500, help="inputs per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    ap.add_argument("--max-rss-mb", type=float, default=2048.0)
    ap.add_argument("--findings", type=Path, default=Path("var/fuzz-findings"))
    args = ap.parse_args()
    chunks = [(args.seed * 1_000_003 + i, min(args.chunk, args.inputs - i * args.chunk),
               args.timeout, str(args.findings))
              for i in range((args.inputs + args.chunk - 1) // args.chunk)]  # fmt: skip
    outcomes: Counter = Counter()
    findings: Counter = Counter()
    peak = 0
    start = time.perf_counter()
    # A fresh process every 20 tasks keeps a slow leak from hiding behind the RSS limit.
    with multiprocessing.Pool(args.workers, maxtasksperchild=20) as pool:
        for done, (o, f, rss) in enumerate(pool.imap_unordered(work, chunks), start=1):
            outcomes.update(o)
            findings.update(f)
            peak = max(peak, rss)
            if rss / 1024 > args.max_rss_mb:
                findings[f"RSS {rss / 1024:.0f} MiB > {args.max_rss_mb:g} MiB"] += 1
            n = sum(outcomes.values()) + sum(findings.values())
            print(f"\r{n:,} inputs, {sum(findings.values())} findings, {done}/{len(chunks)}",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    n = sum(outcomes.values()) + sum(findings.values())
    print(file=sys.stderr)
    print(f"# {n:,} inputs in {seconds:.0f} s ({n / seconds:.0f}/s, {args.workers} workers),"
          f" seed {args.seed}, {args.chunk} per task; peak RSS per worker"
          f" {peak / 1024:.0f} MiB")  # fmt: skip
    print("\n| outcome | inputs |\n|---|---|")
    for outcome, count in outcomes.most_common():
        print(f"| {outcome} | {count:,} |")
    print("\n| finding | inputs |\n|---|---|")
    for finding, count in findings.most_common() or [("none", 0)]:
        print(f"| {finding} | {count:,} |")


if __name__ == "__main__":
    main()
