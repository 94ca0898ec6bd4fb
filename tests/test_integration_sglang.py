"""The SGLang HiCache storage backend against the real `sglang` package and real daemons.

Everything runs on the CPU, through SGLang's own objects (tests/sglang_proc.py): its
device and host KV pools, its HiCacheController attaching the backend through
``StorageBackendFactory`` from the documented extra config, and the controller's own
write-back, hit-query and prefetch loops. Skipped, with the reason, where `sglang` is not
installed: it runs in its own venv, see wqs/integrations/README.md.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("sglang", reason="sglang (with torch) is not installed here; these tests "
                    "run in .venv-sglang: see wqs/integrations/README.md")
torch = pytest.importorskip("torch")

from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import (  # noqa: E402
    HybridCacheController)
from sglang.srt.server_args import ServerArgs  # noqa: E402

import wqs  # noqa: E402
from tests.daemons import ROOT, daemon_factory  # noqa: E402,F401 (fixture import)
from tests.sglang_proc import PAGE, HiCacheNode, extra_config  # noqa: E402
from wqs.errors import ConfigError  # noqa: E402
from wqs.integrations.sglang import WQSHiCacheStorage  # noqa: E402

LOGGER = "wqs.integrations.sglang"


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def nodes():
    """make(config, **HiCacheNode kwargs) -> a HiCacheNode; all detached after."""
    made: list[HiCacheNode] = []

    def make(config: dict, **kw) -> HiCacheNode:
        node = HiCacheNode(config, **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def test_sglang_loads_it_from_the_documented_flags(daemon_factory, nodes):
    """The launch flags of wqs/integrations/README.md, parsed by SGLang's own argument
    parser and extra-config reader, make SGLang's controller build this backend through
    StorageBackendFactory and pick its zero-copy page calls."""
    d = daemon_factory()
    flags = ["--model-path", "tiny", "--page-size", str(PAGE), "--enable-hierarchical-cache",
             "--hicache-mem-layout", "page_first", "--hicache-storage-backend", "dynamic",
             "--hicache-storage-backend-extra-config", json.dumps({
                 "backend_name": "wqs", "module_path": "wqs.integrations.sglang",
                 "class_name": "WQSHiCacheStorage", "interface_v1": 1,
                 "servers": d.address, "namespace": "flags", "prefetch_threshold": 64})]
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(flags)
    assert args.hicache_storage_backend == "dynamic"
    config, threshold, *_ = HybridCacheController.parse_storage_backend_extra_config(
        args.hicache_storage_backend_extra_config)
    assert threshold == 64 and "prefetch_threshold" not in config  # SGLang's own knob
    node = nodes(config, layout=args.hicache_mem_layout)
    assert isinstance(node.backend, WQSHiCacheStorage)
    assert node.controller.page_get_func == node.controller._page_get_zero_copy
    assert node.controller.page_set_func == node.controller._page_set_zero_copy
    assert node.backend.shard == "tiny-llama/tp0of1"
    assert node.store(3, seed=5) == 3
    assert nodes(config).load(3, seed=5) == {"found_pages": 3, "loaded_pages": 3,
                                             "exact": True}


def test_it_refuses_what_it_cannot_serve(daemon_factory, nodes, monkeypatch, caplog):
    """Errors at attach (the server does not start), naming the key: no interface_v1 (the
    older value-passing calls would copy every page), no cluster named, hybrid models'
    extra host pools. clear() is refused with a warning (no page catalogue)."""
    d = daemon_factory()
    config = extra_config([d.address])
    with pytest.raises(ConfigError, match="interface_v1"):
        nodes({k: v for k, v in config.items() if k != "interface_v1"})
    monkeypatch.delenv("WQS_SERVERS", raising=False)
    monkeypatch.delenv("WQS_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="--hicache-storage-backend-extra-config key 'servers'"):
        nodes({k: v for k, v in config.items() if k != "servers"})

    node = nodes(config)
    node.backend.register_mem_host_pool_v2(node.host, "kv")
    node.backend.on_host_pools_registered()  # the KV pool alone is fine
    node.backend.register_mem_host_pool_v2(node.host, "mamba")
    with pytest.raises(ConfigError, match=r"host pools \['mamba'\].*not supported"):
        node.backend.on_host_pools_registered()
    with pytest.raises(NotImplementedError, match="interface_v1"):
        node.backend.get("k")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert node.backend.clear() is False
    assert "clear is not supported" in caplog.text


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", ["page_first", "layer_first", "page_first_direct"])
def test_pages_round_trip_bit_exact_in_every_layout(daemon_factory, nodes, layout, mla):
    """SGLang writes 20 pages back; a node with an empty host pool finds all 20 in one
    lookup and prefetches them bit-exact. Each piece the pool names is one block holding
    exactly the pool's bytes."""
    d = daemon_factory()
    config = extra_config([d.address], namespace=f"rt-{layout}-{mla}")
    writer = nodes(config, layout=layout, mla=mla)
    assert writer.store(20, seed=1) == 20

    reader = nodes(config, layout=layout, mla=mla)
    before = d.request_counts()
    op = reader.ask(20, seed=1)
    assert d.request_counts()["lookup_prefix"] - before["lookup_prefix"] == 1
    assert op.storage_hit_count == 20 * PAGE
    assert reader.prefetch(op) == 20 and reader.exact(op, 20, seed=1)
    assert reader.backend.stats["pages_read"] == 20

    # The blocks: pieces per page as the pool lays them out, each the pool's own bytes.
    pieces = reader.backend.pages.pieces
    assert pieces == {("page_first", False): 2, ("layer_first", False): 8,
                      ("page_first_direct", False): 2, ("page_first", True): 1,
                      ("layer_first", True): 4, ("page_first_direct", True): 1}[layout, mla]
    page0 = reader.backend.pages.views(op.host_indices[:PAGE], 1)
    with wqs.Client([d.address]) as client:
        got = client.get_many(reader.backend.block_ids(op.hash_value[:1]))
    assert [bytes(g) for g in got] == [bytes(v) for v in page0]

    other = nodes(config, layout=layout, mla=mla)
    assert other.load(20, seed=2) == {"found_pages": 0, "loaded_pages": 0, "exact": True}


