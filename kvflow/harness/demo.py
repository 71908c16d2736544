"""The main job: serve a cyclic multi-agent workflow with kvflow and with LRU, compare hits.

``python -m kvflow.harness.demo`` starts ``kvflow.launch_server`` on the embedded
model twice, one after the other with identical pools (once with kvflow's
eviction, once with ``--radix-eviction-policy lru``), drives the same cyclic
workflow through ``/generate`` with kvflow hints, and prints how often each
agent's fixed prompt was found in the cache, next to the offline optimum.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import requests

from kvflow.harness.server_process import ServerProcess
from kvflow.model import BYTE_TOKENS


@dataclass
class Invocation:
    round_index: int
    agent_id: str
    fixed_len: int
    cached_tokens: int
    output_ids: list[int]
    latency: float
    cached_device: int | None = None  # split of cached_tokens by tier, when the server reports it

    @property
    def fixed_hit(self) -> bool:
        return self.cached_tokens >= self.fixed_len


def fixed_prompts(agents: int, fixed_len: int, seed: int = 0) -> list[list[int]]:
    """Deterministic, pairwise distinct fixed prompts (token ids of the embedded model)."""
    rng = random.Random(seed)
    return [[rng.randrange(BYTE_TOKENS) for _ in range(fixed_len)] for _ in range(agents)]


def cyclic_steps(agents: int, running: int) -> dict[str, int]:
    """Steps-to-execution in a cycle agent0 -> agent1 -> ... -> agent0 while ``running`` runs."""
    return {f"agent{j}": (j - running) % agents for j in range(agents)}


def run_cyclic_workflow(
    url: str,
    agents: int = 6,
    fixed_len: int = 200,
    dynamic_len: int = 8,
    output_len: int = 4,
    rounds: int = 5,
    workflow_id: str = "demo",
    seed: int = 0,
) -> list[Invocation]:
    """Run ``rounds`` rounds of the cycle; each invocation sends a new dynamic suffix."""
    prompts = fixed_prompts(agents, fixed_len, seed)
    rng = random.Random(seed + 1)
    invocations = []
    for round_index in range(rounds):
        for i in range(agents):
            dynamic = [rng.randrange(BYTE_TOKENS) for _ in range(dynamic_len)]
            body = {
                "input_ids": prompts[i] + dynamic,
                "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True},
                "kvflow": {
                    "workflow_id": workflow_id,
                    "agent_id": f"agent{i}",
                    "fixed_prefix_len": fixed_len,
                    "steps_to_execution": cyclic_steps(agents, i),
                },
            }
            started = time.monotonic()
            response = requests.post(f"{url}/generate", json=body, timeout=300)
            response.raise_for_status()
            out = response.json()
            details = out["meta_info"].get("cached_tokens_details") or {}
            invocations.append(
                Invocation(
                    round_index,
                    f"agent{i}",
                    fixed_len,
                    out["meta_info"]["cached_tokens"],
                    out["output_ids"],
                    time.monotonic() - started,
                    details.get("device"),
                )
            )
    return invocations


def hit_rate(invocations: list[Invocation], warmup_rounds: int = 1) -> float:
    """Fraction of post-warm-up invocations whose whole fixed prompt was cached."""
    measured = [inv for inv in invocations if inv.round_index >= warmup_rounds]
    return sum(inv.fixed_hit for inv in measured) / len(measured)


def optimum_hit_rate(agents: int, capacity_prompts: int) -> float:
    """Belady's hit rate for a cycle of ``agents`` fixed prompts with room for ``capacity_prompts``."""
    if capacity_prompts >= agents:
        return 1.0
    return max(capacity_prompts - 1, 0) / (agents - 1)


def pool_tokens(capacity_prompts: int, fixed_len: int, dynamic_len: int, output_len: int) -> int:
    """A KV pool holding ``capacity_prompts`` fixed prompts plus one request's varying part."""
    return capacity_prompts * fixed_len + 2 * (dynamic_len + output_len)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--fixed-len", type=int, default=200)
    parser.add_argument("--dynamic-len", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pool-prompts", type=int, default=4, help="fixed prompts the KV pool holds")
    args = parser.parse_args(argv)

    pool = pool_tokens(args.pool_prompts, args.fixed_len, args.dynamic_len, args.output_len)
    common = ["--max-total-tokens", str(pool), "--random-seed", "0"]
    results = {}
    for label, extra in (("kvflow", []), ("lru", ["--radix-eviction-policy", "lru"])):
        print(f"starting {label} server (pool {pool} tokens) ...", flush=True)
        with ServerProcess(common + extra) as server:
            invocations = run_cyclic_workflow(
                server.url, args.agents, args.fixed_len, args.dynamic_len, args.output_len, args.rounds
            )
            stats = requests.get(f"{server.url}/kvflow/stats", timeout=30).json()
        results[label] = (invocations, stats, server.startup_seconds)

    optimum = optimum_hit_rate(args.agents, args.pool_prompts)
    print(f"\ncyclic workflow: {args.agents} agents, fixed prompt {args.fixed_len} tokens, ", end="")
    print(f"pool for {args.pool_prompts} prompts, {args.rounds} rounds (first is warm-up)")
    print(f"{'policy':<8} {'fixed-prompt hit rate':>22} {'of optimum':>11} {'fixed tokens recomputed':>24}")
    for label, (invocations, stats, _) in results.items():
        rate = hit_rate(invocations)
        recomputed = stats["totals"]["fixed_tokens_recomputed"]
        print(f"{label:<8} {rate:>22.2f} {rate / optimum:>10.0%} {recomputed:>24}")
    print(f"{'optimum':<8} {optimum:>22.2f}")
    same = [a.output_ids for a in results["kvflow"][0]] == [b.output_ids for b in results["lru"][0]]
    print(f"greedy outputs identical across the two servers: {same}")


if __name__ == "__main__":
    main()
