"""bench.prefixtrace: the multi-turn trace, its simulators, and a replay through wqsd."""

from __future__ import annotations

import pytest

from bench.prefixtrace import (TraceParams, device_size_for, engine_stats, main, make_trace,
                               replay, simulate, trace_summary)
from bench.procs import Daemon
from wqs.engine import format as fmt

SMALL = TraceParams(conversations=80, seed=3)


def test_the_trace_is_a_function_of_its_parameters():
    a, b = make_trace(SMALL), make_trace(SMALL)
    assert a.requests == b.requests and a.chains == b.chains
    assert make_trace(TraceParams(conversations=80, seed=4)).chains != a.chains
    s = trace_summary(a)
    assert s["apps"] == 4 and all(300 <= t <= 3000 for t in s["system_prompt_tokens"])
    # Each turn looks up a prefix of its conversation's chain, longer every turn.
    last: dict[int, int] = {}
    for c, n, tokens in a.requests:
        assert n == tokens // SMALL.block_tokens and n >= last.get(c, 0)
        last[c] = n


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_min_is_prefix_closed_and_bounds_the_others(fraction):
    trace = make_trace(SMALL)
    cap = max(1, int(trace.distinct_blocks() * fraction))
    r = {p: simulate(trace, p, cap) for p in ("fifo", "lru", "min")}
    inf = simulate(trace, "inf", 0)
    assert r["min"].hits == r["min"].block_hits  # no cached block behind a missing parent
    assert r["fifo"].hit_rate <= r["min"].hit_rate and r["lru"].hit_rate <= r["min"].hit_rate
    assert r["min"].hit_rate <= inf.hit_rate
    assert simulate(trace, "lru", trace.distinct_blocks()).hit_rate == inf.hit_rate


def test_device_size_for_gives_the_regions_asked_for():
    size, regions = device_size_for(100, 32704, 1 << 20)
    assert fmt.compute_geometry(size, 1 << 20)[3] >= regions
    assert regions == -(-100 // 28) + 2  # 28 entries of 32 KiB in a 1 MiB region


def test_a_replay_through_a_daemon_counts_what_the_store_did(tmp_path):
    trace = make_trace(SMALL)
    from wqs.client import Client
    from wqs.rpc.control import ControlClient

    from bench.usage import control_address

    size, _ = device_size_for(trace.distinct_blocks() // 5, 32704, 1 << 20)
    daemon = Daemon(str(tmp_path / "d"), device_size=str(size), workers=1,
                    engine={"region_size": "1M"})
    try:
        with ControlClient(control_address(daemon.address)) as control, \
                Client([daemon.address]) as client:
            res = replay(trace, client, 32704, stats=lambda: engine_stats(control),
                         sample_every=20)
    finally:
        daemon.stop()
    assert res.lookups == trace.lookups and res.failed_puts == 0
    assert res.hits + res.stored + res.lost_hits >= res.lookups  # every block: hit or put
    assert res.delta("evicted_regions") > 0 and 0 < res.capacity_blocks < trace.distinct_blocks()
    fifo = simulate(trace, "fifo", res.capacity_blocks).hit_rate
    assert res.hit_rate > fifo - 0.05
    assert 1.0 <= res.write_amplification < 1.35
    assert res.tokens_avoided == res.hits * SMALL.block_tokens


def test_the_cli_simulates_without_daemons(capsys):
    assert main(["--conversations", "40", "--fractions", "0.1", "--evictions", ""]) == 0
    out = capsys.readouterr().out
    assert "MIN sim" in out and "| 0." in out
