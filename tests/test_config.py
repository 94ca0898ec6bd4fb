import dataclasses
import socket
from pathlib import Path

import pytest
import yaml

from wqs.config import (
    ClientConfig,
    DaemonConfig,
    EngineConfig,
    EtcdConfig,
    GiB,
    MiB,
    format_hostport,
    load_client_config,
    load_daemon_config,
    parse_hostport,
    parse_size,
)
from wqs.errors import ConfigError, WQSError

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "wqsd.yaml"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------- sizes and addresses


@pytest.mark.parametrize(
    "text, n",
    [
        (4096, 4096),
        ("4096", 4096),
        ("16MiB", 16 * MiB),
        ("256M", 256 * MiB),
        ("1G", GiB),
        ("64k", 65536),
        ("64K", 65536),
        ("64KB", 65536),
        ("64 KiB", 65536),
        ("2gib", 2 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("1T", 1 << 40),
        ("10B", 10),
        ("0", 0),
        (1e9, 10**9),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "bad", ["", "abc", "-1", -1, "1X", "16iB", "0.1k", "1.2.3M", True, None, 1.5]
)
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    "text, hp",
    [
        ("127.0.0.1:7070", ("127.0.0.1", 7070)),
        ("node-1.example.com:1", ("node-1.example.com", 1)),
        ("[::1]:7070", ("::1", 7070)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ],
)
def test_parse_hostport(text, hp):
    assert parse_hostport(text) == hp
    assert format_hostport(*hp) == text


@pytest.mark.parametrize(
    "bad",
    ["7070", "host", "host:0", "host:65536", "host:x", ":7070", "::1:7070", "[::1]7070", "[zz]:1"],
)
def test_parse_hostport_rejects(bad):
    with pytest.raises(ValueError):
        parse_hostport(bad)


# ---------------------------------------------------------------- daemon config


def test_defaults_and_derived_ports():
    cfg = load_daemon_config(None)
    assert cfg.listen == "127.0.0.1:7070"
    assert cfg.control_listen == "127.0.0.1:7071"
    assert cfg.metrics_listen == "127.0.0.1:7072"
    assert cfg.device == "/var/lib/wqs/wqs.dev"
    assert cfg.node_id == f"{socket.gethostname()}:7070"
    assert cfg.engine == EngineConfig() and cfg.engine.region_size == 16 * MiB
    assert cfg.etcd is None and cfg.auth_token is None
    assert cfg.listen_addr == ("127.0.0.1", 7070) and cfg.control_addr == ("127.0.0.1", 7071)


def test_derived_defaults_follow_listen(tmp_path):
    cfg = load_daemon_config(write(tmp_path, "listen: '[::]:9000'\ndata_dir: /srv/wqs\n"))
    assert cfg.control_listen == "[::]:9001" and cfg.metrics_addr == ("::", 9002)
    assert cfg.device == "/srv/wqs/wqs.dev" and cfg.node_id.endswith(":9000")


@pytest.mark.parametrize("off", ["off", "", None, "OFF"])
def test_metrics_can_be_disabled(off):
    cfg = load_daemon_config(None, {"metrics_listen": off} if off is not None else {})
    if off is None:  # None in overrides means "not given"
        assert cfg.metrics_listen == "127.0.0.1:7072"
    else:
        assert cfg.metrics_listen is None and cfg.metrics_addr is None


def test_yaml_bare_off_disables_metrics(tmp_path):
    # YAML 1.1 reads an unquoted `off` as false.
    assert load_daemon_config(write(tmp_path, "metrics_listen: off\n")).metrics_listen is None
    assert load_daemon_config(write(tmp_path, "metrics_listen:\n")).metrics_listen is None


def test_round_trip(tmp_path):
    text = """
listen: 0.0.0.0:7100
control_listen: 0.0.0.0:7200
metrics_listen: 127.0.0.1:9100
data_dir: /srv/wqs
device: /dev/nvme0n1
device_size: 4GiB
auth_token: s3cret
node_id: storage-1
log_level: DEBUG
workers: 32
max_connections: 4096
etcd:
  endpoints: [http://10.0.0.1:2379, "10.0.0.2:2379"]
  prefix: /kv/nodes
  lease_ttl: 5
engine:
  region_size: 8MiB
  max_block_size: 1MiB
  dram_cache_bytes: 0
  dram_policy: lru
  eviction: lru
  reinsert_hits: false
  sync: true
  io_engine: threads
  io_threads: 4
"""
    cfg = load_daemon_config(write(tmp_path, text))
    assert cfg.log_level == "debug" and cfg.device_size == 4 * GiB
    assert cfg.etcd == EtcdConfig(["http://10.0.0.1:2379", "10.0.0.2:2379"], "/kv/nodes/", 5)
    assert cfg.engine == EngineConfig(8 * MiB, MiB, 0, "lru", "lru", False, True, "threads", 4)
    dumped = write(tmp_path, yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_daemon_config(dumped) == cfg
    assert "s3cret" not in repr(cfg)  # configs get logged; the token must not be


def test_example_config_lists_every_key_with_its_default():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(DaemonConfig)}
    assert set(data["engine"]) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert load_daemon_config(str(EXAMPLE)) == DaemonConfig()
    # The commented-out etcd section is valid too.
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# etcd:")
    block = [ln.removeprefix("# ") for ln in lines[start:] if ln.startswith(("# etcd:", "#   "))]
    assert len(block) == 4
    assert EtcdConfig(**yaml.safe_load("\n".join(block))["etcd"]) == EtcdConfig()


def test_overrides_win_and_accept_strings(tmp_path):
    path = write(tmp_path, "workers: 4\nengine:\n  io_threads: 2\n  sync: true\n")
    cfg = load_daemon_config(
        path,
        {"workers": "8", "engine.region_size": "32MiB", "engine.sync": "false", "log_level": None},
    )
    assert cfg.workers == 8 and cfg.engine.region_size == 32 * MiB
    assert cfg.engine.io_threads == 2 and cfg.engine.sync is False
    cfg = load_daemon_config(None, {"etcd.endpoints": "a:1,b:2"})
    assert cfg.etcd.endpoints == ["a:1", "b:2"] and cfg.etcd.prefix == "/wqs/nodes/"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"engine.region_size": 1000}, "engine.region_size: must be a multiple of 4096, got 1000"),
        ({"engine.region_size": "512k"}, "engine.region_size: must be at least 1 MiB"),
        ({"engine.region_size": "16 furlongs"}, "engine.region_size: expected a size"),
        ({"engine.max_block_size": 0}, "engine.max_block_size: must be at least 1 bytes"),
        ({"engine.max_block_size": "2GiB"}, "engine.max_block_size: must be at most 1 GiB"),
        ({"engine.dram_cache_bytes": -1}, "engine.dram_cache_bytes:"),
        ({"engine.dram_policy": "arc"}, "engine.dram_policy: must be one of s3fifo, lru"),
        ({"engine.eviction": "random"}, "engine.eviction: must be one of fifo, lru, block-lru"),
        ({"engine.reinsert_hits": "maybe"}, "engine.reinsert_hits: must be true or false"),
        ({"engine.max_pin_s": 0}, "engine.max_pin_s: must be greater than 0"),
        ({"engine.max_pinned_share": 0.9}, "engine.max_pinned_share: must be at most 0.5"),
        ({"engine.sync": 1}, "engine.sync: must be true or false"),
        ({"engine.io_threads": 0}, "engine.io_threads: must be in 1..1024"),
        ({"engine.io_engine": "uring"}, "engine.io_engine: must be one of auto, aio, threads"),
        ({"listen": "localhost"}, "listen: expected host:port"),
        ({"listen": "0.0.0.0:70000"}, "listen: port must be 1..65535"),
        ({"listen": "127.0.0.1:65535"}, "control_listen: the default, data port + 1"),
        ({"control_listen": "127.0.0.1:7070"}, "control_listen: must use another port"),
        ({"metrics_listen": "x:7071"}, "metrics_listen: must use another port"),
        ({"metrics_listen": True}, "metrics_listen: expected host:port"),
        ({"device_size": "1000"}, "device_size: must be a multiple of 4096"),
        ({"data_dir": ""}, "data_dir: must be a non-empty string"),
        ({"log_level": "loud"}, "log_level: must be one of debug, info"),
        ({"workers": 2.5}, "workers: must be an integer"),
        ({"workers": True}, "workers: must be an integer"),
        ({"max_connections": 0}, "max_connections: must be in"),
        ({"node_id": 7}, "node_id: must be a non-empty string"),
        ({"engine": 5}, "engine: must be a mapping"),
        ({"etcd": "x"}, "etcd: must be a mapping"),
        ({"etcd.endpoints": []}, "etcd.endpoints: needs at least one endpoint"),
        ({"etcd.endpoints": ["nohost"]}, "etcd.endpoints[0]: expected host:port"),
        ({"etcd.endpoints": ["ftp://a:1"]}, "etcd.endpoints[0]: scheme must be http or https"),
        ({"etcd.prefix": "wqs"}, "etcd.prefix: must start with '/'"),
        ({"etcd.lease_ttl": 0}, "etcd.lease_ttl: must be in 2..3600"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_daemon_config(None, overrides)
    assert str(exc.value).startswith(message), str(exc.value)
    assert isinstance(exc.value, WQSError)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lisen: 1.2.3.4:1\n", "lisen: unknown key (did you mean 'listen'?)"),
        ("engine:\n  regoin_size: 1\n", "engine.regoin_size: unknown key (did you mean 'region_"),
        ("etcd:\n  lease: 3\n", "etcd.lease: unknown key (did you mean 'lease_ttl'?)"),
        ("zzz: 1\n", "zzz: unknown key; known: listen, control_listen"),
    ],
)
def test_unknown_keys_hint(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_daemon_config(write(tmp_path, text))
    assert str(exc.value).startswith(message), str(exc.value)


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_daemon_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_daemon_config(write(tmp_path, "listen: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_daemon_config(write(tmp_path, "- a\n- b\n"))
    assert load_daemon_config(write(tmp_path, "")) == DaemonConfig()
    with pytest.raises(ConfigError, match="engine: must be a mapping to set engine.sync"):
        load_daemon_config(write(tmp_path, "engine: 3\n"), {"engine.sync": True})


def test_auth_token_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("  abc123\n")
    cfg = load_daemon_config(None, {"auth_token_file": str(token)})
    assert cfg.auth_token == "abc123"
    assert load_daemon_config(None, {"auth_token_file": str(token), "auth_token": "abc123"}) == cfg
    with pytest.raises(ConfigError, match="auth_token: both"):
        load_daemon_config(None, {"auth_token_file": str(token), "auth_token": "other"})
    with pytest.raises(ConfigError, match="auth_token_file: cannot read"):
        load_daemon_config(None, {"auth_token_file": str(tmp_path / "nope")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="auth_token_file: .* is empty"):
        load_client_config(None, {"servers": ["a:1"], "auth_token_file": str(tmp_path / "empty")})


def test_constructing_in_code_is_validated_too():
    cfg = DaemonConfig(listen="10.0.0.1:8000", engine={"region_size": "4MiB"})
    assert cfg.engine.region_size == 4 * MiB and cfg.control_listen == "10.0.0.1:8001"
    with pytest.raises(ConfigError, match="^engine.eviction:"):
        DaemonConfig(engine={"eviction": "x"})
    with pytest.raises(ConfigError, match="^region_size:"):
        EngineConfig(region_size=3)


# ---------------------------------------------------------------- client config


def test_client_config(tmp_path):
    path = write(
        tmp_path,
        "servers: ['10.0.0.1:7070', '[fd00::2]:7070']\ntimeout_s: 0.5\nreplicas: 2\n",
    )
    cfg = load_client_config(path)
    assert cfg.servers == ["10.0.0.1:7070", "[fd00::2]:7070"]
    assert cfg.timeout_s == 0.5 and cfg.replicas == 2 and cfg.connect_timeout_s == 2.0
    assert cfg.connections_per_node == 2 and cfg.etcd is None
    assert load_client_config(write(tmp_path, yaml.safe_dump(dataclasses.asdict(cfg)))) == cfg
    only_etcd = load_client_config(None, {"etcd.endpoints": ["127.0.0.1:2379"]})
    assert only_etcd.servers == [] and only_etcd.etcd == EtcdConfig()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "servers: needs at least one host:port, or configure etcd"),
        ({"servers": ["a:1", "a:1"]}, "servers: lists a server twice"),
        ({"servers": ["a:1", "b"]}, "servers[1]: expected host:port"),
        ({"servers": "a:1", "timeout_s": 0}, "timeout_s: must be greater than 0"),
        ({"servers": "a:1", "connect_timeout_s": "soon"}, "connect_timeout_s: must be a number"),
        ({"servers": "a:1", "timeout_s": float("inf")}, "timeout_s: must be a number"),
        ({"servers": "a:1", "connections_per_node": 0}, "connections_per_node: must be in 1..1024"),
        ({"servers": "a:1", "replicas": 0}, "replicas: must be in 1..16"),
        ({"servers": 5}, "servers: must be a list"),
        ({"servers": "a:1", "sever": 1}, "sever: unknown key (did you mean 'servers'?)"),
    ],
)
def test_client_bad_values(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_client_config(None, overrides)
    assert str(exc.value).startswith(message), str(exc.value)


def test_client_constructed_in_code():
    assert ClientConfig(servers=["h:1"]).servers == ["h:1"]
    with pytest.raises(ConfigError, match="^servers:"):
        ClientConfig()
