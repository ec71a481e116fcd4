"""Flow network: fair sharing checked by hand, byte conservation as a property, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from hypothesis import given
from hypothesis import strategies as st

from moesim.errors import MoesimError
from moesim.sim.maxmin import dominated_links, maxmin_rates
from moesim.sim.network import FlowNetwork


def _run(bw, lat, flows, starts=None):
    """Run flows (route, nbytes[, start]) to completion; return (arrival times, network)."""
    env = simpy.Environment()
    net = FlowNetwork(env, bw, lat)
    done = {}
    order = {}
    starts = starts or [0.0] * len(flows)

    def proc(i, route, nbytes, t0):
        yield env.timeout(t0)
        fid = yield net.transfer(route, nbytes)
        done[i] = env.now
        order[fid] = i

    for i, ((route, nbytes), t0) in enumerate(zip(flows, starts)):
        env.process(proc(i, route, nbytes, t0))
    env.run()
    net.order = [order[f] for f in range(len(flows))]  # flow id -> index in ``flows``
    return [done[i] for i in range(len(flows))], net


def test_single_flow_gets_whole_link():
    # 1 MB over a 100 GB/s link with 2 us latency: 1e6 / 1e11 + 2e-6 = 12 us
    t, net = _run([100e9], [2e-6], [([0], 1e6)])
    assert t[0] == pytest.approx(12e-6, rel=1e-12)
    assert net.link_bytes[0] == pytest.approx(1e6)


def test_two_flows_share_one_link_equally():
    # each gets 50 GB/s: 2 * 1e6 / 1e11 + 2e-6 = 22 us
    t, net = _run([100e9], [2e-6], [([0], 1e6), ([0], 1e6)])
    assert t == pytest.approx([22e-6, 22e-6], rel=1e-12)
    assert net.link_bytes[0] == pytest.approx(2e6)


def test_short_flow_leaves_then_long_one_speeds_up():
    # link 100 B/s; A=100 B, B=300 B. Both at 50 B/s until A ends at t=2 (B has 200 left), then B at 100 B/s:
    # B ends at 2 + 200/100 = 4.
    t, _ = _run([100.0], [0.0], [([0], 100.0), ([0], 300.0)])
    assert t == pytest.approx([2.0, 4.0])


def test_late_joiner_slows_the_first_flow():
    # A=300 B starts at 0 alone at 100 B/s; B=100 B joins at t=1 (A has 200 left): both at 50 B/s,
    # B ends at t=3 (A has 100 left), A ends at 3 + 1 = 4.
    t, _ = _run([100.0], [0.0], [([0], 300.0), ([0], 100.0)], starts=[0.0, 1.0])
    assert t == pytest.approx([4.0, 3.0])


def test_parking_lot_maxmin_by_hand():
    # Classic parking lot: links 0,1,2 of capacity 1; flow A crosses all three, flows B,C,D one each.
    # Max-min: every link has 2 flows -> A = B = C = D = 1/2.
    # Raise link 2 to capacity 2: links 0 and 1 still bind A at 1/2, D takes the rest of link 2: 3/2.
    pad = 3
    routes = np.array([[0, 1, 2], [0, pad, pad], [1, pad, pad], [2, pad, pad]])
    assert maxmin_rates(routes, np.array([1.0, 1.0, 1.0, np.inf])) == pytest.approx([0.5] * 4)
    assert maxmin_rates(routes, np.array([1.0, 1.0, 2.0, np.inf])) == pytest.approx([0.5, 0.5, 0.5, 1.5])
    # Link 0 of capacity 3 with A and B; link 1 capacity 1 with A and C: A, C = 1/2, B takes 3 - 1/2 = 5/2.
    routes2 = np.array([[0, 1], [0, 2], [1, 2]])
    assert maxmin_rates(routes2, np.array([3.0, 1.0, np.inf])) == pytest.approx([0.5, 2.5, 0.5])


def test_parking_lot_in_time():
    # Same parking lot (capacity 1 B/s, 1 B each): all four at 1/2 finish at t=2.
    t, _ = _run([1.0, 1.0, 1.0], [0.0] * 3, [([0, 1, 2], 1.0), ([0], 1.0), ([1], 1.0), ([2], 1.0)])
    assert t == pytest.approx([2.0] * 4)


def test_empty_route_and_zero_bytes_arrive_after_latency_only():
    t, net = _run([10.0, 10.0], [1.0, 2.0], [([], 500.0), ([0, 1], 0.0)])
    assert t == pytest.approx([0.0, 3.0])
    assert net.link_bytes.tolist() == [0.0, 0.0]


def test_groups_fire_when_all_their_flows_arrived():
    env = simpy.Environment()
    net = FlowNetwork(env, [10.0, 10.0], [0.0, 0.5])
    gid, ev = net.group(2)
    net.transfer_many(np.array([[0, -1], [1, -1]]), [10.0, 40.0], [gid, gid])
    env.run(until=ev)
    assert env.now == pytest.approx(4.5)  # flow 2: 40 B at 10 B/s + 0.5 s latency
    assert net.group(0)[1].triggered


def test_bad_inputs():
    env = simpy.Environment()
    with pytest.raises(MoesimError, match="bandwidth"):
        FlowNetwork(env, [1.0, 0.0], [0.0, 0.0])
    with pytest.raises(MoesimError, match="latency"):
        FlowNetwork(env, [1.0], [-1.0])
    net = FlowNetwork(env, [1.0], [0.0])
    with pytest.raises(MoesimError, match="outside"):
        net.transfer([3], 1.0)
    with pytest.raises(MoesimError, match="non-negative"):
        net.transfer([0], -1.0)


@st.composite
def flow_sets(draw):
    n_links = draw(st.integers(1, 6))
    bw = draw(st.lists(st.floats(1.0, 1e3), min_size=n_links, max_size=n_links))
    lat = draw(st.lists(st.floats(0.0, 1.0), min_size=n_links, max_size=n_links))
    n = draw(st.integers(1, 25))
    flows = []
    for _ in range(n):
        route = draw(st.lists(st.integers(0, n_links - 1), min_size=0, max_size=n_links, unique=True))
        flows.append((route, draw(st.sampled_from([0.0, 1.0, 7.5, 100.0, 1234.0]) | st.floats(0.0, 1e4))))
    starts = draw(st.lists(st.sampled_from([0.0, 0.5, 2.0]) | st.floats(0.0, 10.0), min_size=n, max_size=n))
    return bw, lat, flows, starts


@given(flow_sets())
def test_every_byte_arrives(case):
    bw, lat, flows, starts = case
    t, net = _run(bw, lat, flows, starts)
    rec = net.flow_record()
    requested = np.array([flows[i][1] for i in net.order])
    np.testing.assert_allclose(rec["delivered"], requested, rtol=1e-12)
    expect = np.zeros(len(bw))
    for route, nb in flows:
        expect[route] += nb
    np.testing.assert_allclose(net.link_bytes, expect, rtol=1e-9, atol=1e-6)
    for i, (route, nb) in enumerate(flows):
        # never faster than alone on its slowest link, never sooner than its latency
        floor = starts[i] + sum(lat[e] for e in route) + (nb / min(bw[e] for e in route) if route else 0.0)
        assert t[i] >= floor * (1 - 1e-9) - 1e-12
    assert net.active_flows == 0


@given(flow_sets())
def test_maxmin_allocation_is_feasible_and_each_flow_has_a_bottleneck(case):
    bw, _, flows, _ = case
    flows = [(r, nb) for r, nb in flows if r]
    if not flows:
        return
    pad = len(bw)
    H = max(len(r) for r, _ in flows)
    routes = np.full((len(flows), H), pad)
    for i, (r, _) in enumerate(flows):
        routes[i, :len(r)] = r
    rate = maxmin_rates(routes, np.append(bw, np.inf))
    load = np.zeros(pad + 1)
    np.add.at(load, routes.ravel(), np.repeat(rate, H))
    assert np.all(load[:pad] <= np.array(bw) * (1 + 1e-9))
    # max-min optimality: each flow crosses a saturated link on which it has the largest rate
    for i, (r, _) in enumerate(flows):
        ok = False
        for e in r:
            on_e = [j for j, (rj, _) in enumerate(flows) if e in rj]
            if load[e] >= bw[e] * (1 - 1e-9) and rate[i] >= max(rate[on_e]) * (1 - 1e-9):
                ok = True
        assert ok, (i, r, rate)


def test_deterministic():
    rng = np.random.default_rng(0)
    flows = [(sorted(rng.choice(5, size=rng.integers(1, 4), replace=False).tolist()), float(rng.integers(1, 1000)))
             for _ in range(40)]
    starts = rng.uniform(0, 5, size=40).tolist()
    a, na = _run([10.0, 20.0, 5.0, 8.0, 40.0], [0.1] * 5, flows, starts)
    b, nb = _run([10.0, 20.0, 5.0, 8.0, 40.0], [0.1] * 5, flows, starts)
    assert a == b
    assert np.array_equal(na.link_bytes, nb.link_bytes)


@given(flow_sets(), st.sampled_from([1e-3, 0.1, 1.0]))
def test_quantum_keeps_every_byte(case, quantum):
    bw, lat, flows, starts = case
    exact, _ = _run(bw, lat, flows, starts)
    env = simpy.Environment()
    net = FlowNetwork(env, bw, lat, quantum=quantum)
    done = {}

    def proc(i, route, nbytes, t0):
        yield env.timeout(t0)
        yield net.transfer(route, nbytes)
        done[i] = env.now

    for i, ((route, nbytes), t0) in enumerate(zip(flows, starts)):
        env.process(proc(i, route, nbytes, t0))
    env.run()
    expect = np.zeros(len(bw))
    for route, nb in flows:
        expect[route] += nb
    np.testing.assert_allclose(net.link_bytes, expect, rtol=1e-9, atol=1e-6)
    # (max-min is not monotone: a late hand-over can make a third flow early, so no ordering is asserted)
    for i, (route, nb) in enumerate(flows):
        floor = starts[i] + sum(lat[e] for e in route) + (nb / min(bw[e] for e in route) if route else 0.0)
        assert done[i] >= floor * (1 - 1e-9) - 1e-12
    # each start and hand-over waits at most one quantum: the last arrival moves by less than one per flow
    assert abs(max(done.values()) - max(exact)) <= quantum * len(flows) + 1e-9


@given(flow_sets())
def test_dominated_links_leave_rates_unchanged(case):
    bw, _, flows, _ = case
    routes = [r for r, _ in flows if r]
    if not routes:
        return
    dom = dominated_links(routes, bw)
    pad = len(bw)
    H = max(len(r) for r in routes)
    full = np.full((len(routes), H), pad)
    for i, r in enumerate(routes):
        full[i, :len(r)] = r
    assert np.array_equal(dominated_links(np.where(full == pad, -1, full), bw), dom)  # the same from a table
    cmap = np.append(np.where(dom, pad, np.arange(pad)), pad)
    cap = np.append(bw, np.inf)
    np.testing.assert_allclose(maxmin_rates(cmap[full], cap), maxmin_rates(full, cap), rtol=1e-9)


def test_dominated_links_on_a_chain():
    # routes 0->1->2 and 1 alone: link 0 (wide) carries a subset of link 1's routes -> dominated;
    # link 2 has the same routes as link 0 and is narrower than link 1? no: 2 carries {A}, 1 carries {A, B}.
    dom = dominated_links([[0, 1, 2], [1]], [10.0, 5.0, 5.0])
    assert dom.tolist() == [True, False, True]
    dom = dominated_links([[0, 1, 2], [1]], [10.0, 5.0, 1.0])
    assert dom.tolist() == [True, False, False]


def test_route_table_fast_path_matches_transfer_many():
    table = np.array([[0, 1], [1, -1], [-1, -1], [2, 0]])
    sizes = [300.0, 100.0, 50.0, 200.0]

    def run(fast: bool):
        env = simpy.Environment()
        net = FlowNetwork(env, [100.0, 50.0, 80.0], [0.1, 0.2, 0.3])
        gids, evs = net.group_many([1, 1, 1, 1])
        if fast:
            net.set_routes(table)
            net.transfer_routes([0, 1, 2, 3], sizes, gids)
        else:
            net.transfer_many([[0, 1], [1], [], [2, 0]], sizes, gids)
        times = [None] * len(evs)
        for i, ev in enumerate(evs):
            if ev.triggered:
                times[i] = env.now
            else:
                ev.callbacks.append(lambda _e, i=i: times.__setitem__(i, env.now))
        env.run()
        return times, net.link_bytes

    (ta, la), (tb, lb) = run(False), run(True)
    assert ta == pytest.approx(tb, rel=1e-12)
    np.testing.assert_allclose(la, lb)
    assert ta[2] == 0.0  # empty route: arrives at once


# -- the compiled code (moesim.sim.maxmin_jit, needs numba): the per-flow solve is the numpy one bit for bit; the
# -- class-aggregated solve the batch points use gives the same allocation up to round-off ---------------------
def _needs_jit():
    from moesim.sim import maxmin_jit

    maxmin_jit.load()
    if not maxmin_jit._available:
        pytest.skip("compiled flow network unavailable (numba not installed, or MOESIM_NO_JIT set)")
    return maxmin_jit


@given(flow_sets(), st.integers(0, 3))
def test_compiled_maxmin_is_bit_identical(case, extra_pad):
    jit = _needs_jit()
    from moesim.sim.maxmin import _LEVEL_RTOL, maxmin_rates_numpy

    bw, _, flows, _ = case
    pad = len(bw)
    H = max([len(r) for r, _ in flows] + [1]) + extra_pad
    routes = np.full((len(flows), H), pad)
    for i, (r, _) in enumerate(flows):
        routes[i, :len(r)] = r
    cap = np.append(bw, np.inf)
    got = jit.maxmin_rates_jit(routes, cap, _LEVEL_RTOL)
    want = maxmin_rates_numpy(routes, cap)
    assert np.array_equal(got, want), (got, want)


def _compiled_vs_numpy(make_net, start, items):
    """Start flow i of ``items`` [(start time, payload)] with ``start(net, i, payload)`` (returning the event its
    arrival fires) on a compiled and on a numpy network made by ``make_net(env)``; assert that the two runs agree:
    every flow arrived in both, to round-off, with the same records and link bytes after as many recomputations."""
    jit = _needs_jit()

    def run(compiled: bool):
        before = jit.set_active(compiled)
        try:
            env = simpy.Environment()
            net = make_net(env)
            arrived = {}

            def starter(i, t0, payload):
                yield env.timeout(t0)
                yield start(net, i, payload)
                arrived[i] = env.now

            for i, (t0, payload) in enumerate(items):
                env.process(starter(i, t0, payload))
            env.run()
            return arrived, net.flow_record(), net.link_bytes, net.recomputations
        finally:
            jit.set_active(before)

    a, b = run(True), run(False)
    assert a[0].keys() == b[0].keys() == set(range(len(items))) and a[3] == b[3]
    np.testing.assert_allclose([a[0][k] for k in sorted(a[0])], [b[0][k] for k in sorted(b[0])], rtol=1e-9)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-9)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-9, atol=1e-9)


@given(flow_sets(), st.sampled_from([0.0, 0.3]), st.sampled_from([0.0, 0.05]))
def test_compiled_network_matches_numpy(case, quantum, rel_quantum):
    bw, lat, flows, starts = case
    _compiled_vs_numpy(lambda env: FlowNetwork(env, bw, lat, quantum=quantum, rel_quantum=rel_quantum),
                       lambda net, i, flow: net.transfer(*flow), list(zip(starts, flows)))


@st.composite
def tiered_flow_sets(draw):
    """Links of a few capacity tiers (narrow NIC-like, wide NVLink-like), flows over random subsets: many flows
    share their narrowest links, which is what the class-aggregated solve exploits."""
    tiers = draw(st.lists(st.sampled_from([1.0, 2.0, 9.0, 50.0]), min_size=1, max_size=3, unique=True))
    n_links = draw(st.integers(1, 8))
    bw = [draw(st.sampled_from(tiers)) for _ in range(n_links)]
    n = draw(st.integers(1, 40))
    routes = [draw(st.lists(st.integers(0, n_links - 1), min_size=0, max_size=4, unique=True)) for _ in range(n)]
    return bw, routes


def _class_rates(bw, routes):
    """(per-flow rates from the numpy solve, from the compiled class solve) for routes over links ``bw``."""
    jit = _needs_jit()
    from moesim.sim.maxmin import maxmin_rates_numpy

    pad = len(bw)
    H = max([len(r) for r in routes] + [1])
    rt = np.full((len(routes), H), pad)
    for i, r in enumerate(routes):
        rt[i, :len(r)] = sorted(r)
    net = FlowNetwork(simpy.Environment(), bw, [0.0] * len(bw))
    cls = net._class_ids(rt)
    got = jit.maxmin_rates_classes(rt, cls, net._cls_rt, net._cls_tier, np.append(bw, np.inf), 1e-9)
    return maxmin_rates_numpy(rt, np.append(bw, np.inf)), got


@given(tiered_flow_sets())
def test_class_solve_gives_the_maxmin_allocation(case):
    want, got = _class_rates(*case)
    assert np.array_equal(np.isinf(want), np.isinf(got))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-9)


def test_class_solve_falls_back_when_a_wide_link_binds_the_narrow_tier():
    # links a, b (capacity 1) each carry one flow that also crosses c (1.5): alone on their narrow links they
    # would get 1 each, but c binds them at 0.75 — the certificate sees c overloaded and solves per flow
    want, got = _class_rates([1.0, 1.0, 1.5], [[0, 2], [1, 2]])
    np.testing.assert_allclose(got, [0.75, 0.75])
    np.testing.assert_allclose(want, got)


def test_class_solve_falls_back_when_a_wide_tier_flow_is_slower():
    # flow 0 crosses a (1) and w (10); twenty flows cross w only. Stage 1 would give flow 0 all of a (1) and
    # the twenty 9/20 each: flow 0 faster than them on w, so w is nobody's fair bottleneck — the true allocation
    # shares w 21 ways (10/21 each)
    want, got = _class_rates([1.0, 10.0], [[0, 1]] + [[1]] * 20)
    np.testing.assert_allclose(got, [10 / 21] * 21)
    np.testing.assert_allclose(want, got)


def test_pxn_flows_to_one_gpu_share_a_class():
    # rail-pxn: every GPU of node 0 reaches GPU 9 (node 1, rail 1) through nic1 -> leaf1 -> nic9: one class
    from moesim.sim.des import _route_table
    from moesim.topo import load_topology

    topo = load_topology("dgx-h100:2")
    G = topo.num_gpus
    routes = _route_table(topo, G)
    net = FlowNetwork(simpy.Environment(), topo, ignore_links=dominated_links([r[r >= 0] for r in routes],
                                                                              topo.edge_bw))
    net.set_routes(routes)
    to9 = net._tab_cls[[s * G + 9 for s in range(8)]]
    assert len(set(to9.tolist())) == 1
    assert net._tab_cls[0 * G + 1] != net._tab_cls[2 * G + 1]  # intranode flows: one class per pair
    assert net._tab_cls[0 * G + 9] != net._tab_cls[0 * G + 10]  # another rail: another class
    # rows narrow first: a flow's first cls_nn hops are its class's links, every later one wider
    cap = net._cap[net._tab_crt]
    nn = net._cls_nn[net._tab_cls]
    tier = net._cls_tier[net._tab_cls]
    for row in range(G * G):
        wider = net._tab_crt[row, nn[row]:]
        assert np.all(cap[row, :nn[row]] == tier[row]) and np.all(net._cap[wider[wider != net._pad]] > tier[row])


def _handover_reference(ttf, k, first, quantum, rel_quantum):
    """The hand-over delay as the numpy network computes it: the largest time within the quantum of the first,
    the quantum widened to a fraction of the median (``np.partition``)."""
    q = max(quantum, rel_quantum * np.partition(ttf, k)[k])
    return float(ttf[ttf <= first + q].max())


@given(st.lists(st.sampled_from([0.0, 1e-6, 2e-6, 3.5e-6, np.inf]) | st.floats(0.0, 1e-3), min_size=1,
                max_size=3000), st.floats(0.0, 1.0), st.booleans(), st.sampled_from([0.0, 2e-6]),
       st.sampled_from([0.05, 0.5]))
def test_compiled_selection_and_handover_are_numpys(values, where, ordered, quantum, rel):
    """The compiled median (``_select``) is ``np.partition``'s, and the fused median-and-hand-over pass gives the
    numpy network's delay, on sorted and shuffled times alike (the input left as it was)."""
    _needs_jit()
    from moesim.sim._maxmin_kernels import _median_handover, _select

    a = np.sort(values) if ordered else np.asarray(values, dtype=float)
    k = min(int(where * a.size), a.size - 1)
    assert _select(a.copy(), k) == np.partition(a, k)[k]
    first = float(a.min())
    before = a.copy()
    assert _median_handover(a, k, first, quantum, rel) == _handover_reference(a, k, first, quantum, rel)
    assert np.array_equal(a, before)


