"""The emulated host link of the CPU host tier (``kvflow.patches.link_emulation``).

Unit tests of the link, its events and the hooks (no server), then one real CPU
server with a slow emulated link: a request that arrives while its agent's
fixed prompt is being prefetched is held, then served with the loaded KV.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from kvflow.patches.link_emulation import EmulatedLink, LinkEvent, layer_events
from sglang.srt.managers.cache_controller import HiCacheAck, LayerDoneCounter
from sglang.srt.mem_cache.l2_transfer import L2Transfer, TransferCompletion
from sglang.srt.plugins.hook_registry import HookRegistry

from kvflow import patches
from kvflow.config import CONFIG_ENV
from kvflow.harness.demo import cyclic_steps, fixed_prompts
from kvflow.harness.server_process import ServerProcess
from kvflow.model import BYTE_TOKENS, EMBEDDED_MODEL_PATH

link_emulation = patches.link_emulation

# --- the link, its events and the hooks (no server) ---------------------------------------------------


def test_transfers_queue_behind_each_other_on_the_link():
    link = EmulatedLink(0.001)  # 1 MB/s
    assert link.book(500_000, issued=10.0) == pytest.approx((10.0, 10.5))
    assert link.book(250_000, issued=10.2) == pytest.approx((10.5, 10.75))  # waits for the first
    assert link.book(1_000, issued=20.0) == pytest.approx((20.0, 20.001))  # the link was idle


def test_event_is_pending_until_its_deadline_and_synchronize_sleeps_until_then():
    event = LinkEvent(time.monotonic() + 0.3)
    event.record()  # recording does not move the deadline
    assert not event.query()
    started = time.monotonic()
    event.synchronize()
    assert time.monotonic() - started >= 0.25 and event.query()
    started = time.monotonic()
    LinkEvent(0.0).synchronize()
    assert LinkEvent(0.0).query() and time.monotonic() - started < 0.05


def test_a_load_lands_layer_by_layer():
    deadlines = [event.deadline for event in layer_events(1.0, 2.0, 4)]
    assert deadlines == pytest.approx([1.25, 1.5, 1.75, 2.0])


def host_pool(layout="layer_first", size_per_token=1000):
    return SimpleNamespace(_transfer_device=torch.device("cpu"), layout=layout, size_per_token=size_per_token)


def transfer(tokens: int, pool=None) -> L2Transfer:
    indices = torch.arange(tokens)
    return L2Transfer(
        host_pool=pool or host_pool(), device_pool=None, host_indices=indices, device_indices=indices
    )


def stock_submit(engine, transfers, **kwargs):
    """Stand-in for ``L2TransferEngine.submit_*``: the copy is done on return, as on CPU."""
    engine.calls.append(kwargs)
    return TransferCompletion(torch.cpu.Event(), torch.cpu.Event(), False)


def test_a_transfer_completes_after_its_bytes_crossed_the_link_behind_the_previous_one():
    link = EmulatedLink(0.001)  # 1 MB/s
    engine = SimpleNamespace(io_backend="direct", calls=[])
    issued = time.monotonic()
    first = link_emulation._delay_transfer(link, stock_submit, engine, [transfer(100)])  # 100 KB: 0.1 s
    second = link_emulation._delay_transfer(
        link, stock_submit, engine, [transfer(50), transfer(50)], transfer_layer_id_max=4, on_layer_done=print
    )
    assert engine.calls == [{}, {"transfer_layer_id_max": 4, "on_layer_done": print}]  # passed through
    assert first.finish_event.deadline == pytest.approx(issued + 0.1, abs=0.02)
    assert second.start_event.deadline == first.finish_event.deadline
    assert second.finish_event.deadline == pytest.approx(first.finish_event.deadline + 0.1)
    assert not first.finish_event.query() and not second.finish_event.query()
    second.finish_event.synchronize()
    assert first.finish_event.query() and time.monotonic() - issued >= 0.19


def test_transfers_off_the_cpu_direct_path_are_not_delayed():
    link = EmulatedLink(0.001)
    for engine, pool in (
        (SimpleNamespace(io_backend="kernel", calls=[]), host_pool()),
        (SimpleNamespace(io_backend="direct", calls=[]), host_pool(layout="page_first_direct")),
    ):
        completion = link_emulation._delay_transfer(link, stock_submit, engine, [transfer(100, pool)])
        assert isinstance(completion.finish_event, torch.cpu.Event)
    assert link.free_at == 0.0


def fake_controller(link: EmulatedLink, layers: int = 4) -> SimpleNamespace:
    """The parts of ``HiCacheController`` that ``start_loading`` touches, with SGLang's real counter."""
    return SimpleNamespace(
        layer_done_counter=LayerDoneCounter(layers), load_queue=[], ack_load_queue=[], link=link
    )


