import numpy as np
import pytest
import xxhash

from wqs.errors import NodeUnavailable, WQSError
from wqs.ring import MAX_VNODES_PER_NODE, HashRing, key_of, weight_unit_for

N_IDS = 100_000


@pytest.fixture(scope="module")
def ids() -> list[bytes]:
    rng = np.random.default_rng(42)
    raw = rng.integers(0, 256, size=(N_IDS, 16), dtype=np.uint8)
    return [bytes(row) for row in raw]


def nodes(n: int, start: int = 0) -> list[str]:
    return [f"10.0.0.{i}:7070" for i in range(start, start + n)]


def shares(ring: HashRing, ids: list[bytes]) -> dict[str, float]:
    counts = np.bincount(ring.assign_indices(ids), minlength=len(ring))
    return {name: c / len(ids) for name, c in zip(ring.nodes, counts)}


def test_equal_nodes_balanced(ids):
    ring = HashRing({n: 1.0 for n in nodes(3)})
    for share in shares(ring, ids).values():
        assert abs(share - 1 / 3) < 0.1 / 3


def test_iterable_of_names_means_weight_one(ids):
    assert HashRing(nodes(3)).assign(ids[:1000]) == HashRing(dict.fromkeys(nodes(3), 1.0)).assign(
        ids[:1000]
    )


def test_weights_respected(ids):
    a, b, c = nodes(3)
    ring = HashRing({a: 1.0, b: 1.0, c: 2.0})
    assert ring.vnodes(c) == 2 * ring.vnodes(a)
    s = shares(ring, ids)
    assert 1.7 < s[c] / s[a] < 2.3 and 1.7 < s[c] / s[b] < 2.3
    assert abs(s[c] - 0.5) < 0.05


def test_weight_unit_scales_capacities(ids):
    tib = 2**40
    by_bytes = HashRing({n: 4 * tib for n in nodes(3)}, weight_unit=4 * tib)
    assert by_bytes.assign(ids[:2000]) == HashRing(nodes(3)).assign(ids[:2000])
    with pytest.raises(ValueError, match="weight_unit"):
        HashRing({"a:1": 4 * tib})  # bytes without a unit: millions of vnodes


def test_weight_unit_for_capacities_in_any_unit(ids):
    mib, tib = 2**20, 2**40
    # Small test nodes and large NVMe nodes both get a well-spread ring, never an error.
    for capacity in (64 * mib, 3 * tib, 0.25):
        weights = {n: capacity for n in nodes(3)}
        ring = HashRing(weights, weight_unit=weight_unit_for(weights.values()))
        assert all(512 <= ring.vnodes(n) < 1024 for n in ring.nodes)
        for share in shares(ring, ids).values():
            assert abs(share - 1 / 3) < 0.1 / 3
    # Proportional across sizes, whatever the unit.
    mixed = dict(zip(nodes(3), (1 * tib, 1 * tib, 4 * tib)))
    ring = HashRing(mixed, weight_unit=weight_unit_for(mixed.values()))
    a, _, c = nodes(3)
    assert ring.vnodes(c) == 4 * ring.vnodes(a)
    assert 0.6 < shares(ring, ids)[c] < 0.73  # 4/6 of the blocks
    # A pure function of the set: the order a client learnt the nodes in does not matter.
    assert weight_unit_for([3.0, 1.5, 70.0]) == weight_unit_for([70.0, 3.0, 1.5]) == 1.0


def test_weight_unit_for_extreme_spread_stays_within_vnode_limit():
    weights = {"small:1": 1.0, "huge:1": 1e6}
    ring = HashRing(weights, weight_unit=weight_unit_for(weights.values()))
    assert ring.vnodes("huge:1") <= MAX_VNODES_PER_NODE and ring.vnodes("small:1") == 1
    with pytest.raises(ValueError, match="positive"):
        weight_unit_for([1.0, 0.0])


def test_adding_a_node_keeps_the_unit_and_moves_keys_only_to_it(ids):
    tib = 2**40
    before = {n: 2 * tib for n in nodes(3)}
    after = dict(before, **{nodes(1, start=3)[0]: 3 * tib})
    assert weight_unit_for(before.values()) == weight_unit_for(after.values())
    old = HashRing(before, weight_unit=weight_unit_for(before.values())).assign(ids[:20000])
    new = HashRing(after, weight_unit=weight_unit_for(after.values())).assign(ids[:20000])
    assert all(o == n or n == nodes(1, start=3)[0] for o, n in zip(old, new))


