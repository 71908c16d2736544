"""Does a hint flood or a stats poller delay a normal request? kvflow and stock SGLang side by side.

``python -m kvflow.harness.abuse --probes 40`` starts a kvflow server and a stock one
(``--radix-cache-backend stock``) with the same model and pool, then times a plain
un-hinted ``/generate`` (the probe) on each, interleaved, in three phases: quiet; while
another client floods the server with hinted requests carrying the largest hints the limits
allow (1024-entry steps maps, 205-character agent names, a new workflow each); and while
another client polls ``GET /kvflow/stats`` (the stock server answers 404). It prints the
median and p90 probe latency per server and phase and the kvflow / stock ratio, and writes
them as JSON. Probes and the abuse run concurrently on the same machine, so absolute
latencies include the abuser's CPU share on both servers alike; the ratio is the measure.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from kvflow.harness.provenance import provenance, write_result
from kvflow.harness.server_process import ServerProcess

PROBE = {"input_ids": list(range(10, 42)), "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
NAMES = [f"{'n' * 200}{i:05d}" for i in range(1024)]


def flood_once(url: str, i: int) -> None:
    steps = {name: (i + j) % 1000 for j, name in enumerate(NAMES)}
    hint = {"workflow_id": f"flood-{i}", "agent_id": NAMES[i % 1024], "steps_to_execution": steps}
    body = {"input_ids": [1 + i % 200] * 8, "sampling_params": {"max_new_tokens": 1}, "kvflow": hint}
    requests.post(f"{url}/generate", json=body, timeout=120)


def poll_stats_once(url: str, i: int) -> None:
    requests.get(f"{url}/kvflow/stats", timeout=120)


def probe(url: str) -> float:
    started = time.perf_counter()
    response = requests.post(f"{url}/generate", json=PROBE, timeout=120)
    response.raise_for_status()
    return time.perf_counter() - started


def keep_abusing(abuse: Callable[[str, int], None], url: str, first: int, stop: threading.Event) -> None:
    i = first
    while not stop.is_set():
        abuse(url, i)
        i += 1


def run_phase(urls: dict[str, str], probes: int, abuse: Callable[[str, int], None] | None) -> dict:
    """Probe every server in turn while ``abuse`` runs against that same server."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    for round_index in range(probes):
        for name, url in urls.items():
            stop = threading.Event()
            thread = None
            if abuse is not None:
                thread = threading.Thread(target=keep_abusing, args=(abuse, url, round_index * 1000, stop))
                thread.start()
                time.sleep(0.05)  # let the abuse get going
            times[name].append(probe(url))
            stop.set()
            if thread is not None:
                thread.join()
    return {
        name: {
            "median_s": statistics.median(values),
            "p90_s": statistics.quantiles(values, n=10)[-1] if len(values) >= 10 else max(values),
        }
        for name, values in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", type=int, default=40, help="probes per server and phase")
    parser.add_argument("--max-total-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("docs/robustness/cpu-abuse.json"))
    args = parser.parse_args(argv)
    provenance()  # the checkout as the run starts
    common = ["--max-total-tokens", str(args.max_total_tokens), "--random-seed", "0"]
    with (
        ServerProcess(common) as kvflow_server,
        ServerProcess([*common, "--radix-cache-backend", "stock"]) as stock_server,
    ):
        urls = {"kvflow": kvflow_server.url, "stock": stock_server.url}
        phases = {
            "quiet": run_phase(urls, args.probes, None),
            "hint_flood": run_phase(urls, args.probes, flood_once),
            "stats_poll": run_phase(urls, args.probes, poll_stats_once),
        }
        stats = requests.get(f"{kvflow_server.url}/kvflow/stats", timeout=60)
        summary = {key: stats.json()[key] for key in ("tracked", "limits")}
        summary["stats_bytes"] = len(stats.content)
    result = {
        "probes": args.probes,
        "phases": phases,
        "kvflow_state": summary,
    }
    write_result(args.out, result)
    print(f"{'phase':<12} {'kvflow median/p90 ms':>22} {'stock median/p90 ms':>22} {'ratio':>6}")
    for phase, servers in phases.items():
        k, s = servers["kvflow"], servers["stock"]
        print(
            f"{phase:<12} {1e3 * k['median_s']:>11.1f}/{1e3 * k['p90_s']:<10.1f} "
            f"{1e3 * s['median_s']:>11.1f}/{1e3 * s['p90_s']:<10.1f} {k['median_s'] / s['median_s']:>6.2f}"
        )
    print(f"kvflow state after the flood: {summary}")


if __name__ == "__main__":
    main()
