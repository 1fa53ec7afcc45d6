"""Sharded weights: FSDP2 and DTensor parameters in the penalty ops, ``Regularizer`` and ``svb_``
(docs/distributed.md).

Every rank evaluates the same penalty on the same full weights, so the penalty is one replicated
number and its gradient with respect to a rank's shard is that rank's slice of the full gradient:
no communication in the backward. The forward gets the full weights in as few collectives as the
placements allow:

* ``gather``: the DTensors of one 1-D mesh, one dtype and device, sharded along any dim, go into
  buckets of at most ``BUCKET_BYTES``; each bucket is ONE ``all_gather_into_tensor`` of the
  ranks' flattened shards (padded to the largest shard, which is how ``torch.chunk`` splits them
  unevenly). ``Replicate`` needs nothing; other layouts (n-D meshes, ``Partial``) take DTensor's
  own ``full_tensor()``, one collective per tensor (correct, not bucketed).
* ``all_reduce_sum``: the partial Grams of layers for which reducing ``Gram`` moves fewer bytes
  than gathering the weight (``gram_route``), one ``all_reduce`` per bucket.
* ``svb_sharded``: each rank bounds a disjoint, cost-balanced subset of the layers. One
  ``all_to_all_single`` sends every shard to its layer's owner, another sends the bounded
  shards back: about 2·(world − 1)/world of the weights' bytes per rank.

``comm_counts()`` counts the collectives and bytes this module issued (per process), which the
tests and ``python -m regkernels.bench`` report. ``torch.distributed.tensor`` is never imported
here: a process that has DTensors has imported it already (importing it costs half a second).
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Sequence

import torch

__all__ = ["BUCKET_BYTES", "is_dtensor", "any_dtensor", "gather", "all_reduce_sum", "gram_route",
           "comm_counts", "reset_comm_counts", "accepts_sharded", "svb_sharded"]

# Largest bucket one collective moves (bytes of the gathered result): big enough that a
# ResNet-18's regularized weights (45 MB in float32) take one collective, small enough that the
# padded staging buffers stay a small fraction of a rank's memory.
BUCKET_BYTES = 64 << 20

_COUNTS = {"collectives": 0, "bytes": 0}


def comm_counts() -> dict[str, int]:
    """``{"collectives": n, "bytes": b}`` issued by regkernels in this process since the last
    ``reset_comm_counts()``; ``bytes`` is what this rank received (gathers, all-to-alls) or
    reduced (all-reduces), as the collective's ring algorithm moves it: ``(world − 1)/world`` of a
    gather's output, ``2·(world − 1)/world`` of an all-reduced buffer."""
    return dict(_COUNTS)


def reset_comm_counts() -> None:
    _COUNTS.update(collectives=0, bytes=0)


def _count(nbytes: float) -> None:
    _COUNTS["collectives"] += 1
    _COUNTS["bytes"] += int(nbytes)


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


def is_dtensor(x) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(x, dt)


def any_dtensor(xs) -> bool:
    dt = _dtensor_type()
    return dt is not None and any(isinstance(x, dt) for x in xs)


def stand_in(w: torch.Tensor) -> torch.Tensor:
    """For argument checks that read shapes, dtypes and devices only: ``w`` itself, or for a
    DTensor one element of its dtype on its device expanded to its global shape (DTensor's own
    views refuse some reshapes of unevenly sharded tensors, and nothing needs its values)."""
    if not is_dtensor(w):
        return w
    return w.to_local().new_zeros(1).expand(w.shape)


# ----------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------

