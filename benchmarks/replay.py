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
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from benchmarks.workloads import Call, Workload, branching, concurrent, cyclic_loop, realistic, sequential
from kvflow.harness.offline import CacheDriver
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


def replay_cache(workload: Workload, capacity: int, policy: str, tie_break: str = "lru") -> int:
    """Fixed-prompt tokens recomputed when replaying through a real cache.

    ``tie_break`` is the kvflow policy's (see :mod:`kvflow.cache.eviction`); stock policies ignore it.
    """
    hinted = policy == "kvflow"
    if hinted:
        driver = CacheDriver(size=capacity, policy_config={"tie_break": tie_break})
    else:
        driver = CacheDriver(size=capacity, cache_class=UnifiedRadixCache, policy=policy)
    misses = 0
    for index, call in enumerate(workload.interleaved()):
        hint = WorkflowHint(call.workflow_id, call.agent_id, call.fixed_len, call.steps)
        sequence = call.input_ids + _outputs(call, index)
        hit = driver.serve(sequence, hint if hinted else None)
        if not call.warmup:
            misses += max(call.fixed_len - hit, 0)
    return misses


def belady_misses(workload: Workload, capacity: int) -> int:
    """Belady on the trie of fixed prompts: resident segments stay prefix-closed.

    Each call needs room for its own varying part, so the room for fixed
    prompts at a call is ``capacity - (prompt - fixed + output)``.
    """
    calls = workload.interleaved()
    cuts = _segment_cuts(workload)
    paths = [_segment_path(call, cuts[call.workflow_id, call.agent_id]) for call in calls]
    sizes = {segment: length for path in paths for segment, length in path}
    next_use: list[dict[tuple, int]] = [{} for _ in calls]
    upcoming: dict[tuple, int] = {}
    for i in range(len(calls) - 1, -1, -1):
        next_use[i] = dict(upcoming)
        for segment, _ in paths[i]:
            upcoming[segment] = i

    resident: set[tuple] = set()
    misses = 0
    for i, call in enumerate(calls):
        for segment, length in paths[i]:
            if segment not in resident:
                misses += 0 if call.warmup else length
                resident.add(segment)
        room = capacity - call.varying_len
        on_path = {segment for segment, _ in paths[i]}
        while sum(sizes[s] for s in resident) > room:
            parents = {r[: len(r) - sizes[r]] for r in resident}
            leaves = [s for s in resident if s not in on_path and s not in parents]
            if not leaves:
                break
            resident.remove(max(leaves, key=lambda s: next_use[i].get(s, len(calls))))
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


def replay(workload: Workload, capacity: int, cost: CostModel) -> dict:
    measured_fixed = sum(c.fixed_len for c in workload.interleaved() if not c.warmup)
    result = {
        "workload": workload.name,
        "capacity_tokens": capacity,
        "fixed_tokens_requested": measured_fixed,
    }
    for name, misses in (
        ("optimum", belady_misses(workload, capacity)),
        ("kvflow", replay_cache(workload, capacity, "kvflow")),
        ("kvflow_mru_ties", replay_cache(workload, capacity, "kvflow", tie_break="mru")),
        ("lru", replay_cache(workload, capacity, "lru")),
    ):
        result[name] = {
            "miss_tokens": misses,
            "modelled_recompute_s": round(cost.recompute_s(misses), 4),
            "modelled_host_load_s": round(cost.load_s(misses), 4),
        }
    return result


def default_cases(scale: float = 1.0) -> list[tuple[Workload, int]]:
    """(workload, capacity) pairs; each pool holds about half of the distinct fixed prompts
    (rounded up by half the largest prompt, so a three-agent loop keeps two) plus one call's varying part."""

    def n(x: int) -> int:
        return max(16, int(x * scale))

    cases = [
        sequential(fixed_len=n(1024), rounds=3),
        branching(fixed_len=n(1024), rounds=3),
        concurrent(workflows=16, fixed_len=n(512), dynamic_len=n(256), output_len=n(256), rounds=2),
        realistic(),
        cyclic_loop(fixed_len=n(512)),
    ]
    out = []
    for workload in cases:
        largest_fixed = max(c.fixed_len for c in workload.interleaved())
        out.append((workload, (workload.fixed_tokens() + largest_fixed) // 2 + workload.largest_varying()))
    return out


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
    parser.add_argument("--recompute-tokens-per-s", type=float, default=CostModel.recompute_tokens_per_s)
    parser.add_argument("--link-gb-per-s", type=float, default=CostModel.link_gb_per_s)
    parser.add_argument("--kv-bytes-per-token", type=int, default=CostModel.kv_bytes_per_token)
    parser.add_argument(
        "--tolerance", type=float, default=0.10, help="allowed kvflow excess over the optimum"
    )
    parser.add_argument("--out", type=Path, help="write JSON results here")
    args = parser.parse_args(argv)
    cost = CostModel(args.recompute_tokens_per_s, args.link_gb_per_s, args.kv_bytes_per_token)

    results = [replay(workload, capacity, cost) for workload, capacity in default_cases(args.scale)]
    columns = ("capacity", "optimum", "kvflow", "mru-ties", "lru")
    ratios = ("kvflow/opt", "mru/opt", "lru/opt")
    print(
        f"{'workload':<24} "
        + " ".join(f"{c:>9}" for c in columns)
        + " "
        + " ".join(f"{c:>10}" for c in ratios)
    )
    failed = False
    for r in results:
        opt, kv, mru, lru = (r[k]["miss_tokens"] for k in ("optimum", "kvflow", "kvflow_mru_ties", "lru"))
        ok = kv <= opt * (1 + args.tolerance)
        failed |= not ok
        r["kvflow_within_tolerance"] = ok
        print(
            f"{r['workload']:<24} {r['capacity_tokens']:>9} {opt:>9} {kv:>9} {mru:>9} {lru:>9} "
            + " ".join(f"{_ratio(x, opt):>10.2f}" for x in (kv, mru, lru))
            + ("" if ok else "  <-- over tolerance")
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"cost_model": asdict(cost), "scale": args.scale, "results": results}
        args.out.write_text(json.dumps(payload, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