def test_layouts_ranks_and_namespaces_keep_apart(daemon_factory, nodes):
    """Block IDs carry what makes bytes differ: a layer_first pool does not read a
    page_first pool's pages (same values, another order); MHA pages are per TP rank, MLA
    pages are one copy every rank reads (SGLang's other backends key them the same way);
    namespaces separate deployments."""
    d = daemon_factory()
    servers = [d.address]
    config = extra_config(servers, namespace="apart")
    assert nodes(config, layout="page_first").store(6, seed=1) == 6
    assert nodes(config, layout="layer_first").load(6, seed=1)["found_pages"] == 0
    assert nodes(extra_config(servers, namespace="other")).load(6, seed=1)["found_pages"] == 0

    assert nodes(config, tp_rank=0, tp_size=2).store(6, seed=2) == 6
    assert nodes(config, tp_rank=1, tp_size=2).load(6, seed=2)["found_pages"] == 0
    assert nodes(config, tp_rank=0, tp_size=2).load(6, seed=2) == {
        "found_pages": 6, "loaded_pages": 6, "exact": True}

    writer = nodes(config, mla=True, tp_rank=0, tp_size=2)
    assert writer.backend.shard == "tiny-llama"
    assert writer.store(6, seed=3) == 6
    assert nodes(config, mla=True, tp_rank=1, tp_size=2).load(6, seed=3) == {
        "found_pages": 6, "loaded_pages": 6, "exact": True}