class _Layout:
    """Where the pieces of a DTensor on a 1-D mesh live: ``dim`` (None for ``Replicate``) and,
    per rank, the length and offset of its piece along ``dim`` (``torch.chunk``'s split, which
    DTensor and FSDP2 use: ceil(n / world) rows each, the last ones shorter or empty)."""

    __slots__ = ("group", "world", "rank", "dim", "shape", "lengths", "offsets")

    def __init__(self, w):
        import torch.distributed as dist
        from torch.distributed.tensor import Replicate, Shard

        mesh = w.device_mesh
        self.group = mesh.get_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.shape = tuple(w.shape)
        (p,) = w.placements
        if isinstance(p, Replicate):
            self.dim, self.lengths, self.offsets = None, None, None
            return
        assert isinstance(p, Shard)
        self.dim = p.dim % w.dim()
        n = self.shape[self.dim]
        chunk = -(-n // self.world)
        self.offsets = [min(q * chunk, n) for q in range(self.world)]
        self.lengths = [min(chunk, n - off) for off in self.offsets]

    def local_shape(self, q: int) -> tuple[int, ...]:
        s = list(self.shape)
        s[self.dim] = self.lengths[q]
        return tuple(s)

    def local_numel(self, q: int) -> int:
        return math.prod(self.local_shape(q))

    def slot(self) -> int:
        """Elements of the padded per-rank slot: the largest piece."""
        return max(self.local_numel(q) for q in range(self.world))

    def assemble(self, flat_pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, flattened (``flat_pieces[q]``: rank q's
        ``local_numel(q)`` elements)."""
        return torch.cat([flat_pieces[q].view(self.local_shape(q)) for q in range(self.world)], dim=self.dim)

    def piece(self, full: torch.Tensor, q: int) -> torch.Tensor:
        """Rank q's piece of a full tensor."""
        return full.narrow(self.dim, self.offsets[q], self.lengths[q])


def layout(w) -> _Layout | None:
    """The layout of ``w`` when this module moves it itself (a DTensor on a 1-D mesh, placed
    ``Shard(d)`` or ``Replicate``), else None (DTensor's own redistribution moves it)."""
    from torch.distributed.tensor import Replicate, Shard

    # exact types: Shard's subclasses (_StridedShard) interleave their pieces differently
    if w.device_mesh.ndim != 1 or type(w.placements[0]) not in (Shard, Replicate):
        return None
    lay = _Layout(w)
    if lay.dim is not None and tuple(w.to_local().shape) != lay.local_shape(lay.rank):
        return None  # not torch.chunk's split: DTensor's own redistribution knows it
    return lay


# ----------------------------------------------------------------------------------------
# gathering full weights (differentiable)
# ----------------------------------------------------------------------------------------

# How long ``_collective`` waits for gloo's worker thread to let go of a finished collective's
# tensors (it takes microseconds; the bound only keeps a wedged backend from hanging a call).
SETTLE_S = 5.0


def _gloo_runs(group, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether gloo carries a collective on ``tensors`` in ``group`` ("gloo", or "cpu:gloo" of a
    mixed backend such as "cpu:gloo,cuda:nccl" for CPU tensors)."""
    import torch.distributed as dist

    name = str(dist.get_backend(group))
    return bool(tensors) and (name == "gloo" or f"{tensors[0].device.type}:gloo" in name.split(","))


def _collective(group, call: Callable[[], object], *tensors: torch.Tensor) -> None:
    """``call()``, a blocking collective on ``tensors``; returns once the backend holds none of them.

    gloo's worker thread drops its references to a finished collective's tensors a moment AFTER
    the caller's wait returns. When that is the last C++ reference of a tensor with a Python
    object, the thread takes the GIL to release it; if the interpreter is already finalizing (the
    collective was a script's last), the thread is killed inside a destructor and the process
    aborts ("terminate called without an active exception", SIGABRT). Measured on ``svb_``'s
    all-to-all: about 1 exit in 8 crashed. Waiting until each tensor's reference count is back
    to what it was before the call makes every exit clean; the wait is microseconds. NCCL's work
    objects are released by its watchdog, on CUDA tensors, and are not waited for here."""
    import time

    gloo = _gloo_runs(group, tensors)
    before = [t._use_count() for t in tensors] if gloo else []
    call()
    deadline = time.monotonic() + SETTLE_S
    while any(t._use_count() > n for t, n in zip(tensors, before)) and time.monotonic() < deadline:
        time.sleep(0)  # releases the GIL, which the worker may need to drop its references


def _all_gather_single(out: torch.Tensor, buf: torch.Tensor, group) -> None:
    import torch.distributed as dist

    # all_gather_single is all_gather_into_tensor's newer name (the old one warns since torch 2.10)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _collective(group, lambda: gather(out, buf, group=group), out, buf)


class _GatherBucket(torch.autograd.Function):
    """Full tensors from every rank's pieces, ONE all_gather_into_tensor. The backward is this
    rank's slice of each full gradient: the penalty is the same number on every rank (each
    evaluates it on the same full weights), so its gradient with respect to a rank's piece is
    that piece of the full gradient, with nothing to reduce."""

    @staticmethod
    def forward(ctx, layouts, *pieces):
        ctx.layouts = layouts
        lay0 = layouts[0]
        slots = [lay.slot() for lay in layouts]
        total = sum(slots)
        buf = pieces[0].new_empty(total)  # the padding of each slot is never read
        off = 0
        for piece, s in zip(pieces, slots):
            buf[off:off + piece.numel()] = piece.reshape(-1)
            off += s
        out = buf.new_empty(lay0.world * total)
        _all_gather_single(out, buf, lay0.group)
        _count(out.numel() * out.element_size() * (lay0.world - 1) / lay0.world)
        out = out.view(lay0.world, total)
        fulls = []
        off = 0
        for lay, s in zip(layouts, slots):
            fulls.append(lay.assemble([out[q, off:off + lay.local_numel(q)] for q in range(lay.world)]))
            off += s
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(None if g is None else lay.piece(g, lay.rank).contiguous()
                        for lay, g in zip(ctx.layouts, grads)))


def _buckets(items: list[tuple[int, object]], size_of: Callable, limit: int) -> list[list[tuple[int, object]]]:
    """Consecutive runs of ``items`` whose ``size_of`` sum stays ≤ ``limit`` (one item may exceed it)."""
    out: list[list] = []
    used = limit + 1
    for it in items:
        s = size_of(it)
        if out and used + s <= limit:
            out[-1].append(it)
            used += s
        else:
            out.append([it])
            used = s
    return out


def gather(weights: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[torch.Tensor]:
    """The full tensors of ``weights`` (plain tensors pass through), differentiable: gradients reach
    each DTensor as its own sharded gradient. The DTensors of one mesh, dtype and device, sharded
    along any dim, are gathered in buckets of at most ``bucket_bytes`` (one collective each);
    replicated ones need nothing; other layouts take ``full_tensor()``. Every rank must call it
    with the same list (collectives)."""
    out: list = list(weights)
    if torch.compiler.is_compiling() or not any_dtensor(out):
        return out
    groups: dict[tuple, list[tuple[int, _Layout]]] = {}
    for i, w in enumerate(weights):
        if not is_dtensor(w):
            continue
        lay = layout(w)
        if lay is None:
            out[i] = w.full_tensor()
            _count(w.numel() * w.element_size())
        elif lay.dim is None:
            out[i] = w.to_local()
        else:
            groups.setdefault((id(lay.group), w.dtype, w.device), []).append((i, lay))
    for members in groups.values():
        world = members[0][1].world
        for bucket in _buckets(members, lambda it: it[1].slot() * world * weights[it[0]].element_size(),
                               bucket_bytes):
            fulls = _GatherBucket.apply(tuple(lay for _, lay in bucket), *(weights[i].to_local() for i, _ in bucket))
            for (i, _), f in zip(bucket, fulls):
                out[i] = f
    return out


# ----------------------------------------------------------------------------------------
# reducing partial Grams (differentiable)
# ----------------------------------------------------------------------------------------

class _AllReduceBucket(torch.autograd.Function):
    """The sum over ranks of each rank's tensors, ONE all_reduce. Backward: the identity (the
    loss built on the sum is the same on every rank, so each rank's summand gets the gradient
    of the sum, with nothing to reduce)."""

    @staticmethod
    def forward(ctx, group, world, *parts):
        import torch.distributed as dist

        flat = torch.cat([p.reshape(-1) for p in parts])
        _collective(group, lambda: dist.all_reduce(flat, group=group), flat)
        _count(flat.numel() * flat.element_size() * 2 * (world - 1) / world)
        return tuple(v.view_as(p) for v, p in zip(flat.split([p.numel() for p in parts]), parts))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *grads)


def all_reduce_sum(parts: Sequence[torch.Tensor], group, world: int,
                   bucket_bytes: int = BUCKET_BYTES) -> list[torch.Tensor]:
    """``Σ_ranks parts[i]`` for every i (same shapes on every rank), one all_reduce per bucket."""
    out: list[torch.Tensor] = []
    for bucket in _buckets(list(enumerate(parts)), lambda it: it[1].numel() * it[1].element_size(), bucket_bytes):
        out += _AllReduceBucket.apply(group, world, *(p for _, p in bucket))
    return out


def gram_route(w, side: str) -> _Layout | None:
    """The layout of ``w`` when the Gram ``side`` of ``as_matrix(w)`` (groups = 1) is the sum of
    the ranks' partial Grams AND reducing it moves fewer bytes than gathering ``w``, else None.

    ``Wᵀ W`` ("cols", n×n) sums over rows: a partition of the output channels (``Shard(0)``,
    FSDP2's placement); ``W Wᵀ`` ("rows", m×m) sums over columns: any other sharded dim. A ring
    all-reduce moves 2·k² per rank, a gather the m·n entries of the weight (each times
    (world − 1)/world): the Gram goes when 2·k² < m·n, i.e. when the Gram is under half the
    weight's size (e.g. 1×1 convs that widen, the first conv of an image network).
    """
    if not is_dtensor(w):
        return None
    lay = layout(w)
    if lay is None or lay.dim is None:
        return None
    return lay if _gram_route_for((w.shape[0], math.prod(w.shape[1:])), lay, side) else None


def _gram_route_for(shape: tuple[int, int], lay, side: str) -> bool:
    """``gram_route``'s rule for an ``(m, n)`` matrix sharded along ``lay.dim`` of its weight."""
    m, n = shape
    if (side == "cols") != (lay.dim == 0):
        return False
    k = n if side == "cols" else m
    return 2 * k * k < m * n


# ----------------------------------------------------------------------------------------
# the public ops on DTensor inputs
# ----------------------------------------------------------------------------------------

def accepts_sharded(fn: Callable) -> Callable:
    """``fn`` (a public op whose first argument is a tensor or a list of tensors) taking DTensor
    inputs: they are gathered (``gather``; one collective per bucket) and ``fn`` runs on the full
    tensors, on every rank; its results are ordinary, replicated tensors. Not under
    ``torch.compile`` (the op's own refusal of a DTensor stands there)."""

    name = next(iter(inspect.signature(fn).parameters))  # the tensor argument, also by keyword

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _dtensor_type() is None or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        first = args[0] if args else kwargs.get(name)
        if is_dtensor(first):
            first = gather([first])[0]
        elif isinstance(first, (list, tuple)) and any_dtensor(first):
            first = gather(list(first))
        else:
            return fn(*args, **kwargs)
        if args:
            return fn(first, *args[1:], **kwargs)
        return fn(**{**kwargs, name: first})

    return wrapper


# ----------------------------------------------------------------------------------------
# distributed SVB
# ----------------------------------------------------------------------------------------

def _svb_cost(t, operator: bool, input_size_of: Callable) -> float:
    """Flops of one layer's SVB, up to a constant: m·n·min(m, n) per matrix (the Jacobi sweeps), per
    frequency for a conv operator."""
    w = t.weight
    if operator and w.dim() > 2:
        o, c = w.shape[0] // t.groups, w.shape[1]
        return t.groups * math.prod(input_size_of(t)) * o * c * min(o, c)
    m, n = w.shape[0] // t.groups, math.prod(w.shape[1:])
    return t.groups * m * n * min(m, n)


def _owners(costs: list[float], world: int) -> list[int]:
    """Longest-processing-time assignment: the costliest layer first, each to the least loaded rank
    (ties to the lowest rank), so every rank computes the same answer."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        q = min(range(world), key=lambda r: (load[r], r))
        owner[i] = q
        load[q] += costs[i]
    return owner


def _exchange(group, send: list[list[torch.Tensor]], recv_numels: list[int], like: torch.Tensor) -> list[torch.Tensor]:
    """One all_to_all_single: ``send[q]`` (flattened, concatenated) goes to rank q; returns what
    each rank q sent here (``recv_numels[q]`` elements), as flat tensors."""
    import torch.distributed as dist

    flat = [torch.cat([t.reshape(-1) for t in ts]) if ts else like.new_empty(0) for ts in send]
    inp = torch.cat(flat)
    out = like.new_empty(sum(recv_numels))
    _collective(group, lambda: dist.all_to_all_single(out, inp, recv_numels, [f.numel() for f in flat], group=group),
                out, inp)
    _count((out.numel() - recv_numels[dist.get_rank(group)]) * out.element_size())
    return list(out.split(recv_numels))


def svb_sharded(targets: list, run: Callable[[list], tuple[int, list]], operator: bool,
                input_size_of: Callable) -> tuple[int, list]:
    """SVB of ``targets`` (``regkernels.reference.svd.SVBTarget`` named tuples: this module imports no
    other regkernels module, so it is handed them) some of whose weights are DTensors
    on 1-D meshes: returns ``(count, updates)`` as ``run`` does; the updates of the DTensor layers
    write their local pieces (nothing is written here: the caller writes every update once all
    exist, so an error anywhere leaves every weight as it was).

    ``run(targets) → (count, [(target, new full weight)])`` bounds plain targets (the caller's
    ``_svb_matrices`` / ``_svb_operators``). Each sharded layer has one owner rank (cost-balanced,
    ``_owners``): every rank sends its piece to the owner (one all_to_all_single per mesh, dtype
    and device), the owner bounds the full weight with ``run`` (so the numbers are one process's),
    and sends every rank its new piece back (a second all_to_all_single). A replicated DTensor is
    bounded by every rank on its local copy (no bytes to move); a DTensor on an n-D mesh by every
    rank on its full value (``full_tensor()``, one collective each), keeping its own piece.
    ``count`` is every layer's, on every rank.
    """
    plain, sharded = [], {}
    for t in targets:
        if not is_dtensor(t.weight):
            plain.append(t)
            continue
        if t.module is not None and not isinstance(t.weight, torch.nn.Parameter):
            raise ValueError(f"svb_: layer {t.layer!r} has a parametrized DTensor weight; svb_ bounds sharded "
                             "weights that are plain parameters")
        if any(p.is_partial() for p in t.weight.placements):
            raise ValueError(f"svb_: layer {t.layer!r} has a DTensor weight with placements {t.weight.placements}; a "
                             "Partial weight holds summands, not pieces of the weight: redistribute it to Shard or "
                             "Replicate placements first")
        lay = layout(t.weight)
        if lay is None:
            # n-D meshes (HSDP, FSDP x TP): every rank bounds the full weight (DTensor's own gather)
            # and keeps its piece, cut locally by distribute_tensor without communication
            plain.append(t._replace(weight=t.weight.full_tensor(), write=_write_piece(t.weight)))
            _count(t.weight.numel() * t.weight.element_size())
            continue
        if lay.dim is None:
            local = t.weight.to_local()
            plain.append(t._replace(weight=local, module=None, write=local.copy_))
        else:
            sharded.setdefault((id(lay.group), t.weight.dtype, t.weight.device), []).append((t, lay))
    count, updates = run(plain) if plain else (0, [])
    for members in sharded.values():
        n, pieces = _svb_mesh(members, run, operator, input_size_of)
        count += n
        updates += pieces
    return count, updates


def _write_piece(w) -> Callable[[torch.Tensor], None]:
    """``write(new full value)`` for DTensor ``w``: its local piece of ``new``, no communication."""
    from torch.distributed.tensor import distribute_tensor

    def write(new: torch.Tensor) -> None:
        w.to_local().copy_(distribute_tensor(new, w.device_mesh, w.placements, src_data_rank=None).to_local())

    return write


def _svb_mesh(members: list, run: Callable, operator: bool, input_size_of: Callable) -> tuple[int, list]:
    """``svb_sharded`` for the sharded layers of one mesh, dtype and device; returns their count
    and, per layer, ``(target writing its local piece, new piece)``: written by the caller with
    the other updates, after every new value exists (an error in a later layer, mesh or
    parametrized write leaves the sharded weights unchanged too)."""
    group, world, rank = members[0][1].group, members[0][1].world, members[0][1].rank
    owner = _owners([_svb_cost(t, operator, input_size_of) for t, _ in members], world)
    like = members[0][0].weight.to_local()
    # to each owner q: my pieces of q's layers, in layer order
    send = [[t.weight.to_local() for (t, _), o in zip(members, owner) if o == q] for q in range(world)]
    mine = [i for i, o in enumerate(owner) if o == rank]
    recv = [sum(members[i][1].local_numel(q) for i in mine) for q in range(world)]
    got = _exchange(group, send, recv, like)
    fulls: dict[int, torch.Tensor] = {}
    offs = [0] * world
    for i in mine:
        lay = members[i][1]
        parts = []
        for q in range(world):
            n = lay.local_numel(q)
            parts.append(got[q][offs[q]:offs[q] + n])
            offs[q] += n
        fulls[i] = lay.assemble(parts)
    new: dict[int, torch.Tensor] = dict(fulls)

    def keep(i: int) -> Callable:
        return lambda value: new.__setitem__(i, value)

    _, updates = run([members[i][0]._replace(weight=fulls[i], write=keep(i)) for i in mine])
    for t, value in updates:
        t.write(value)
    # back: rank q gets its piece of every layer I own (unchanged layers too: the owner alone
    # knows which changed, and a second message to say so would cost a collective)
    back = [[members[i][1].piece(new[i], q) for i in mine] for q in range(world)]
    recv_back = [sum(members[i][1].local_numel(rank) for i, o in enumerate(owner) if o == q) for q in range(world)]
    got_back = _exchange(group, back, recv_back, like)
    offs = [0] * world
    pieces = []
    for i, ((t, lay), o) in enumerate(zip(members, owner)):
        n = lay.local_numel(rank)
        piece = got_back[o][offs[o]:offs[o] + n].view(lay.local_shape(rank))
        offs[o] += n
        local = t.weight.to_local()
        # module=None: a plain copy into the local piece (sharded weights are plain parameters)
        pieces.append((t._replace(weight=local, module=None, write=local.copy_), piece))
    # svb_'s count: one per group of every layer, matrix or operator (the owners' own counts
    # cover their subsets only)
    return sum(t.groups for t, _ in members), pieces
