"""Border classes of the implicit conv frame statistics (``regkernels._geometry``, docs/conv.md):
the classes against a brute-force per-position oracle built from explicit index matrices, the
circular merge of offsets equal modulo the index range, the implicit ``(d, r)`` against the
explicit operator Gram, and the enumeration work (counted, never timed) independent of ``n``."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from test_robust_conv import _classes_of  # the table read back as (pattern, count) pairs
from regkernels import _geometry as CG
from regkernels.composite import conv as CC
from regkernels.reference import conv as R

D64 = torch.float64


# ---------------------------------------------------------------- oracle

def _index_triples(n, k, s, p, dil, circular):
    """``E[y, t, u] = 1`` as the set of its ``(y, t, u)``, straight from the definition of the conv."""
    out = (n + 2 * p - dil * (k - 1) - 1) // s + 1
    E = set()
    for y in range(out):
        for t in range(k):
            w = y * s - p + t * dil
            if circular:
                E.add((y, t, w % n))
            elif 0 <= w < n:
                E.add((y, t, w))
    return out, E


def _oracle_classes(n, k, s, p, dil, circular, rows, wrap=True):
    """Every position's row of ``Q = Eᵀ E`` (cols) or ``E Eᵀ`` (rows) per tap pair, relative to the
    position; circular offsets labelled by their residue in ``[−⌊m/2⌋, m − ⌊m/2⌋)`` with ``m`` the
    size of the side's index range (``wrap=False``: the plain index difference). Returns the sorted
    ``(pattern, count)`` list and the set of labels used."""
    out, E = _index_triples(n, k, s, p, dil, circular)
    m = out if rows else n

    def label(q):
        return (q + m // 2) % m - m // 2 if (circular and wrap) else q

    Q = Counter()  # (position, t, t', other position) -> multiplicity
    if rows:
        by_u = {}
        for y, t, u in E:
            by_u.setdefault(u, []).append((y, t))
        for pairs in by_u.values():
            for y, t in pairs:
                for y2, t2 in pairs:
                    Q[(y, t, t2, y2)] += 1
    else:
        by_y = {}
        for y, t, u in E:
            by_y.setdefault(y, []).append((t, u))
        for pairs in by_y.values():
            for t, u in pairs:
                for t2, u2 in pairs:
                    Q[(u, t, t2, u2)] += 1
    patterns = [Counter() for _ in range(m)]
    for (a, t, t2, b), mult in Q.items():
        key = (t, t2, label(b - a))
        assert key not in patterns[a]  # distinct columns of one row keep distinct labels
        patterns[a][key] = mult
    labels = {q for pat in patterns for (_, _, q) in pat}
    return sorted(Counter(tuple(sorted(pat.items())) for pat in patterns).items()), labels


def _sweep():
    for n in list(range(1, 13)) + [17, 32, 33]:
        for k in range(1, 5):
            for s in range(1, 4):
                for dil in (1, 2):
                    for p in range(k + 1):
                        for circular in (False, True):
                            if (circular and p > n) or n + 2 * p - dil * (k - 1) - 1 < 0:
                                continue
                            for rows in (False, True):
                                yield n, k, s, p, dil, circular, rows


def test_dim_classes_equal_the_per_position_oracle():
    checked = 0
    for args in _sweep():
        dc = CG.dim_classes.__wrapped__(*args)  # uncached: every case enumerated here
        want, labels = _oracle_classes(*args)
        assert _classes_of(dc) == want, args
        assert dc.rel == tuple(sorted(labels | {0})), args
        assert dc.rel[dc.zero] == 0
        assert len(set(pat for pat, _ in want)) == dc.n_cls  # one class per distinct pattern
        checked += 1
    assert checked > 4000


# ---------------------------------------------------------------- the circular merge

@pytest.mark.parametrize("rows", [False, True], ids=["cols", "rows"])
@pytest.mark.parametrize("n", [5, 8, 32])
@pytest.mark.parametrize("k, dil", [(3, 1), (5, 1), (3, 2)])
def test_circular_same_padding_stride_1_is_one_class(n, k, dil, rows):
    p = dil * (k - 1) // 2
    dc = CG.dim_classes(n, k, 1, p, dil, True, rows)
    assert dc.counts == (n,)
    # offsets (t' − t)·dil, one per distinct column: per residue mod n
    assert len(dc.rel) == len({(b - a) * dil % n for a in range(k) for b in range(k)})
    # the plain index differences split the edges into their own classes and offsets
    plain, plain_labels = _oracle_classes(n, k, 1, p, dil, True, rows, wrap=False)
    assert len(plain) > 1 and len(plain_labels) > len(dc.rel)


def test_circular_merge_at_stride_2():
    # 3-tap kernel, padding 1, n = 32: the plain differences gave 5 classes over 9 offsets (cols)
    # and 3 over 5 (rows)
    for rows, classes, offsets in ((False, 2, 5), (True, 1, 3)):
        dc = CG.dim_classes(32, 3, 2, 1, 1, True, rows)
        plain, plain_labels = _oracle_classes(32, 3, 2, 1, 1, True, rows, wrap=False)
        assert (dc.n_cls, len(dc.rel)) == (classes, offsets)
        assert (len(plain), len(plain_labels | {0})) == ((3, 5) if rows else (5, 9))
    # n odd: the output grid does not tile the input, fewer merges but still exact (oracle above)
    assert CG.dim_classes(33, 3, 2, 1, 1, True, False).n_cls < len(_oracle_classes(33, 3, 2, 1, 1, True, False,
                                                                                   wrap=False)[0])


def test_circular_2d_layer_geometry_is_one_class_combination():
    geo = CG.frame_geometry((64, 64, 3, 3), (32, 32), 1, 1, 1, 1, "circular", "cols")
    assert geo.n_cls == 1 and geo.positions == 32 * 32
    assert [len(dim.rel) for dim in geo.dims] == [1, 5, 5]


# ---------------------------------------------------------------- implicit (d, r) vs the explicit Gram

_GRAM_CASES = [
    # (weight shape, input size, keyword arguments, side)
    ((3, 2, 3, 3), (5, 6), dict(padding=1, padding_mode="circular"), "cols"),
    ((3, 2, 3, 3), (5, 6), dict(padding=1, padding_mode="circular"), "rows"),
    ((2, 3, 3, 3), (6, 7), dict(stride=2, padding=1, padding_mode="circular"), "cols"),
    ((2, 3, 3, 3), (6, 7), dict(stride=2, padding=1, padding_mode="circular"), "rows"),
    ((2, 2, 3, 3), (5, 4), dict(dilation=2, padding=2, padding_mode="circular"), "cols"),
    ((2, 2, 3, 3), (5, 4), dict(dilation=2, padding=2, padding_mode="circular"), "rows"),
    ((2, 2, 3, 2), (3, 2), dict(dilation=2, padding=(2, 1), padding_mode="circular"), "cols"),  # n < k·dil
    ((2, 2, 3, 2), (3, 2), dict(dilation=2, padding=(2, 1), padding_mode="circular"), "rows"),
    ((2, 2, 5, 3), (3, 2), dict(padding=2, padding_mode="circular"), "cols"),  # taps wrap twice onto one column
    ((4, 1, 3, 3), (6, 5), dict(stride=(2, 1), padding=(0, 1), groups=2, padding_mode="circular"), "rows"),
    ((4, 1, 3, 3), (6, 5), dict(stride=(2, 1), padding=(0, 1), groups=2, padding_mode="circular"), "cols"),
    ((2, 2, 3, 3), (7, 5), dict(stride=3, padding=(3, 1), padding_mode="circular"), "cols"),
    ((2, 2, 3, 3), (7, 5), dict(stride=2, dilation=2, padding=1), "cols"),
    ((2, 2, 3, 3), (7, 5), dict(stride=2, dilation=2, padding=1), "rows"),
    ((2, 2, 3, 3), (2, 3), dict(padding=2, dilation=2), "rows"),  # zeros, n < k·dil: empty rows
    ((2, 2, 3, 3), (2, 3), dict(padding=2, dilation=2), "cols"),
]


@pytest.mark.parametrize("shape, size, kw, side", _GRAM_CASES)
def test_implicit_d_r_equal_the_explicit_operator_gram(shape, size, kw, side):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=D64)
    T = R.conv_to_matrix(w, size, **kw)
    V = T.mT @ T if side == "cols" else T @ T.mT
    d_want = V.diagonal()
    r_want = V.abs().sum(1) - d_want.abs()
    d, r, counts, k = CC._stats("test", w, size, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                                kw.get("groups", 1), kw.get("padding_mode", "zeros"), side)
    assert k == V.shape[0]
    G, _, cx = d.shape
    per_channel = V.shape[0] // (G * cx)
    for g in range(G):
        for a in range(cx):
            rows = slice((g * cx + a) * per_channel, (g * cx + a + 1) * per_channel)
            for got, want in ((d[g, :, a], d_want[rows]), (r[g, :, a], r_want[rows]),
                              (d[g, :, a] - r[g, :, a], (d_want - r_want)[rows]),
                              (d[g, :, a] + r[g, :, a], (d_want + r_want)[rows])):
                # the class values repeated by their counts are the channel's rows, as multisets
                got = torch.repeat_interleave(got, counts.long())
                torch.testing.assert_close(got.sort().values, want.sort().values, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- work independent of n

_WORK_CASES = [
    # (k, s, p, dil, circular, rows) as functions of n
    lambda n: (3, 1, 1, 1, False, False),
    lambda n: (3, 2, 1, 1, False, False),
    lambda n: (3, 1, 3, 3, False, True),
    lambda n: (3, 1, 1, 1, True, False),
    lambda n: (3, 2, 1, 1, True, True),
    lambda n: (3, 1, n // 2, 1, True, False),       # circular padding growing with n
    lambda n: (3, 1, 1, n // 5, False, False),      # dilation growing with n
    lambda n: (3, 1, 1, n // 5, True, True),
    lambda n: (2, n // 3, 0, 1, False, False),      # stride growing with n
    lambda n: (4, n // 3, 2, n // 7, True, False),
]


def _count_work(monkeypatch, call):
    """Run ``call`` uncached and count ``_pattern`` calls and the representatives enumerated."""
    seen = {"patterns": 0, "reps": 0}
    pattern, positions = CG._pattern, CG.class_positions

    def counting_pattern(*args):
        seen["patterns"] += 1
        return pattern(*args)

    def counting_positions(*args):
        reps = positions(*args)
        seen["reps"] += len(reps)
        return reps

    monkeypatch.setattr(CG, "_pattern", counting_pattern)
    monkeypatch.setattr(CG, "class_positions", counting_positions)
    try:
        call()
    finally:
        monkeypatch.undo()
    return seen


@pytest.mark.parametrize("case", range(len(_WORK_CASES)))
def test_class_enumeration_work_does_not_grow_with_n(monkeypatch, case):
    work = {}
    for n in (1_000, 100_000):
        args = _WORK_CASES[case](n)
        work[n] = _count_work(monkeypatch, lambda: CG.dim_classes.__wrapped__(n, *args))
        assert work[n]["patterns"] <= 5 * 4 * 4 * 2 + 2  # cut points × residues, a few hundred at most
    assert work[1_000] == work[100_000]
    # same classes as well: only the interior counts grow
    small, large = (CG.dim_classes.__wrapped__(n, *_WORK_CASES[case](n)) for n in (1_000, 100_000))
    if case < 5:  # geometry independent of n
        assert small.n_cls == large.n_cls and small.rel == large.rel


@pytest.mark.parametrize("size", [(100_000,), (1_000, 1_000)], ids=["1d", "2d"])
@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=1, stride=2), dict(padding=3, dilation=3),
                                dict(padding=1, padding_mode="circular"), dict(padding=1, side="rows")],
                         ids=["pad1", "stride2", "dil3", "circular", "rows"])
def test_frame_plan_work_does_not_grow_with_n(monkeypatch, size, kw):
    kw = dict(kw)
    side = kw.pop("side", "cols")
    small = tuple(n // 100 for n in size)
    shape = (4, 4) + (3,) * len(size)

    def plan(sz):
        def call():
            CG.dim_classes.cache_clear()  # enumerate afresh (the tables are recomputed on demand)
            return CG.frame_plan("test", shape, sz, kw.get("stride", 1), kw.get("padding", 0),
                                 kw.get("dilation", 1), 1, kw.get("padding_mode", "zeros"), side, False, 1 << 40)
        out = {}
        seen = _count_work(monkeypatch, lambda: out.setdefault("plan", call()))
        return seen, out["plan"]

    (work_small, plan_small), (work_large, plan_large) = plan(small), plan(size)
    assert work_small == work_large
    # the same class grid, only the counts differ; they add up to the positions
    assert len(plan_small[3]) == len(plan_large[3]) and sum(plan_large[3]) == plan_large[4]