def test_lookup_paths_agree(ids):
    ring = HashRing({n: 1.0 + i / 2 for i, n in enumerate(nodes(5))})
    sample = ids[:3000]
    names = ring.assign(sample)
    assert names == [ring.node_for(i) for i in sample]
    assert names == [ring.nodes_for(i, 3)[0] for i in sample]
    assert [ring.nodes[i] for i in ring.assign_indices(sample)] == names
    grouped = ring.group(sample)
    assert sum(len(v) for v in grouped.values()) == len(sample)
    assert all(names[p] == node for node, pos in grouped.items() for p in pos)


def test_placement_is_independent_of_insertion_order(ids):
    a = HashRing({n: 1.0 for n in nodes(4)})
    b = HashRing()
    for n in reversed(nodes(4)):
        b.add(n)
    assert a.assign(ids[:5000]) == b.assign(ids[:5000])


def test_key_and_point_layout():
    # The contract other clients must reproduce: key = xxh3_64(id); points = xxh3_64(f"{n}#{i}").
    ring = HashRing({"h:1": 1.0}, vnodes_per_unit_weight=4)
    assert key_of(b"\x00" * 16) == xxhash.xxh3_64_intdigest(b"\x00" * 16)
    points = sorted(xxhash.xxh3_64_intdigest(f"h:1#{i}".encode()) for i in range(4))
    assert ring._points.tolist() == points


@pytest.mark.parametrize("n", [3, 5, 10])
def test_adding_node_moves_only_to_new_node(ids, n):
    ring = HashRing({x: 1.0 for x in nodes(n)})
    before = ring.assign(ids)
    new = nodes(1, start=n)[0]
    ring.add(new)
    after = ring.assign(ids)
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert all(a == new for _, a in moved)
    assert abs(len(moved) / N_IDS - 1 / (n + 1)) < 0.2 / (n + 1)


def test_removing_node_moves_only_its_ids(ids):
    ring = HashRing({x: 1.0 for x in nodes(5)})
    before = ring.assign(ids)
    gone = nodes(5)[2]
    ring.remove(gone)
    after = ring.assign(ids)
    assert gone not in ring and len(ring) == 4
    assert all(b == gone for b, a in zip(before, after) if b != a)
    assert all(a == b for b, a in zip(before, after) if b != gone)


def test_reweighting_moves_only_to_grown_node(ids):
    ring = HashRing({x: 1.0 for x in nodes(4)})
    before = ring.assign(ids)
    grown = nodes(4)[0]
    ring.add(grown, 2.0)
    after = ring.assign(ids)
    assert all(a == grown for b, a in zip(before, after) if b != a)


def test_replicas_are_distinct_and_clockwise(ids):
    ring = HashRing({x: 1.0 for x in nodes(5)})
    for block_id in ids[:2000]:
        reps = ring.nodes_for(block_id, 3)
        assert len(reps) == 3 and len(set(reps)) == 3
        assert reps[0] == ring.node_for(block_id)
        assert ring.nodes_for(block_id, 2) == reps[:2]
    assert sorted(ring.nodes_for(ids[0], 9)) == sorted(nodes(5))  # capped at ring size
    with pytest.raises(ValueError):
        ring.nodes_for(ids[0], 0)


def test_empty_ring_raises_clear_error(ids):
    ring = HashRing()
    for call in (
        lambda: ring.node_for(ids[0]),
        lambda: ring.nodes_for(ids[0], 2),
        lambda: ring.assign(ids[:3]),
    ):
        with pytest.raises(NodeUnavailable, match="empty"):
            call()
    assert issubclass(NodeUnavailable, WQSError)
    ring.add("a:1")
    ring.remove("a:1")
    with pytest.raises(NodeUnavailable):
        ring.node_for(ids[0])


def test_bad_arguments():
    with pytest.raises(ValueError):
        HashRing({"a:1": 0.0})
    with pytest.raises(ValueError):
        HashRing({"a:1": float("nan")})
    with pytest.raises(ValueError):
        HashRing({"": 1.0})
    with pytest.raises(ValueError):
        HashRing(vnodes_per_unit_weight=0)
    with pytest.raises(KeyError, match="not in the ring"):
        HashRing(nodes(2)).remove("nope:1")
    assert HashRing({"a:1": 1e-6}).vnodes("a:1") == 1  # tiny weights still get a point
    assert HashRing(nodes(2)).assign([]) == []