def test_a_page_evicted_after_the_lookup_is_a_shorter_hit(daemon_factory, nodes):
    """The lookup finds 12 pages; one piece of page 7 is gone before the read (evicted):
    SGLang's prefetch counts 7 pages loaded, those bit-exact, and nothing raises."""
    d = daemon_factory()
    config = extra_config([d.address], namespace="evict")
    assert nodes(config).store(12, seed=4) == 12
    reader = nodes(config)
    op = reader.ask(12, seed=4)
    assert op.storage_hit_count == 12 * PAGE
    with wqs.Client([d.address]) as client:
        v_piece_of_page_7 = reader.backend.block_ids([op.hash_value[7]])[1]
        assert client.delete(v_piece_of_page_7)
    assert reader.prefetch(op) == 7
    assert reader.exact(op, 7, seed=4)
    # One get_many read the whole batch: pages 8-11 arrived too, SGLang keeps the run before 7.
    assert reader.backend.stats["pages_missed"] == 1


def test_a_store_that_is_down_is_misses_and_dropped_writes(daemon_factory, nodes, caplog):
    """Killed: lookups find nothing, prefetches load nothing, write-backs are dropped
    with a warning -- no exception reaches SGLang. Frozen: the same within timeout_s.
    Restarted: what was stored before the kill is found and read bit-exact again, and
    writes are taken again."""
    d = daemon_factory()
    config = extra_config([d.address], namespace="down")
    assert nodes(config).store(8, seed=1) == 8
    node = nodes(config)
    queried = node.ask(8, seed=1)
    assert queried.storage_hit_count == 8 * PAGE

    d.kill()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert node.ask(8, seed=1).storage_hit_count == 0
        assert node.prefetch(queried) == 0
        assert node.store(4, seed=2) == 0
    assert "could not store 4 of 4 pages (NodeDown); dropped" in caplog.text
    assert "WQS get: 8 of 8 pages not read (NodeDown)" in caplog.text
    assert node.backend.stats["pages_dropped"] == 4

    d.start()  # the client tries a failed node again after its retry interval (1 s)
    wait_until(lambda: node.ask(8, seed=1).storage_hit_count == 8 * PAGE)
    assert node.load(8, seed=1) == {"found_pages": 8, "loaded_pages": 8, "exact": True}
    assert node.store(4, seed=2) == 4

    d.signal_all(signal.SIGSTOP)
    try:
        assert node.ask(8, seed=1).storage_hit_count == 0
        assert node.store(2, seed=3) == 0
    finally:
        d.signal_all(signal.SIGCONT)
    wait_until(lambda: node.ask(4, seed=2).storage_hit_count == 4 * PAGE)
    assert nodes(config).load(4, seed=2) == {"found_pages": 4, "loaded_pages": 4,
                                             "exact": True}


class HiCacheProcess:
    """`python -m tests.sglang_proc`: an SGLang HiCache node in a process of its own."""

    def __init__(self, name: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.sglang_proc"], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("@@ "):
                self.answers.put(json.loads(line[3:]))
        self.answers.put(None)  # exited

    def ask(self, timeout: float = 180.0, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self.answers.get(timeout=timeout)
        assert answer is not None, f"{self.name} exited:\n{''.join(self.lines)[-4000:]}"
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            assert self.proc.wait(60) == 0, "".join(self.lines)[-4000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.slow
def test_a_second_process_reads_what_the_first_wrote(daemon_factory):
    """One process writes 24 pages back through SGLang's HiCache; another, whose host
    pool is empty, finds every page and prefetches it bit-exact -- in both layouts that
    matter for storage, over two daemons."""
    servers = [daemon_factory().address, daemon_factory().address]
    # Started together: each spends ~15 s importing SGLang and torch.
    writer, reader = HiCacheProcess("writer"), HiCacheProcess("reader")
    try:
        for seed, layout in enumerate(("page_first", "layer_first"), start=1):
            cmd = {"servers": servers, "layout": layout, "pages": 24, "seed": seed}
            assert writer.ask(op="store", **cmd) == {"stored_pages": 24}
            assert reader.ask(op="load", **cmd) == {"found_pages": 24, "loaded_pages": 24,
                                                    "exact": True}
        writer.close()
        reader.close()
    finally:
        for p in (writer, reader):
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
