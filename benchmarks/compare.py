"""Side by side: stock SGLang configurations and kvflow on the same workload, interleaved.

``python -m benchmarks.compare --workload sequential --params '{"fixed_len": 2048}'``
starts one ``kvflow.launch_server`` per configuration with identical model,
pool and flags, then runs the workload on them in turn (A B C A B C ...) for
``--repeats`` rounds, and writes JSON, a markdown table of medians with ratios
against each baseline, and PNG plots. Configurations:

- ``lru``: stock SGLang cache selection (``--radix-cache-backend stock``), LRU, device pool only;
- ``lru-hicache``: the same plus ``--enable-hierarchical-cache``;
- ``tlru``: stock ``--radix-eviction-policy tlru`` (tail-optimized LRU for conversations), its
  budget from the workload (:func:`tlru_budget`);
- ``session-radix``: stock LRU with ``--enable-session-radix-cache`` (on the live ``agent-chat``
  workload, its requests carry their session id and ended sessions are closed);
- ``priority``: stock ``--radix-eviction-policy priority`` with each request's priority set
  from its agent's next use (the cheap alternative);
- ``kvflow``: kvflow's workflow-aware eviction, device pool only;
- ``kvflow-hicache``: kvflow's eviction on both tiers;
- ``kvflow-hops``, ``kvflow-hicache-hops``: the same ordered by the paper's hop counts instead of
  expected time (``--radix-eviction-policy-config '{"urgency": "hops"}'``, see
  ``kvflow.cache.eviction``); ``kvflow-mru``, ``kvflow-hicache-mru``: hop counts with the ``mru``
  tie-break among equal steps;
- ``ideal``: stock LRU with a pool large enough to keep every prompt.

The live ``agent-chat`` workload (:mod:`benchmarks.agent_chat`) sizes the pool with
``--pool-tokens``, empties every server's cache before each run (``/flush_cache``) and reports
TTFT percentiles, history tokens served and job completion times instead.

With ``--one-at-a-time`` servers run one after another instead of side by side
(for GPUs that cannot hold several models); runs then repeat per server.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from benchmarks import agent_chat
from benchmarks.run import run_workload
from benchmarks.workloads import WORKLOADS, AgentChatWorkload, Workload
from kvflow.harness.provenance import provenance, write_result
from kvflow.harness.server_process import ServerProcess

HICACHE_FLAG = "--enable-hierarchical-cache"
HOPS = ["--radix-eviction-policy-config", json.dumps({"urgency": "hops"})]
MRU_TIES = ["--radix-eviction-policy-config", json.dumps({"urgency": "hops", "tie_break": "mru"})]
CONFIGS: dict[str, list[str]] = {
    "lru": ["--radix-cache-backend", "stock", "--radix-eviction-policy", "lru"],
    "lru-hicache": [
        "--radix-cache-backend",
        "stock",
        "--radix-eviction-policy",
        "lru",
        HICACHE_FLAG,
    ],
    "tlru": ["--radix-cache-backend", "stock", "--radix-eviction-policy", "tlru"],
    "session-radix": [
        "--radix-cache-backend",
        "stock",
        "--radix-eviction-policy",
        "lru",
        "--enable-session-radix-cache",
    ],
    "priority": ["--radix-cache-backend", "stock", "--radix-eviction-policy", "priority"],
    "kvflow": [],
    "kvflow-hicache": [HICACHE_FLAG],
    "kvflow-hops": HOPS,
    "kvflow-hicache-hops": [HICACHE_FLAG, *HOPS],
    "kvflow-mru": MRU_TIES,
    "kvflow-hicache-mru": [HICACHE_FLAG, *MRU_TIES],
    "ideal": ["--radix-cache-backend", "stock", "--radix-eviction-policy", "lru"],
}
BASELINES = ("lru", "lru-hicache")


def config_args(name: str, size: int, extra: list[str], link_gbps: float = 0.0) -> list[str]:
    """Server flags of configuration ``name``; an emulated link goes only where there is a host tier."""
    args = [*CONFIGS[name], "--max-total-tokens", str(size), "--random-seed", "0", *extra]
    if link_gbps > 0 and HICACHE_FLAG in CONFIGS[name]:
        args += ["--kvflow-emulate-link-gbps", str(link_gbps)]
    return args


def ideal_pool_tokens(workload: Workload) -> int:
    """A device pool in which stock LRU never evicts a fixed prompt after warm-up.

    Besides every fixed prompt and the requests in flight, LRU needs room for
    the varying parts (dynamic suffix + output) written during one round of
    every agent: between two uses of a prompt they are all newer than it.
    """
    calls = workload.interleaved()
    in_flight = max(4, len(workload.workflows))
    largest_call = max(len(c.input_ids) + c.output_len for c in calls)
    agents = {(c.workflow_id, c.agent_id) for c in calls}
    return workload.fixed_tokens() + in_flight * largest_call + len(agents) * workload.largest_varying()


def tlru_budget(workload: Workload | AgentChatWorkload) -> dict:
    """T-LRU's config (SGLang requires one): as ``session_replay.tlru_budget``, an eighth of the
    largest prompt as the prefill budget, the mean tokens a request adds as the next prompt."""
    if isinstance(workload, AgentChatWorkload):
        sessions = workload.all_sessions()
        largest = max(len(s.system) + sum(len(t.new_ids) + t.output_len for t in s.turns) for s in sessions)
        added = [len(t.new_ids) for s in sessions for t in s.turns[1:]]
    else:
        calls = workload.interleaved()
        largest = max(len(c.input_ids) for c in calls)
        added = [len(c.input_ids) - c.fixed_len for c in calls]
    estimate = round(statistics.fmean(added)) if added else 0
    return {"threshold": max(largest // 8, estimate + 1), "next_prompt_estimate": estimate}


def median_summary(runs: list[dict]) -> dict:
    keys = runs[0]["summary"].keys()
    return {k: statistics.median(r["summary"][k] for r in runs) for k in keys}


def markdown_table(medians: dict[str, dict]) -> str:
    head = (
        "| config | workflow latency (s) | TTFT (s) | fixed-prompt hit rate "
        "| fixed tokens recomputed | host tokens |"
    )
    ratio_heads = [f" vs {b} |" for b in BASELINES if b in medians]
    lines = [head + "".join(ratio_heads), "|---" * (6 + len(ratio_heads)) + "|"]
    for name, m in medians.items():
        row = (
            f"| {name} | {m['workflow_latency_median_s']:.3f} | {m['ttft_median_s']:.3f} | "
            f"{m['fixed_prompt_hit_rate']:.2f} | {m['fixed_tokens_recomputed']:.0f} | "
            f"{m['cached_host_tokens']:.0f} |"
        )
        for b in BASELINES:
            if b in medians:
                row += f" {medians[b]['workflow_latency_median_s'] / m['workflow_latency_median_s']:.2f}x |"
        lines.append(row)
    return "\n".join(lines)


PREFETCH_COUNTERS = ("issued", "timely", "late", "wasted", "held", "skipped_no_room")


def kvflow_counters(runs: list[dict]) -> dict[str, float] | None:
    """Median per run of the kvflow server's prefetch counters.

    The server's counters are cumulative, so each run's share is its difference to the run
    before it on the same server (the first run's share includes the server's warm-up calls).
    None for a server without a prefetcher (a stock configuration, or no host tier).
    """
    stats = [r.get("kvflow_stats") for r in runs]
    if not stats or any(s is None or s.get("prefetch") is None for s in stats):
        return None
    cumulative = [{k: s["prefetch"][k] for k in PREFETCH_COUNTERS} for s in stats]
    deltas = [
        {k: now[k] - (before[k] if before else 0) for k in now}
        for before, now in zip([None, *cumulative[:-1]], cumulative, strict=True)
    ]
    return {k: statistics.median(d[k] for d in deltas) for k in PREFETCH_COUNTERS}


def counters_table(runs: dict[str, list[dict]]) -> str:
    """The prefetch counters beside the latency table, per kvflow configuration with a host tier."""
    rows = {name: c for name, rs in runs.items() if (c := kvflow_counters(rs)) is not None}
    if not rows:
        return ""
    lines = [
        "Prefetches per run (median of the differences between consecutive runs of each server):",
        "",
        "| config | " + " | ".join(PREFETCH_COUNTERS) + " |",
        "|---" * (len(PREFETCH_COUNTERS) + 1) + "|",
    ]
    for name, c in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{c[k]:.0f}" for k in PREFETCH_COUNTERS) + " |")
    return "\n".join(lines)


def plot(medians: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(medians)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [medians[n]["workflow_latency_median_s"] for n in names], color="tab:blue")
    ax1.set_ylabel("median workflow latency (s)")
    ax1.tick_params(axis="x", rotation=30)
    hit = [medians[n]["fixed_tokens_hit"] - medians[n]["cached_host_tokens"] for n in names]
    host = [medians[n]["cached_host_tokens"] for n in names]
    recomputed = [medians[n]["fixed_tokens_recomputed"] for n in names]
    ax2.bar(names, hit, label="hit on device", color="tab:green")
    ax2.bar(names, host, bottom=hit, label="loaded from host", color="tab:orange")
    ax2.bar(
        names,
        recomputed,
        bottom=[a + b for a, b in zip(hit, host, strict=True)],
        label="recomputed",
        color="tab:red",
    )
    ax2.set_ylabel("fixed-prompt tokens")
    ax2.tick_params(axis="x", rotation=30)
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_pool_tokens(url: str) -> int | None:
    """The server's device KV pool size as SGLang sized it (it may be below ``--max-total-tokens``)."""
    try:
        info = requests.get(f"{url}/server_info", timeout=30).json()
    except (requests.RequestException, ValueError):
        return None
    return info.get("max_total_num_tokens")