def stock_start_loading(controller):
    """``HiCacheController.start_loading`` in short: real producer rotation, one booked load per call."""
    if not controller.load_queue:
        return -1
    producer_id = controller.layer_done_counter.update_producer()  # asserts the slot's last load finished
    tokens = controller.load_queue.pop()
    completion = link_emulation._delay_transfer(
        controller.link, stock_submit, SimpleNamespace(io_backend="direct", calls=[]), [transfer(tokens)]
    )
    controller.ack_load_queue.append(HiCacheAck(completion.start_event, completion.finish_event, [1]))
    return producer_id


def test_the_forward_waits_for_each_layer_and_a_busy_producer_slot_waits_for_its_load():
    controller = fake_controller(EmulatedLink(0.001))  # 1 MB/s
    counter = controller.layer_done_counter
    controller.load_queue.append(400)  # 400 KB: 0.4 s, 0.1 s per layer
    producer = link_emulation._spread_load_over_layers(stock_start_loading, controller)
    layer_event = counter.events[producer]
    first_finish = layer_event.finish_event
    ack = controller.ack_load_queue[0]
    assert first_finish.deadline == ack.finish_event.deadline
    assert [e.deadline - ack.start_event.deadline for e in layer_event.load_events] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4]
    )
    # The forward pass reading layer 1 (SGLang's LayerLoadingEvent.wait) waits for that layer only.
    link_emulation._wait_for_layer(type(layer_event).wait, layer_event, 1)
    assert layer_event.load_events[1].query() and not first_finish.query()
    # Two more loads fill the three producer slots; a fourth reuses the first slot, so it waits for
    # the first load's finish (SGLang's update_producer asserts it) instead of failing.
    for _ in range(3):
        controller.load_queue.append(10)
        link_emulation._spread_load_over_layers(stock_start_loading, controller)
    assert first_finish.query() and len(controller.ack_load_queue) == 4
    assert layer_event.finish_event.deadline == controller.ack_load_queue[3].finish_event.deadline


def test_the_hooks_are_registered_only_when_the_link_is_emulated(monkeypatch):
    registered = []
    monkeypatch.setattr(HookRegistry, "register", lambda target, *args, **kw: registered.append(target))
    own_targets = set(link_emulation.TARGETS[:4])  # hooked by no other patch
    for gbps, expected in ((0.0, False), (0.5, True)):
        registered.clear()
        monkeypatch.setattr(patches, "_active", [])
        monkeypatch.setenv(CONFIG_ENV, json.dumps({"emulate_link_gbps": gbps}))
        patches.register_hooks()
        assert ("link_emulation" in patches.active_patches()) is expected
        assert own_targets & set(registered) == (own_targets if expected else set())


# --- a real server with a slow emulated link ----------------------------------------------------------

AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS = 4, 200, 8, 4, 3
# Room for two fixed prompts (the running agent's and the next one's), not three: every agent's
# prompt is demoted to the host tier before its turn comes again.
POOL = 2 * FIXED + 100
MODEL = json.loads((Path(EMBEDDED_MODEL_PATH) / "config.json").read_text())
KV_BYTES_PER_TOKEN = 2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"] * MODEL["head_dim"] * 4
GBPS = 0.0008  # 0.8 MB/s: one fixed prompt (200 tokens, 800 KiB) takes about 1 s on the link
FIXED_LOAD_SECONDS = FIXED * KV_BYTES_PER_TOKEN / (GBPS * 1e9)
ARGS = [
    "--max-total-tokens", str(POOL), "--random-seed", "0", "--enable-hierarchical-cache",
    "--hicache-ratio", "5", "--enable-cache-report", "--kvflow-emulate-link-gbps", str(GBPS),
]  # fmt: skip


