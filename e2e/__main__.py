"""`python -m e2e`: start the local cluster, run every scenario, print one summary line each.

Exit status 0 only when every runnable scenario passed; logs (operator, pods, Prometheus) stay in
the work directory, printed at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from e2e.cluster import Cluster
from e2e.report import Result
from e2e.scenarios import MODEL, NAME, Scenarios
from e2e.traffic import SteadyClient


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m e2e", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where logs go (default: a new temporary directory)")
    parser.add_argument("--time-scale", type=float, default=0.2, help="multiplies probe periods (default 0.2)")
    parser.add_argument("--concurrency", type=int, default=2, help="steady client streams (default 2)")
    parser.add_argument("--only", action="append", default=[], help="run only these scenarios (method names)")
    parser.add_argument("--budget-s", type=float, default=600, help="fail if the whole run takes longer")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvpilot-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"e2e: logs in {workdir}", flush=True)
    started = time.monotonic()
    results: list[Result] = []
    async with Cluster(workdir, args.time_scale) as cluster:
        client = SteadyClient(cluster.proxy.url(NAME), MODEL, args.concurrency, max_tokens=4, timeout_s=20)
        scenarios = Scenarios(cluster, client)
        try:
            for scenario in scenarios.all():
                if args.only and scenario.__name__ not in args.only and scenario.__name__ != "ready":
                    continue
                mark = time.monotonic()
                try:
                    result = await scenario()
                except AssertionError as exc:
                    during = client.since(mark)
                    first_line = str(exc).splitlines()[0][:300]
                    result = Result(
                        scenario.__name__, False, len(during), sum(not o.ok for o in during), note=first_line
                    )
                    print(str(exc)[:3000], file=sys.stderr)
                results.append(result)
                print(result.line(), flush=True)
                if scenario.__name__ == "ready" and not result.passed and result.to_ready_s is None:
                    break  # nothing serves: every later scenario would fail for the same reason
        finally:
            if client.running:
                await client.stop()
    elapsed = time.monotonic() - started
    total = len(client.outcomes)
    failed = sum(not o.ok for o in client.outcomes)
    hangs = sum(o.hang for o in client.outcomes)
    print(f"e2e: {elapsed:.0f}s in all; steady client {total} sent / {failed} failed / {hangs} hung", flush=True)
    ok = all(r.passed is not False for r in results) and elapsed <= args.budget_s and hangs == 0
    return 0 if ok else 1


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(main(arguments)))
