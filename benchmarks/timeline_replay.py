"""A live agent-chat run's timeline replayed through real caches, with requests in flight.

``python -m benchmarks.timeline_replay benchmarks/results/cpu-agent-chat.json`` takes every run of
a live ``agent-chat`` comparison (:mod:`benchmarks.compare`, :mod:`benchmarks.agent_chat`) and
replays its exact timeline through real caches (:class:`kvflow.harness.offline.CacheDriver`), once
per policy: stock ``lru``, ``kvflow`` with the benchmark's hints, and ``next_arrival``, an oracle
that knows when every session sends its next turn. It separates what the live numbers mix: how
much of a difference between configurations is the eviction order and how much is the timeline
(which turns overlapped, so how much of the pool the requests in flight held), and what any
eviction order could serve on that timeline.

Model of one turn: it arrives at its measured send time; it is admitted once its cached prefix is
matched and locked and its new tokens (the rest of its prompt and its output) are allocated,
evicting as needed, or it waits for a turn in flight to finish, as the scheduler queues it; it
finishes after its measured latency, when its prompt + output but the last token (what SGLang
inserts) go into the tree and its lock is released. Outputs are fresh ids of the measured length.
The oracle runs the stock ``priority`` policy: every node of a session's path below the system
prompt is ranked by that session's next send time (none: first to go), system prompts last.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from benchmarks import agent_chat
from benchmarks.workloads import WORKLOADS, LiveSession
from kvflow.cache.radix_cache import workflow_cache
from kvflow.cache.workflow_table import AgentState
from kvflow.harness.offline import CacheDriver
from kvflow.harness.provenance import write_result
from kvflow.hints import WorkflowHint

POLICIES = ("lru", "kvflow", "next_arrival")
RESULTS = Path(__file__).parent / "results"
FIRST_ID = 1 << 20  # output ids: fresh, above every vocabulary the workloads use


@dataclass
class InFlight:
    """One admitted turn: what it holds until it finishes."""

    prompt: list[int]
    output: list[int]
    hit: int
    prefix: torch.Tensor
    new: torch.Tensor
    lock: Any
    agent: AgentState | None
    hint: WorkflowHint | None


class TimelineReplay:
    """One policy's cache, fed a run's turns at their measured times."""

    def __init__(self, run: dict, pool: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        workload = WORKLOADS["agent-chat"](**run["params"])
        self.sessions: dict[str, LiveSession] = {s.session_id: s for s in workload.all_sessions()}
        self.turns = sorted(run["turns"], key=lambda t: t["sent_s"])
        self.sent = {(t["session_id"], t["turn"]): t["sent_s"] for t in self.turns}
        if policy == "kvflow":
            self.driver = CacheDriver(size=pool, check_every=1 << 60)
        else:
            stock = "priority" if policy == "next_arrival" else policy
            self.driver = CacheDriver(
                size=pool, cache_class=UnifiedRadixCache, policy=stock, check_every=1 << 60
            )
        self.cache = self.driver.cache
        self.prompts: dict[tuple[str, int], list[int]] = {}
        self.outputs: dict[tuple[str, int], list[int]] = {}
        self.fresh = itertools.count(FIRST_ID)

    def run(self) -> list[int]:
        """Replay every turn; return each turn's cached prefix length, in send order."""
        events = [(t["sent_s"], 1, i) for i, t in enumerate(self.turns)]  # (time, 0 finish / 1 arrive, turn)
        heapq.heapify(events)
        waiting: list[int] = []
        running: dict[int, InFlight] = {}
        hits = [0] * len(self.turns)
        while events:
            now, kind, i = heapq.heappop(events)
            if kind == 1:
                waiting.append(i)
            else:
                self._finish(i, running.pop(i))
            still = []
            for j in waiting:
                admitted = self._admit(j)
                if admitted is None:
                    still.append(j)
                    continue
                running[j], hits[j] = admitted, admitted.hit
                heapq.heappush(events, (now + self.turns[j]["latency"], 0, j))
            waiting = still
        assert not waiting, f"{len(waiting)} turns never fit in the pool"
        self.driver.check_accounting()
        return hits

    def _admit(self, i: int) -> InFlight | None:
        turn = self.turns[i]
        sid, k = turn["session_id"], turn["turn"]
        session = self.sessions[sid]
        if (sid, k) not in self.prompts:
            start = list(session.system) if k == 0 else self.prompts[sid, k - 1] + self.outputs[sid, k - 1]
            self.prompts[sid, k] = start + list(session.turns[k].new_ids)
            self.outputs[sid, k] = [next(self.fresh) for _ in range(turn["output_len"])]
        prompt, output = self.prompts[sid, k], self.outputs[sid, k]
        hint = agent = None
        if self.policy == "kvflow":
            fields = agent_chat.hint(session, "", len(prompt), k == len(session.turns) - 1)
            hint = WorkflowHint(
                fields["workflow_id"], fields["agent_id"], fields["fixed_prefix_len"],
                fields["steps_to_execution"], fields["keep_context"],
            )  # fmt: skip
        match = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(list(prompt))))
        hit = match.device_prefix_len
        lock = self.cache.lock(match.last_device_node)
        need = len(prompt) + len(output) - hit
        allocator = self.driver.allocator
        if allocator.available_size() < need:
            self.cache.evict(EvictParams(num_tokens=need - allocator.available_size()))
        new = allocator.alloc(need)
        if new is None:
            self.cache.unlock(lock)
            return None
        if hint is not None:  # admitted: the hint takes effect now, as the scheduler's admission does
            agent = workflow_cache(self.cache).observe_hint(hint, prompt)
        prefix = self.cache.path_device_indices(match.last_device_node)[:hit]
        return InFlight(prompt, output, hit, prefix, new, lock, agent, hint)

    def _finish(self, i: int, turn: InFlight) -> None:
        tokens = turn.prompt + turn.output[:-1]
        kept = len(tokens) - turn.hit
        inserted = self.cache.insert(
            InsertParams(
                key=RadixKey(list(tokens)),
                value=torch.cat([turn.prefix, turn.new[:kept]]),
                prev_prefix_len=turn.hit,
            )
        )
        self.driver.allocator.free(turn.new[kept:])
        self.cache.unlock(turn.lock)
        if turn.agent is not None:
            core = workflow_cache(self.cache)
            core.claim(turn.agent, tokens)
            core.claim_context(turn.agent, tokens, keep=turn.hint.keep_context)
            core.agent_finished(turn.agent)
        if self.policy == "next_arrival":
            self._rank_by_next_arrival(self.turns[i], inserted.last_device_node, len(tokens))

    def _rank_by_next_arrival(self, turn: dict, last_node: Any, depth: int) -> None:
        """Rank the session's path (leaf up) by its next send time; its system prompt goes last."""
        system = len(self.sessions[turn["session_id"]].system)
        next_sent = self.sent.get((turn["session_id"], turn["turn"] + 1), float("inf"))
        rank = -sys.maxsize if next_sent == float("inf") else -round(next_sent * 1e6)
        node = self.cache.tree_core.node_by_id(last_node)
        while node.parent is not None:
            node.priority = sys.maxsize if depth - len(node.key) < system else rank
            depth -= len(node.key)
            node = node.parent


