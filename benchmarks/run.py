"""Drive a workload against any SGLang-compatible server URL and measure it.

Each workflow runs in its own thread, its calls one after another (streamed,
to measure time to first token); workflows run concurrently. Reports per-call
TTFT, latency and cached tokens (device / host split when the server gives
it), per-workflow end-to-end latency, and the kvflow stats when the server has
``/kvflow/stats``. ``python -m benchmarks.run --url ... --workload sequential``
writes JSON results (``--workload agent-chat``: live agent sessions, :mod:`benchmarks.agent_chat`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from benchmarks.agent_chat import run_agent_chat, stream_generate
from benchmarks.workloads import WORKLOADS, AgentChatWorkload, Call, Workload
from kvflow.harness.provenance import provenance, write_result

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


@dataclass
class CallResult:
    workflow_id: str
    agent_id: str
    warmup: bool
    ttft: float
    latency: float
    prompt_tokens: int
    fixed_len: int
    cached_tokens: int
    cached_device: int | None
    cached_host: int | None
    output_ids: list[int]


def priority_of(workflow: list[Call], index: int) -> int:
    """The request priority SGLang's ``priority`` policy would need: sooner reuse = higher.

    It is the distance, in calls of the same workflow, to this agent's next
    call (what a framework knowing its graph could send), negated; frozen at
    insert time, which is the point of the comparison.
    """
    agent = workflow[index].agent_id
    for later in range(index + 1, len(workflow)):
        if workflow[later].agent_id == agent:
            return -(later - index)
    return -len(workflow)


def call_server(url: str, call: Call, hints: bool, priority: int | None, timeout: float) -> CallResult:
    body = {
        "input_ids": call.input_ids,
        "sampling_params": {"max_new_tokens": call.output_len, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    if hints:
        body["kvflow"] = call.hint()
    if priority is not None:
        body["priority"] = priority
    ttft, latency, last = stream_generate(url, body, timeout)
    meta = last["meta_info"]
    details = meta.get("cached_tokens_details") or {}
    return CallResult(
        call.workflow_id,
        call.agent_id,
        call.warmup,
        ttft,
        latency,
        meta["prompt_tokens"],
        call.fixed_len,
        meta["cached_tokens"],
        details.get("device"),
        details.get("host"),
        last.get("output_ids", []),
    )


def run_workload(
    url: str,
    workload: Workload,
    hints: bool = True,
    priorities: bool = False,
    timeout: float = 600.0,
    progress: bool = True,
) -> dict:
    """Run every workflow concurrently; return calls, summary and the kvflow stats if any."""
    results: list[list[CallResult]] = [[] for _ in workload.workflows]
    total = sum(len(w) for w in workload.workflows)
    bar = tqdm(total=total, desc=workload.name, leave=False) if progress and tqdm else None
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            flow = workload.workflows[index]
            for i, call in enumerate(flow):
                priority = priority_of(flow, i) if priorities else None
                results[index].append(call_server(url, call, hints, priority, timeout))
                if bar:
                    bar.update(1)
        except BaseException as error:  # surfaced after join
            errors.append(error)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(workload.workflows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if bar:
        bar.close()
    if errors:
        raise errors[0]

    stats = None
    response = requests.get(f"{url}/kvflow/stats", timeout=30)
    if response.status_code == 200:
        stats = response.json()
    return {
        "workload": workload.name,
        "params": workload.params,
        "wall_s": wall,
        "summary": summarize(results),
        "kvflow_stats": stats,
        "calls": [asdict(r) for flow in results for r in flow],
    }


def summarize(results: list[list[CallResult]]) -> dict:
    measured = [r for flow in results for r in flow if not r.warmup]
    workflow_latency = [sum(r.latency for r in flow if not r.warmup) for flow in results]
    fixed = sum(r.fixed_len for r in measured)
    fixed_hit = sum(min(r.cached_tokens, r.fixed_len) for r in measured)
    return {
        "calls": len(measured),
        "workflow_latency_median_s": statistics.median(workflow_latency),
        "workflow_latency_mean_s": statistics.fmean(workflow_latency),
        "ttft_median_s": statistics.median(r.ttft for r in measured),
        "ttft_mean_s": statistics.fmean(r.ttft for r in measured),
        "latency_median_s": statistics.median(r.latency for r in measured),
        "fixed_tokens": fixed,
        "fixed_tokens_hit": fixed_hit,
        "fixed_tokens_recomputed": fixed - fixed_hit,
        "cached_host_tokens": sum(r.cached_host or 0 for r in measured),
        "fixed_prompt_hit_rate": sum(r.cached_tokens >= r.fixed_len for r in measured) / len(measured),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="sequential")
    parser.add_argument(
        "--params",
        type=json.loads,
        default={},
        help="workload keyword arguments, e.g. '{\"fixed_len\": 2048}'",
    )
    parser.add_argument("--no-hints", action="store_true")
    parser.add_argument(
        "--priorities",
        action="store_true",
        help="send request priorities (for --radix-eviction-policy priority)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    provenance()  # the checkout as the run starts
    workload = WORKLOADS[args.workload](**args.params)
    if isinstance(workload, AgentChatWorkload):
        result = run_agent_chat(args.url, workload, hints=not args.no_hints)
    else:
        result = run_workload(args.url, workload, hints=not args.no_hints, priorities=args.priorities)
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