def generate(url: str, input_ids: list[int], hint: dict | None) -> dict:
    body = {
        "input_ids": input_ids,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True},
    }
    if hint is not None:
        body["kvflow"] = hint
    started = time.monotonic()
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    out = response.json()
    return {
        "seconds": time.monotonic() - started,
        "output_ids": out["output_ids"],
        "logprobs": [entry[0] for entry in out["meta_info"]["output_token_logprobs"]],
        "cached": out["meta_info"]["cached_tokens"],
        "details": out["meta_info"].get("cached_tokens_details") or {},
    }


@pytest.fixture(scope="module")
def emulated_run():
    """A cyclic workflow repeating each agent's round-0 prompt every round, then one un-hinted load."""
    prompts = fixed_prompts(AGENTS, FIXED)
    rng = random.Random(1)
    inputs = [p + [rng.randrange(BYTE_TOKENS) for _ in range(DYNAMIC)] for p in prompts]
    with ServerProcess(ARGS) as server:
        print(f"server with an emulated link ready in {server.startup_seconds:.1f}s")
        runs = []
        for round_index in range(ROUNDS):
            for i in range(AGENTS):
                hint = {
                    "workflow_id": "emulated",
                    "agent_id": f"agent{i}",
                    "fixed_prefix_len": FIXED,
                    "steps_to_execution": cyclic_steps(AGENTS, i),
                }
                runs.append((round_index, i, generate(server.url, inputs[i], hint)))
        # agent1's prompt is on the host only now (agent3 ran last, agent0's is prefetched): an
        # un-hinted request through it loads it on demand, and its forward pass waits for the load.
        on_demand = generate(server.url, prompts[1] + [7] * DYNAMIC, None)
        time.sleep(3)  # idle: the scheduler checks its exact token accounting (strict) and would crash
        healthy = requests.get(f"{server.url}/health", timeout=30).status_code == 200
        stats = requests.get(f"{server.url}/kvflow/stats", timeout=30).json()
        log = server.log_path.read_text(errors="replace")
        alive = server.process.poll() is None
    return runs, on_demand, stats, log, healthy and alive


@pytest.mark.e2e
def test_a_request_waiting_for_its_prefetch_is_held_then_served_with_the_loaded_kv(emulated_run):
    runs, on_demand, stats, log, healthy = emulated_run
    reference = {i: run for round_index, i, run in runs if round_index == 0}
    measured = [(i, run) for round_index, i, run in runs if round_index >= 1]
    prefetch = stats["prefetch"]
    print(
        f"load of one fixed prompt {FIXED_LOAD_SECONDS:.2f}s; prefetch {prefetch}; latencies "
        f"{[round(run['seconds'], 2) for _, run in measured]}; on demand {on_demand['seconds']:.2f}s "
        f"{on_demand['details']}"
    )
    assert stats["link_emulation_gbps"] == GBPS and "link_emulation" in stats["patches_active"]
    assert f"EMULATED at {GBPS:g} GB/s" in log
    # Requests arrived while their agent's prefetch was on the link: held, then counted late.
    assert prefetch["held"] >= 1 and prefetch["late"] >= 1 and prefetch["issued"] >= len(measured)
    assert max(run["seconds"] for _, run in measured) >= 0.5 * FIXED_LOAD_SECONDS
    for round_index, i, run in runs:
        if round_index == 0:
            continue
        # Nothing recomputed. From round 2 on, served with the prefetched KV: the whole fixed prompt
        # from the device. (Round 1's first request can arrive before its prefetch found room: in
        # this two-prompt pool the warm-up round's last request is still waiting to prefill, and
        # the room it needs is not the prefetch's to take.)
        assert run["cached"] >= FIXED
        if round_index >= 2:
            assert run["details"]["device"] >= FIXED
        assert run["output_ids"] == reference[i]["output_ids"]  # round 0 computed it from scratch
        assert max(abs(a - b) for a, b in zip(run["logprobs"], reference[i]["logprobs"], strict=True)) <= 1e-5
    assert stats["totals"]["fixed_tokens_recomputed"] == AGENTS * FIXED  # the warm-up round only
    assert healthy and "memory leak detected" not in log


@pytest.mark.e2e
def test_a_batch_consuming_an_on_demand_load_waits_for_the_emulated_link(emulated_run):
    _, on_demand, _, _, healthy = emulated_run
    assert on_demand["details"]["host"] >= FIXED
    assert on_demand["seconds"] >= 0.9 * FIXED_LOAD_SECONDS
    assert healthy