def flush_cache(url: str, attempts: int = 30) -> None:
    """Empty the server's cache (SGLang refuses while requests are in flight: then retry)."""
    for _ in range(attempts):
        if requests.post(f"{url}/flush_cache", timeout=30).status_code == 200:
            return
        time.sleep(1.0)
    raise RuntimeError(f"{url}: /flush_cache refused {attempts} times")


def compare(
    workload: Workload | AgentChatWorkload,
    configs: list[str],
    pool: int,
    repeats: int,
    extra: list[str],
    one_at_a_time: bool,
    log_dir: Path,
    partial_path: Path | None = None,
    hints: bool = True,
    link_gbps: float = 0.0,
) -> dict:
    live = isinstance(workload, AgentChatWorkload)
    # Live: room for every context and as much again for the requests in flight.
    ideal_pool = 2 * workload.context_tokens() if live else ideal_pool_tokens(workload)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    policy_config = {"tlru": ["--radix-eviction-policy-config", json.dumps(tlru_budget(workload))]}
    startup: dict[str, float] = {}
    pool_actual: dict[str, int | None] = {}

    def pool_for(name: str) -> int:
        return ideal_pool if name == "ideal" else pool

    def launch(names: list[str]) -> dict[str, ServerProcess]:
        """Start the servers side by side, then wait for all of them."""
        servers = {
            name: ServerProcess(
                config_args(name, pool_for(name), extra + policy_config.get(name, []), link_gbps),
                log_path=log_dir / f"{name}.log",
                timeout=300.0 + 60.0 * len(names),  # side by side, they share the CPUs as they start
            )
            for name in names
        }
        # Host tiers first: SGLang sizes a host pool against the memory left free (less a 10 GiB
        # reserve) as its scheduler starts, which servers starting beside it would take.
        waves = [
            [n for n in names if HICACHE_FLAG in CONFIGS[n]],
            [n for n in names if HICACHE_FLAG not in CONFIGS[n]],
        ]
        try:
            for wave in waves:
                for name in wave:
                    servers[name].start()
                for name in wave:
                    servers[name].wait_ready()
            for name, server in servers.items():
                startup[name] = server.startup_seconds
                pool_actual[name] = device_pool_tokens(server.url)
                if pool_actual[name] is not None and pool_actual[name] < pool_for(name):
                    print(
                        f"  warning: {name} got a pool of {pool_actual[name]} tokens, asked {pool_for(name)}"
                    )
        except BaseException:
            for server in servers.values():
                server.stop()
            raise
        return servers

    def measure(name: str, server: ServerProcess) -> None:
        if live:
            flush_cache(server.url)
            result = agent_chat.run_agent_chat(
                server.url,
                workload,
                hints=hints,
                session_ids=(name == "session-radix"),
                tag=f"r{len(runs[name])}-",
            )
            m = result["summary"]
            print(
                f"  {name}: served {m['history_served']}/{m['history_tokens']}, TTFT p50 "
                f"{m['ttft_p50_s']:.3f}s p99 {m['ttft_p99_s']:.3f}s, JCT {m['jct_median_s']:.2f}s",
                flush=True,
            )
        else:
            result = run_workload(
                server.url, workload, hints=hints, priorities=(name == "priority"), progress=False
            )
            print(f"  {name}: {result['summary']['workflow_latency_median_s']:.3f}s", flush=True)
        runs[name].append(result)
        if partial_path is not None:  # what finished survives a timeout
            partial_path.write_text(
                json.dumps({"startup_s": startup, "pool_tokens_actual": pool_actual, "runs": runs}, indent=2)
            )

    if one_at_a_time:
        for name in configs:
            server = launch([name])[name]
            try:
                for _ in range(repeats):
                    measure(name, server)
            finally:
                server.stop()
    else:
        servers = launch(configs)
        try:
            for repeat in range(repeats):
                print(f"repeat {repeat + 1}/{repeats}", flush=True)
                for name in configs:
                    measure(name, servers[name])
        finally:
            for server in servers.values():
                server.stop()

    medians = {name: median_summary(r) for name, r in runs.items()}
    return {
        "workload": workload.name,
        "params": workload.params,
        "pool_tokens": pool,
        "ideal_pool_tokens": ideal_pool,
        "repeats": repeats,
        "one_at_a_time": one_at_a_time,
        "extra_flags": extra,
        "emulated_link_gbps": link_gbps,
        "hints": hints,
        "startup_s": startup,
        "pool_tokens_actual": pool_actual,
        "medians": medians,
        "runs": {
            name: [{k: v for k, v in r.items() if k != "calls"} for r in rs] for name, rs in runs.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="sequential")
    parser.add_argument("--params", type=json.loads, default={}, help="workload keyword arguments (JSON)")
    parser.add_argument(
        "--configs", default="lru,priority,kvflow", help=f"comma-separated, from {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--pool-fraction", type=float, default=0.5, help="device pool as a fraction of all fixed prompts"
    )
    parser.add_argument(
        "--pool-tokens",
        type=int,
        help="device pool in tokens (agent-chat: default pool-fraction of all contexts)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-at-a-time", action="store_true")
    parser.add_argument("--no-hints", action="store_true", help="send no kvflow hints (overhead check)")
    parser.add_argument(
        "--emulate-link-gbps",
        type=float,
        default=0.0,
        metavar="GB_PER_S",
        help="CPU only: pass --kvflow-emulate-link-gbps to the configurations with a host tier",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="result file stem (default: workload name)")
    parser.add_argument("server_flags", nargs="*", help="after --: flags for every server (model, backends)")
    args = parser.parse_args(argv)

    provenance()  # the checkout as the run starts
    workload = WORKLOADS[args.workload](**args.params)
    live = isinstance(workload, AgentChatWorkload)
    if args.pool_tokens:
        pool = args.pool_tokens
    elif live:
        pool = int(workload.context_tokens() * args.pool_fraction)
    else:
        concurrency = len(workload.workflows)
        pool = int(workload.fixed_tokens() * args.pool_fraction) + concurrency * workload.largest_varying()
    configs = [c for c in args.configs.split(",") if c]
    stem = args.name or workload.name
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.out_dir / "logs" / stem
    log_dir.mkdir(parents=True, exist_ok=True)

    # Under `timeout`, SIGTERM must still run the `finally` blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    result = compare(
        workload,
        configs,
        pool,
        args.repeats,
        args.server_flags,
        args.one_at_a_time,
        log_dir,
        log_dir / "partial.json",
        hints=not args.no_hints,
        link_gbps=args.emulate_link_gbps,
    )
    result.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        command="python -m benchmarks.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        duration_s=time.time() - started,
    )
    table = (agent_chat.markdown_table if live else markdown_table)(result["medians"])
    counters = counters_table(result["runs"])
    if counters:
        table += "\n\n" + counters
    result = write_result(args.out_dir / f"{stem}.json", result)
    pools = ", ".join(f"{k} {v}" for k, v in result["pool_tokens_actual"].items())
    header = (
        f"## {stem}\n\n{result['machine']}, {result['date']}, commit {result['commit']}"
        f"{' (uncommitted changes)' if result['dirty'] else ''}\n\n`{result['command']}`\n\n"
        f"Device KV pool (tokens, as sized by each server): {pools}\n\n"
    )
    (args.out_dir / f"{stem}.md").write_text(header + table + "\n")
    if not live:  # the plot draws fixed-prompt tokens
        try:
            plot(result["medians"], args.out_dir / f"{stem}.png", stem)
        except ImportError:
            print("matplotlib not installed: no plot")
    print(header + table)


if __name__ == "__main__":
    main()
