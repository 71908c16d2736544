"""Per-operation cost of the cache: kvflow with hints beside stock SGLang on its Python and Rust cores.

``python -m benchmarks.cache_cost [--sizes 1000 10000 100000] [--shapes fan grouped]``

SGLang ships no micro-benchmark of the unified radix cache (its tests drive ``UnifiedRadixCache``
directly: ``insert(InsertParams)``, ``match_prefix(MatchPrefixParams)``, ``evict(EvictParams)`` on
a real allocator), so this one drives exactly those calls, the way
:class:`kvflow.harness.offline.CacheDriver` and the scheduler do, on caches built from the same
``CacheInitParams`` (:class:`Subject`), in trees of one :class:`Shape`, timed by :func:`run_case`.

- Each operation is timed alone and interleaved across the caches; the collector is off during
  builds and timings (for every cache alike).
- Reports ops/s (1 / mean) and p50 / p99 latency per op, and kvflow's ratio to each stock core, to
  ``benchmarks/results/cache-cost.json`` and ``.md``; ``--before`` names an earlier report whose
  ratios the table shows beside the new ones, ``--note`` a line on how the run was made.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from array import array
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_cache.tree_core_registry import resolve_tree_core_backend
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvflow.cache.eviction import POLICY_NAME, register_eviction_policy
from kvflow.cache.radix_cache import WorkflowRadixCache, workflow_cache
from kvflow.cache.tree_core import register_tree_core
from kvflow.config import CONFIG_ENV, KVFlowConfig
from kvflow.harness.provenance import provenance, write_result
from kvflow.hints import WorkflowHint

RESULTS = Path(__file__).parent / "results"
SYSTEM_LEN, GROUP_LEN, AGENT_LEN, TAIL_LEN, PROBE_LEN = 32, 16, 16, 16, 8
GROUP_SIZE = 100
AGENTS_PER_WORKFLOW = 64
OPS = ("match", "evict", "insert", "mixed")


class Shape:
    """Token sequences of one tree shape; every id is unique to its segment, so no two agents share
    more than the system (and group) prompt.

    ``N`` agents each with a 16-token fixed prompt (one node each):

    - ``fan``: one 32-token system prompt, every agent's prompt a child of it (``N`` siblings);
    - ``grouped``: the system prompt, then groups of 100 agents sharing a 16-token group prompt.
    """

    def __init__(self, name: str, agents: int) -> None:
        self.name = name
        self.agents = agents
        self._next = 1 << 40  # tails and probes: ids no prompt uses

    @staticmethod
    def _segment(kind: int, index: int, length: int) -> list[int]:
        base = (kind << 36) + index * length
        return list(range(base, base + length))

    def prompt(self, agent: int) -> array:
        tokens = self._segment(1, 0, SYSTEM_LEN)
        if self.name == "grouped":  # agents past the build join its groups
            tokens += self._segment(2, (agent % self.agents) // GROUP_SIZE, GROUP_LEN)
        return array("q", tokens + self._segment(3, agent, AGENT_LEN))

    def fresh(self, length: int) -> list[int]:
        start, self._next = self._next, self._next + length
        return list(range(start, start + length))

    def hint(self, agent: int, prompt: array) -> WorkflowHint:
        return WorkflowHint(
            workflow_id=f"wf{agent // AGENTS_PER_WORKFLOW}",
            agent_id=f"a{agent % AGENTS_PER_WORKFLOW}",
            fixed_prefix_len=len(prompt),
        )

    def build_tokens(self) -> int:
        groups = -(-self.agents // GROUP_SIZE) if self.name == "grouped" else 0
        return SYSTEM_LEN + groups * GROUP_LEN + self.agents * AGENT_LEN


@contextmanager
def _kvflow_config(agents: int):
    """A config that tracks every agent of the run (the default caps would forget most)."""
    config = KVFlowConfig(
        max_workflows=agents // AGENTS_PER_WORKFLOW + 16, max_tracked_agents=agents * 2 + 1024
    )
    before = os.environ.get(CONFIG_ENV)
    config.to_env()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = before


class Subject:
    """One cache under test on its own pool.

    - ``kvflow``: :class:`~kvflow.cache.WorkflowRadixCache` (Python core plus ownership
      bookkeeping), every agent hinted (``observe_hint``, then ``claim`` and ``agent_finished``
      after its insert, as a finished request does);
    - ``python``: stock ``UnifiedRadixCache``, ``tree_core_backend="python"``, LRU;
    - ``rust``: stock ``UnifiedRadixCache``, ``tree_core_backend="rust"`` (SGLang's default core),
      LRU; left out, with SGLang's own reason, where its registry falls back to Python
      (:func:`rust_unavailable`).
    """

    def __init__(self, name: str, pool: int, shape: Shape) -> None:
        self.name, self.shape = name, shape
        self.hinted = name == "kvflow"
        self.allocator = TokenToKVPoolAllocator(pool, torch.float32, "cpu", kvcache=None, need_sort=False)
        params = _params(self.allocator, "python" if name != "rust" else "rust", self.hinted)
        if self.hinted:
            with _kvflow_config(shape.agents):
                self.cache: UnifiedRadixCache = WorkflowRadixCache(params)
        else:
            self.cache = UnifiedRadixCache(params)
        self.core = workflow_cache(self.cache)  # kvflow's core; None for a stock cache
        self.times: dict[str, list[int]] = {op: [] for op in (*OPS, "hint")}

    def request(self, agent: int, tail: list[int] | None) -> None:
        """One request of ``agent``: its prompt plus ``tail`` (None: the prompt alone, as in the build)."""
        cache, core, prompt = self.cache, self.core, self.shape.prompt(agent)
        state = core.observe_hint(self.shape.hint(agent, prompt), prompt) if core is not None else None
        tokens = prompt if tail is None else prompt + array("q", tail)
        match = cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        hit = match.device_prefix_len
        prefix = cache.path_device_indices(match.last_device_node)[:hit]
        lock = cache.lock(match.last_device_node)
        need = len(tokens) - hit
        if self.allocator.available_size() < need:
            cache.evict(EvictParams(num_tokens=need - self.allocator.available_size()))
        new = self.allocator.alloc(need)
        assert new is not None, f"{self.name}: pool exhausted"
        cache.unlock(lock)
        cache.insert(InsertParams(key=RadixKey(tokens), value=torch.cat([prefix, new]), prev_prefix_len=hit))
        if state is not None:
            core.claim(state, tokens)
            core.agent_finished(state)

    def timed(self, op: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter_ns()
        fn()
        self.times[op].append(time.perf_counter_ns() - start)


def _params(allocator: TokenToKVPoolAllocator, backend: str, hinted: bool) -> CacheInitParams:
    return CacheInitParams(
        disable=False,
        req_to_token_pool=None,
        token_to_kv_pool_allocator=allocator,
        page_size=1,
        eviction_policy=POLICY_NAME if hinted else "lru",
        tree_components=(ComponentType.FULL,),
        tree_core_backend=backend,
    )


def rust_unavailable() -> str | None:
    """SGLang's own reason its registry would not give the Rust core here, or None."""
    allocator = TokenToKVPoolAllocator(16, torch.float32, "cpu", kvcache=None, need_sort=False)
    params = _params(allocator, "rust", hinted=False)
    try:
        if resolve_tree_core_backend("rust", params) != "rust":
            return "SGLang's tree-core registry falls back to Python here (see its log)"
        cache = UnifiedRadixCache(params)
        cache.insert(InsertParams(key=RadixKey(array("q", [1, 2])), value=allocator.alloc(2)))
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        return f"{type(error).__name__}: {error}"
    return None


def _interleave(
    subjects: list[Subject], count: int, op: str, make: Callable[[Subject, int], Callable]
) -> None:
    for i in range(count):
        shift = i % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            subject.timed(op, make(subject, i))


def _summary(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "ops": n,
        "ops_per_s": round(1e9 / statistics.fmean(ordered), 1),
        "p50_us": round(ordered[n // 2] / 1e3, 2),
        "p99_us": round(ordered[min(n - 1, (99 * n) // 100)] / 1e3, 2),
    }


def run_case(shape_name: str, agents: int, ops: int, with_rust: bool) -> dict[str, Any]:
    """Build the three trees for one shape and size, then time every operation.

    Each operation is timed alone (``perf_counter_ns``) and interleaved across the caches (op ``i``
    on every cache, in a rotating order, before op ``i + 1``), the pool full after the build:

    - ``match``: ``match_prefix`` of an agent's prompt plus 8 unseen tokens;
    - ``evict``: ``evict`` of 16 tokens (one agent's prompt; kvflow evicts a hinted, owned one);
    - ``insert``: ``insert`` of a new agent's prompt into the room the evictions made;
    - ``mixed``: one whole request of a known agent: (kvflow: ``observe_hint``) ``match_prefix``,
      lock, ``evict`` the 16 tokens its new tail needs, allocate, unlock, ``insert`` prompt + tail,
      (kvflow: ``claim``, ``agent_finished``);
    - ``hint`` (kvflow only, no stock equivalent): ``observe_hint`` of a known agent (its next use
      refreshed).
    """
    names = ["kvflow", "python"] + (["rust"] if with_rust else [])
    evict_ops = max(20, min(ops, agents // 10, 2_000_000 // agents))  # each is O(leaves) in SGLang
    # Inserts are cheap: their room is the timed evictions' topped up by one untimed eviction.
    new_agents = max(evict_ops, min(ops, agents // 10))
    shapes = {name: Shape(shape_name, agents) for name in names}
    subjects, build_s = [], {}
    gc.collect()
    gc.disable()  # no collector pauses inside builds and timings (the same for every cache)
    for name in names:
        subject = Subject(name, shapes[name].build_tokens(), shapes[name])
        start = time.perf_counter()
        for agent in range(agents):
            subject.request(agent, tail=None)
        build_s[name] = round(time.perf_counter() - start, 2)
        subjects.append(subject)

    step = max(1, agents // ops)
    _interleave(
        subjects,
        ops,
        "match",
        lambda s, i: (
            lambda: s.cache.match_prefix(
                MatchPrefixParams(
                    key=RadixKey(s.shape.prompt((i * step) % agents) + array("q", [-1 - i] * PROBE_LEN))
                )
            )
        ),
    )
    _interleave(
        subjects, evict_ops, "evict", lambda s, i: lambda: s.cache.evict(EvictParams(num_tokens=AGENT_LEN))
    )

    def insert(s: Subject, i: int) -> Callable:
        prompt = s.shape.prompt(agents + i)
        match = s.cache.match_prefix(MatchPrefixParams(key=RadixKey(prompt)))
        hit = match.device_prefix_len
        prefix = s.cache.path_device_indices(match.last_device_node)[:hit]
        lock = s.cache.lock(match.last_device_node)
        need = len(prompt) - hit
        if s.allocator.available_size() < need:  # its group prompt was evicted too (untimed)
            s.cache.evict(EvictParams(num_tokens=need - s.allocator.available_size()))
        value = torch.cat([prefix, s.allocator.alloc(need)])
        s.cache.unlock(lock)
        return lambda: s.cache.insert(InsertParams(key=RadixKey(prompt), value=value, prev_prefix_len=hit))

    for subject in subjects:
        shortfall = new_agents * AGENT_LEN - subject.allocator.available_size()
        if shortfall > 0:
            subject.cache.evict(EvictParams(num_tokens=shortfall))
    _interleave(subjects, new_agents, "insert", insert)
    mixed_ops = max(20, min(ops // 4, 2_000_000 // agents))  # each evicts: O(leaves) in SGLang
    _interleave(
        subjects,
        mixed_ops,
        "mixed",
        lambda s, i: lambda: s.request((i * 7919) % agents, tail=s.shape.fresh(TAIL_LEN)),
    )
    kvflow = subjects[0]
    for i in range(ops):
        agent = (i * 104729) % agents
        prompt = kvflow.shape.prompt(agent)
        hint = kvflow.shape.hint(agent, prompt)
        kvflow.timed("hint", lambda hint=hint, prompt=prompt: kvflow.core.observe_hint(hint, prompt))
    gc.enable()
    kvflow.core.check_integrity()

    result: dict[str, Any] = {"shape": shape_name, "agents": agents, "build_s": build_s, "ops": {}}
    for op in (*OPS, "hint"):
        per = {s.name: _summary(s.times[op]) for s in subjects if s.times[op]}
        for base in names[1:]:
            if op in OPS:
                per[f"kvflow_over_{base}"] = round(per["kvflow"]["p50_us"] / per[base]["p50_us"], 2)
                per[f"kvflow_over_{base}_mean"] = round(
                    per[base]["ops_per_s"] / per["kvflow"]["ops_per_s"], 2
                )
        result["ops"][op] = per
    return result


def _markdown(report: dict[str, Any]) -> str:
    bases = ["python"] + (["rust"] if report["rust"]["available"] else [])
    lines = [
        f"# Cache cost per operation ({report['machine']}, commit {report['commit']})",
        "",
        "`python -m benchmarks.cache_cost` — kvflow (`WorkflowRadixCache`, every agent hinted) beside stock "
        "`UnifiedRadixCache` on SGLang's Python and Rust tree cores, operations interleaved. "
        "Latencies in microseconds; ratio = kvflow / stock (p50, and mean in brackets); below 1 is faster.",
        "",
    ]
    if not report["rust"]["available"]:
        lines += [f"Rust core unavailable: {report['rust']['reason']}", ""]
    header = "| shape | agents | op | kvflow p50 / p99 | " + " | ".join(f"{b} p50 / p99" for b in bases)
    header += " | " + " | ".join(f"ratio to {b}" for b in bases) + " |"
    before = report.get("before")
    if before is not None:
        header += " " + " | ".join(f"before: ratio to {b}" for b in bases) + " |"
        lines += [f"Before: `{before['source']}` (commit {before['commit']}, {before['machine']}).", ""]
    lines += [header, "|" + "---|" * (4 + (3 if before is not None else 2) * len(bases))]
    for case in report["results"]:
        for op, per in case["ops"].items():
            k = per["kvflow"]
            row = f"| {case['shape']} | {case['agents']} | {op} | {k['p50_us']} / {k['p99_us']} | "
            earlier = before["cases"].get(_case_key(case)) if before is not None else None
            columns = [(per, bases)]
            if before is not None:  # a case the earlier report lacks shows dashes
                columns.append((None if earlier is None else earlier["ops"].get(op), bases))
            if op == "hint":
                row += " | ".join("—" for _ in bases) + " | "
            else:
                row += " | ".join(f"{per[b]['p50_us']} / {per[b]['p99_us']}" for b in bases) + " | "
            row += " | ".join(_ratio(ratios, b) for ratios, names in columns for b in names) + " |"
            lines.append(row)
    lines += [
        "",
        f"Target: kvflow within 1.2x of stock Python on every operation: **{report['target_met']}**.",
    ]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def _case_key(case: dict[str, Any]) -> str:
    return f"{case['shape']}-{case['agents']}"


def _ratio(per: dict[str, Any] | None, base: str) -> str:
    if per is None or f"kvflow_over_{base}" not in per:
        return "—"
    return f"{per[f'kvflow_over_{base}']} ({per[f'kvflow_over_{base}_mean']})"


def _before(path: Path) -> dict[str, Any]:
    """The ratios of an earlier report, by case, to show beside the new ones."""
    earlier = json.loads(path.read_text())
    return {
        "source": path.name,
        "machine": earlier["machine"],
        "commit": earlier.get("commit", "unknown"),
        "cases": {
            _case_key(case): {
                "ops": {
                    op: {name: value for name, value in per.items() if name.startswith("kvflow_over_")}
                    for op, per in case["ops"].items()
                }
            }
            for case in earlier["results"]
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--shapes", nargs="+", choices=("fan", "grouped"), default=["fan", "grouped"])
    parser.add_argument(
        "--ops", type=int, default=1000, help="timed operations per kind (evict: fewer at large sizes)"
    )
    parser.add_argument("--no-rust", action="store_true", help="leave the Rust core out")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache-cost.json")
    parser.add_argument("--before", type=Path, help="an earlier report's JSON, its ratios shown beside")
    parser.add_argument("--note", default="", help="a line on how the run was made (e.g. a shared machine)")
    args = parser.parse_args(argv)

    provenance()  # the checkout as the run starts
    register_eviction_policy()
    register_tree_core()
    reason = None if not args.no_rust else "left out (--no-rust)"
    reason = reason or rust_unavailable()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "rust": {"available": reason is None, "reason": reason},
        "results": [],
        "note": args.note,
    }
    if args.before is not None:
        report["before"] = _before(args.before)
    for agents in args.sizes:
        for shape in args.shapes:
            start = time.perf_counter()
            case = run_case(shape, agents, args.ops, with_rust=reason is None)
            case["wall_s"] = round(time.perf_counter() - start, 1)
            report["results"].append(case)
            print(json.dumps({k: case[k] for k in ("shape", "agents", "wall_s", "build_s")}), flush=True)
            for op, per in case["ops"].items():
                print(f"  {op:7s} " + "  ".join(f"{name}={value}" for name, value in per.items()), flush=True)
    report["target_met"] = all(
        case["ops"][op]["kvflow_over_python"] <= 1.2 for case in report["results"] for op in OPS
    )
    report = write_result(args.out, report)
    args.out.with_suffix(".md").write_text(_markdown(report))
    return report


if __name__ == "__main__":
    main()