@pytest.mark.parametrize("kind", ["random", "sorted", "few-values", "runs", "spread"])
def test_compiled_selection_and_handover_on_large_arrays(kind):
    """Past 512 values the sampled pivots are used (and, where they miss the median, the plain path): the same
    answers as numpy at every rank probed."""
    _needs_jit()
    from moesim.sim._maxmin_kernels import _median_handover, _select

    rng = np.random.default_rng(1)
    n = 20_000
    a = {"random": rng.random(n), "sorted": np.sort(rng.random(n)), "few-values": rng.integers(0, 3, n) * 1e-6,
         "runs": np.sort(np.repeat(rng.random(n // 7 + 1), 7)[:n]),
         "spread": rng.random(n) * 10.0 ** rng.integers(-7, -2, n)}[kind]
    a[rng.random(n) < 0.02] = np.inf
    for k in (0, 1, n // 3, n // 2, n - 2, n - 1):
        assert _select(a.copy(), k) == np.partition(a, k)[k]
        for quantum, rel in ((0.0, 0.05), (2e-6, 0.05), (2e-6, 0.9)):
            first = float(a.min())
            assert _median_handover(a, k, first, quantum, rel) == _handover_reference(a, k, first, quantum, rel)


@given(tiered_flow_sets(), st.lists(st.tuples(st.booleans(), st.floats(0.0, 2.0), st.floats(0.0, 50.0)),
                                    min_size=1, max_size=30), st.integers(0, 40))
def test_compiled_route_store_matches_numpy(case, starts, reserve):
    """Flows by route-table row (checked and unchecked starts) and by free route (longer ones too: the route store
    and the wider-hop columns grow mid-run), empty and zero-byte ones among them, started over time, with or
    without records reserved up front: the compiled batch points (class counts kept incrementally) give the
    numpy network's arrivals, records and link bytes."""
    bw, routes = case
    table = np.full((len(routes), 2), -1)
    for i, r in enumerate(routes):
        table[i, :min(len(r), 2)] = r[:2]  # the table keeps at most two hops; free routes may have four

    def make_net(env):
        net = FlowNetwork(env, bw, [1e-3] * len(bw), quantum=0.01, rel_quantum=0.05)
        net.set_routes(table)
        net.reserve(reserve)
        return net

    def start(net, i, payload):
        by_row, nb = payload
        gid, ev = net.group(1)
        row = i % len(routes)
        if by_row and i % 2:
            net.transfer_routes([row], [nb], [gid])
        elif by_row:  # the DES's unchecked path (one compiled start where numba is)
            net.transfer_routes(np.array([row]), np.array([nb]), np.array([gid]), checked=True)
        else:
            net.transfer_many([routes[row]], [nb], [gid])
        return ev

    _compiled_vs_numpy(make_net, start, [(t0, (by_row, nb)) for by_row, t0, nb in starts])


def test_handover_when_the_pivot_interval_holds_only_later_times():
    """Times between the pivots' limits but past the exact one: the delay is the last time before them (a
    case the sampled pass must not get wrong: its pivots bound the limit, the exact median decides)."""
    _needs_jit()
    from moesim.sim._maxmin_kernels import _median_handover

    rng = np.random.default_rng(3)
    a = np.concatenate([rng.uniform(0.0, 0.5, 200), np.full(100, 0.8825), rng.uniform(0.95, 1.05, 700)])
    a = rng.permutation(a)
    k, first = a.size // 2, float(a.min())
    want = _handover_reference(a, k, first, 0.0, 0.9)
    assert want < 0.5  # the 0.8825s lie past first + 0.9 x median, within the pivots' limits
    assert _median_handover(a, k, first, 0.0, 0.9) == want
