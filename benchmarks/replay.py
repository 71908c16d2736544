"""Replay bound: a workload's request sequence through the real caches, and Belady's optimum.

``python -m benchmarks.replay`` replays every workload (no model, no server)
through the real ``WorkflowRadixCache`` with kvflow eviction (its default LRU
tie-break among equal steps, and the ``mru`` one) and with stock
``UnifiedRadixCache`` LRU, all on a real SGLang token allocator, and computes
the offline optimum for the same capacity: Belady on the fixed-prompt trie
(evict the resident segment whose next use is farthest in the future; varying
suffixes and outputs are never worth keeping). It reports fixed-prompt miss
tokens for each and a modelled prefill time from a cost model whose defaults
are the H200 figures of ../shared/KVFLOW.md section 3.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from benchmarks.workloads import (
    Call,
    Workload,
    branching,
    concurrent,
    cyclic_loop,
    realistic,
    sequential,
    staggered,
    timed,
)
from kvflow.cache.radix_cache import workflow_cache
from kvflow.harness.offline import CacheDriver
from kvflow.harness.provenance import provenance, write_result
from kvflow.hints import WorkflowHint, common_prefix_len


@dataclass(frozen=True)
class CostModel:
    """Per-token costs; defaults measured on an H200 for a Llama-3.1-8B-shaped model."""

    recompute_tokens_per_s: float = 31_000.0
    link_gb_per_s: float = 52.8
    kv_bytes_per_token: int = 128 * 1024

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.recompute_tokens_per_s

    def load_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / (self.link_gb_per_s * 1e9)


def _outputs(call: Call, index: int) -> list[int]:
    rng = random.Random(index)
    return [rng.randrange(1 << 20, 1 << 21) for _ in range(call.output_len)]


def replay_cache(
    workload: Workload, capacity: int, policy: str, policy_config: dict | None = None, check_every: int = 1
) -> int:
    """Fixed-prompt tokens recomputed when replaying through a real cache.

    ``policy_config`` is the kvflow policy's (``urgency``, ``tie_break``: see
    :mod:`kvflow.cache.eviction`); stock policies take none.
    """
    hinted = policy == "kvflow"
    if hinted:
        driver = CacheDriver(size=capacity, policy_config=policy_config, check_every=check_every)
    else:
        driver = CacheDriver(
            size=capacity, cache_class=UnifiedRadixCache, policy=policy, check_every=check_every
        )
    misses = 0
    for index, call in enumerate(workload.interleaved()):
        hint = WorkflowHint(call.workflow_id, call.agent_id, call.fixed_len, call.steps)
        sequence = call.input_ids + _outputs(call, index)
        hit = driver.serve(sequence, hint if hinted else None)
        if hinted and call.ends:
            workflow_cache(driver.cache).end_workflow(call.workflow_id)
        if not call.warmup:
            misses += max(call.fixed_len - hit, 0)
    driver.check_accounting()
    return misses


def belady_misses(workload: Workload, capacity: int) -> int:
    """Belady on the trie of fixed prompts: resident segments stay prefix-closed.

    Each call needs room for its own varying part, so the room for fixed
    prompts at a call is ``capacity - (prompt - fixed + output)``. Among the
    resident leaves not on the call's own path, the one used again last goes.
    """
    calls = workload.interleaved()
    cuts = _segment_cuts(workload)
    paths = [_segment_path(call, cuts[call.workflow_id, call.agent_id]) for call in calls]
    sizes = {segment: length for path in paths for segment, length in path}
    never = len(calls)
    next_use: list[dict[tuple, int]] = [{} for _ in calls]
    upcoming: dict[tuple, int] = {}
    for i in range(len(calls) - 1, -1, -1):
        next_use[i] = {segment: upcoming.get(segment, never) for segment, _ in paths[i]}
        for segment, _ in paths[i]:
            upcoming[segment] = i

    def parent(segment: tuple) -> tuple:
        return segment[: len(segment) - sizes[segment]]

    resident: dict[tuple, int] = {}  # segment -> the call index that uses it next
    children: Counter = Counter()  # resident children per segment
    used = misses = 0
    for i, call in enumerate(calls):
        for segment, length in paths[i]:
            if segment not in resident:
                misses += 0 if call.warmup else length
                used += length
                children[parent(segment)] += 1
            resident[segment] = next_use[i][segment]
        room = capacity - call.varying_len
        if used <= room:
            continue
        on_path = {segment for segment, _ in paths[i]}
        leaves = [(-resident[s], s) for s in resident if children[s] == 0 and s not in on_path]
        heapq.heapify(leaves)
        while used > room and leaves:
            _, victim = heapq.heappop(leaves)
            del resident[victim]
            used -= sizes[victim]
            up = parent(victim)
            children[up] -= 1
            if up in resident and children[up] == 0 and up not in on_path:
                heapq.heappush(leaves, (-resident[up], up))
    return misses


def _segment_cuts(workload: Workload) -> dict[tuple[str, str], list[int]]:
    """Cut each fixed prompt where another one diverges from it (the radix tree's node boundaries)."""
    prompts = {
        (c.workflow_id, c.agent_id): tuple(c.input_ids[: c.fixed_len]) for w in workload.workflows for c in w
    }
    cuts = {}
    for key, prompt in prompts.items():
        points = {len(prompt)}
        for other_key, other in prompts.items():
            if other_key == key:
                continue
            shared = common_prefix_len(prompt, other)
            if 0 < shared < len(prompt):
                points.add(shared)
        cuts[key] = sorted(points)
    return cuts


def _segment_path(call: Call, cuts: list[int]) -> list[tuple[tuple, int]]:
    """The call's fixed prompt as trie segments: (prefix up to the segment's end, segment length)."""
    fixed = tuple(call.input_ids[: call.fixed_len])
    path, start = [], 0
    for cut in cuts:
        path.append((fixed[:cut], cut - start))
        start = cut
    return path


POLICIES = (
    ("kvflow", "kvflow", None),
    ("kvflow_hops", "kvflow", {"urgency": "hops"}),
    ("kvflow_hops_mru_ties", "kvflow", {"urgency": "hops", "tie_break": "mru"}),
    ("lru", "lru", None),
)


def replay(workload: Workload, capacity: int, cost: CostModel, check_every: int = 1) -> dict:
    measured_fixed = sum(c.fixed_len for c in workload.interleaved() if not c.warmup)
    result = {
        "workload": workload.name,
        "params": workload.params,
        "capacity_tokens": capacity,
        "fixed_tokens_requested": measured_fixed,
    }
    runs = [("optimum", belady_misses(workload, capacity))]
    runs += [
        (name, replay_cache(workload, capacity, policy, config, check_every))
        for name, policy, config in POLICIES
    ]
    for name, misses in runs:
        result[name] = {
            "miss_tokens": misses,
            "modelled_recompute_s": round(cost.recompute_s(misses), 4),
            "modelled_host_load_s": round(cost.load_s(misses), 4),
        }
    return result


def _half_pool(workload: Workload) -> int:
    """About half of the distinct fixed prompts (rounded up by half the largest prompt, so a
    three-agent loop keeps two) plus one call's varying part."""
    largest_fixed = max(c.fixed_len for c in workload.interleaved())
    return (workload.fixed_tokens() + largest_fixed) // 2 + workload.largest_varying()


def default_cases(scale: float = 1.0) -> list[tuple[Workload, int]]:
    """(workload, capacity) pairs, each pool :func:`_half_pool`."""

    def n(x: int) -> int:
        return max(16, int(x * scale))

    cases = [
        sequential(fixed_len=n(1024), rounds=3),
        branching(fixed_len=n(1024), rounds=3),
        concurrent(workflows=16, fixed_len=n(512), dynamic_len=n(256), output_len=n(256), rounds=2),
        realistic(),
        cyclic_loop(fixed_len=n(512)),
    ]
    return [(workload, _half_pool(workload)) for workload in cases]


def timed_cases(workflows: list[int], scale: float = 1.0) -> list[tuple[Workload, int]]:
    """Time-ordered concurrent traces (:func:`benchmarks.workloads.timed`): for each count, one
    whose steps take 1x to 10x as long between workflows, and the same with every fourth
    workflow branching; each pool :func:`_half_pool`."""
    fixed = max(16, int(128 * scale))
    cases = []
    for count in workflows:
        for branching_every in (0, 4):
            workload = timed(workflows=count, fixed_len=fixed, rounds=3, branching_every=branching_every)
            cases.append((workload, _half_pool(workload)))
    return cases


STAGGERED_POOLS = (0.25, 0.5, 0.75)  # shares of all distinct fixed prompts


def staggered_cases(scale: float = 1.0, per_speed: int = 8) -> list[tuple[Workload, int]]:
    """Workflows of three speeds 9x apart that start together and run the same rounds
    (:func:`benchmarks.workloads.staggered`), ended by the client and not, each at
    :data:`STAGGERED_POOLS` of the fixed prompts (plus one call's varying part)."""
    fixed = max(16, int(128 * scale))
    cases = []
    for ended in (True, False):
        workload = staggered(per_speed=per_speed, fixed_len=fixed, ended=ended)
        for share in STAGGERED_POOLS:
            cases.append((workload, int(share * workload.fixed_tokens()) + workload.largest_varying()))
    return cases


def has_branches(result: dict) -> bool:
    """Whether the trace's future is not fully described by its hints (a branch is chosen late)."""
    return bool(result["params"].get("branches"))


def _ratio(misses: int, optimum: int) -> float:
    if optimum == 0:
        return 1.0 if misses == 0 else float("inf")
    return misses / optimum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="scale prompt lengths (CI uses a small scale)"
    )
    parser.add_argument(
        "--timed",
        default="16,64",
        help="workflow counts of the time-ordered concurrent traces, comma-separated ('' for none)",
    )
    parser.add_argument(
        "--staggered",
        action="store_true",
        help="replay only the staggered traces (workflows that stop at different times), reported",
    )
    parser.add_argument(
        "--check-every", type=int, default=1, help="check the cache invariants every N requests"
    )
    parser.add_argument("--recompute-tokens-per-s", type=float, default=CostModel.recompute_tokens_per_s)
    parser.add_argument("--link-gb-per-s", type=float, default=CostModel.link_gb_per_s)
    parser.add_argument("--kv-bytes-per-token", type=int, default=CostModel.kv_bytes_per_token)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.10,
        help="allowed kvflow excess over the optimum, on traces without branches",
    )
    parser.add_argument("--out", type=Path, help="write JSON results here")
    args = parser.parse_args(argv)
    provenance()  # the checkout as the run starts
    cost = CostModel(args.recompute_tokens_per_s, args.link_gb_per_s, args.kv_bytes_per_token)

    counts = [int(c) for c in args.timed.split(",") if c.strip()]
    if args.staggered:
        cases = staggered_cases(args.scale)
    else:
        cases = default_cases(args.scale) + timed_cases(counts, args.scale)
    names = [name for name, *_ in POLICIES]
    print(
        f"{'workload':<28} {'capacity':>9} {'optimum':>9} "
        + " ".join(f"{n.replace('kvflow_', ''):>13}" for n in names)
        + "   "
        + " ".join(f"{n.replace('kvflow_', '') + '/opt':>13}" for n in names)
    )
    failed = False
    results = []
    for workload, capacity in cases:
        r = replay(workload, capacity, cost, args.check_every)
        results.append(r)
        opt = r["optimum"]["miss_tokens"]
        misses = [r[name]["miss_tokens"] for name in names]
        ok = has_branches(r) or misses[0] <= opt * (1 + args.tolerance)
        failed |= not (ok or args.staggered)
        r["kvflow_within_tolerance"] = ok
        print(
            f"{r['workload']:<28} {capacity:>9} {opt:>9} "
            + " ".join(f"{m:>13}" for m in misses)
            + "   "
            + " ".join(f"{_ratio(m, opt):>13.3f}" for m in misses)
            + ("  (branches: reported)" if has_branches(r) else "" if ok else "  <-- over tolerance"),
            flush=True,
        )
    if args.out:
        command = " ".join(["python -m benchmarks.replay", *(sys.argv[1:] if argv is None else argv)])
        write_result(
            args.out,
            {"command": command, "cost_model": asdict(cost), "scale": args.scale, "results": results},
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