def served(run: dict, hits: list[int]) -> int:
    """History tokens served: each resumed turn's history within its cached prefix."""
    turns = sorted(run["turns"], key=lambda t: t["sent_s"])
    return sum(min(h, t["history"]) for t, h in zip(turns, hits, strict=True) if t["turn"] > 0)


def replay_runs(result: dict, pool: int, policies: tuple[str, ...] = POLICIES) -> list[dict]:
    """Every run of a live comparison, replayed under each policy."""
    rows = []
    for config, runs in result["runs"].items():
        for repeat, run in enumerate(runs):
            row = {"timeline": config, "repeat": repeat, "live_served": run["summary"]["history_served"]}
            row["history_tokens"] = run["summary"]["history_tokens"]
            row["served"] = {p: served(run, TimelineReplay(run, pool, p).run()) for p in policies}
            rows.append(row)
    return rows


def markdown(rows: list[dict], policies: tuple[str, ...]) -> str:
    lines = [
        "| timeline (config, repeat) | served live | " + " | ".join(policies) + " | "
        + " | ".join(f"{p} / lru" for p in policies if p != "lru") + " |",
        "|---" * (2 + len(policies) + len(policies) - 1) + "|",
    ]  # fmt: skip
    for row in rows:
        got = row["served"]
        ratios = [f"{got[p] / got['lru']:.2f}x" for p in policies if p != "lru"]
        lines.append(
            f"| {row['timeline']} {row['repeat']} | {row['live_served']} | "
            + " | ".join(str(got[p]) for p in policies) + " | " + " | ".join(ratios) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("result", type=Path, help="a live agent-chat comparison's JSON (benchmarks.compare)")
    parser.add_argument("--pool-tokens", type=int, help="default: the comparison's pool")
    parser.add_argument("--name", help="results file stem (default: <result stem>-timelines)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    source = json.loads(args.result.read_text())
    pool = args.pool_tokens or source["pool_tokens"]
    started = time.time()
    rows = replay_runs(source, pool)
    stem = args.name or f"{args.result.stem}-timelines"
    command = "python -m benchmarks.timeline_replay " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_result(
        args.out_dir / f"{stem}.json",
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "source": {"file": str(args.result), "commit": source.get("commit"), "date": source.get("date")},
            "pool_tokens": pool,
            "duration_s": round(time.time() - started, 1),
            "rows": rows,
        },
    )
    header = (
        f"## {stem}\n\n{report['machine']}, commit {report['commit']}, {report['date']}\n\n`{command}`\n\n"
        f"History tokens served on each live run's timeline (source: `{args.result}`, commit "
        f"{source.get('commit')}), pool {pool} tokens; `next_arrival` knows every session's next send "
        "time.\n\n"
    )
    (args.out_dir / f"{stem}.md").write_text(header + markdown(rows, POLICIES) + "\n")
    print(header + markdown(rows, POLICIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
