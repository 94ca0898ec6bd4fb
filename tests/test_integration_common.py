"""What the engine integrations share (wqs.integrations.common, .vllm_ids): how an engine
config names the cluster, the per-process shared client, and the block-ID derivations
(which must never change silently: stored blocks would become unreachable). No engine
needed."""

from __future__ import annotations

import pytest

from tests.daemons import daemon_factory  # noqa: F401 (fixture import)
from wqs.errors import ConfigError
from wqs.integrations import common
from wqs.integrations.vllm_ids import (chain_ids, chain_namespace, layer_block_id,
                                       marker_block_id, marker_bytes, parse_marker, rank_tag)


def spec(values: dict, monkeypatch, env: dict | None = None):
    for k in (common.CONFIG_ENV, common.SERVERS_ENV):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return common.cluster_spec(values.get, "x.{key}")


def test_parse_servers():
    assert common.parse_servers("a:1, b:2,,") == ["a:1", "b:2"]
    assert common.parse_servers(["a:1", " b:2 "]) == ["a:1", "b:2"]
    assert common.parse_servers(None) == []
    with pytest.raises(ConfigError):
        common.parse_servers(7)


def test_cluster_spec_sources(monkeypatch, tmp_path):
    assert spec({"servers": "a:1,b:2", "timeout_s": 2}, monkeypatch) == \
        (None, ["a:1", "b:2"], {"timeout_s": 2})
    assert spec({"config": "/etc/wqs/client.yaml"}, monkeypatch)[0] == "/etc/wqs/client.yaml"
    assert spec({}, monkeypatch, {common.SERVERS_ENV: "c:3"})[1] == ["c:3"]
    assert spec({}, monkeypatch, {common.CONFIG_ENV: "/x.yaml"})[0] == "/x.yaml"
    with pytest.raises(ConfigError, match=r"x\.servers.*x\.config.*WQS_SERVERS"):
        spec({}, monkeypatch)


def test_one_shared_client_per_cluster_refcounted(daemon_factory, tmp_path):
    d = daemon_factory()
    a = common.acquire_client(None, [d.address], {"timeout_s": 1.0})
    b = common.acquire_client(None, [d.address], {"timeout_s": 1.0})
    c = common.acquire_client(None, [d.address], {"timeout_s": 2.0})
    assert a is b and a is not c
    path = tmp_path / "client.yaml"
    path.write_text(f"servers: [{d.address}]\nreplicas: 1\n")
    from_file = common.acquire_client(str(path), [], {})
    assert from_file.nodes == (d.address,) and from_file.put(1, b"x")
    common.release_client(a)
    assert a.put(2, b"still open")  # b holds it
    common.release_client(b)
    for cl in (c, from_file):
        common.release_client(cl)
    assert not common._clients


def test_derive_id_is_frozen_and_unambiguous():
    assert common.derive_id(b"d", "ab", "c") != common.derive_id(b"d", "a", "bc")
    assert common.derive_id(b"d", "x") == common.derive_id(b"d", b"x")
    # Known answers: these IDs address blocks already stored by deployed engines.
    assert common.derive_id(b"wqs/test\x00", "a", b"\x00\x01").hex() == \
        "62887bc88959bcb36c7aef49db298c4a"
    ns = chain_namespace("llama-3-8b", 16, "bfloat16", 1, 1)
    chain = chain_ids(list(range(32)), 16, ns)
    assert len(chain) == 2
    assert layer_block_id(chain[0], rank_tag(), "model.layers.0.self_attn.attn").hex() == \
        KNOWN_LAYER_ID
    assert marker_block_id(chain[1], rank_tag()).hex() == KNOWN_MARKER_ID


KNOWN_LAYER_ID = "9465661be79e73eef7cd7b946ef06857"
KNOWN_MARKER_ID = "d8badc3a1f66d49ec5ae1c69c6aed155"


def test_chain_namespace_fields_cannot_collide():
    base = dict(model_id="m", block_size=16, kv_dtype="bfloat16")
    assert chain_namespace(**base, cache_salt="a", namespace="b") != \
        chain_namespace(**base, cache_salt='a","b')
    assert chain_namespace(**base) != chain_namespace(**base, tp_size=2)
    assert chain_namespace(**base, lora="x") != chain_namespace(**base)
    assert chain_namespace(**base, mm_hashes=["img1"]) != chain_namespace(**base)


def test_marker_roundtrip():
    assert parse_marker(marker_bytes(32, 65536)) == (32, 65536)
    assert parse_marker(b"nope") is None
