"""The ring of ranks that the distributed losses pass blocks round, point to point.

One :class:`Ring` serves both losses: the CLIP ring (blocks travel one way,
statistics and accumulators one step behind them) and the SigLIP exchange
(blocks both ways round, accumulators sent home from several places away).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Ring:
    """A process group, this rank's place in it, and the rows each rank holds
    (the global batch's layout, in rank order; empty when no loss needs it)."""

    group: object  # a ProcessGroup, or None for the default group
    rank: int
    size: int
    sizes: tuple = ()

    @classmethod
    def of(cls, group, sizes: tuple = ()) -> "Ring":
        return cls(group, dist.get_rank(group), dist.get_world_size(group), tuple(sizes))

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Index of this rank's first row in the global batch."""
        return sum(self.sizes[: self.rank])

    def visiting(self, step: int) -> int:
        """The rank whose block this rank holds at step ``step`` of a one-way ring."""
        return (self.rank - step) % self.size

    def peer(self, offset: int) -> int:
        """The global rank ``offset`` places along the ring (what P2P ops address)."""
        group_rank = (self.rank + offset) % self.size
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def start(self, sends: list[tuple[Tensor, int]], receives: list[tuple[Tensor, int]]):
        """Post ``(tensor, offset)`` sends and receives (into the given buffers) at once.
        Every rank posts the same pattern, so each pair of ranks sees its messages
        in the same order on both sides (NCCL matches in order, ignoring tags)."""
        ops = [dist.P2POp(dist.isend, t, self.peer(k), self.group) for t, k in sends]
        ops += [dist.P2POp(dist.irecv, t, self.peer(k), self.group) for t, k in receives]
        return Pending(dist.batch_isend_irecv(ops) if ops else [], [t for t, _ in sends],
                       [t for t, _ in receives])


class Pending:
    """Messages in flight; :meth:`wait` returns the received tensors."""

    def __init__(self, requests, sent, received):
        self._requests, self._sent, self._received = requests, sent, received

    def wait(self) -> list[Tensor]:
        for request in self._requests:
            request.wait()
        self._sent = None  # the send buffers may be freed now
        return self._received


class Slots:
    """Receive buffers reused by every step of a ring, taken in turn: with two, one
    is computed on while the other fills. A ring allocates a fixed number of
    them, whatever W (and keeps the allocator from growing with W)."""

    def __init__(self, count: int, numel: int, like: Tensor, dtype: torch.dtype | None = None):
        self._flat = [like.new_empty(numel, dtype=dtype or like.dtype) for _ in range(count)]

    def take(self, step: int, *shape: int) -> Tensor:
        numel = shape[0] * shape[1]
        return self._flat[step % len(self._flat)][:numel].view(*shape)


class RankFacts:
    """The facts each rank shared (one row per rank, the same table on every rank),
    for errors raised identically on every rank, so that none waits on a collective
    the others left. Raises at once when a rank found its own inputs invalid."""

    def __init__(self, table: list):
        bad = [q for q, row in enumerate(table) if not row["ok"]]
        if bad:
            raise ValueError(f"mmkernels.distributed: the inputs of rank(s) {bad} are invalid (the "
                             "error raised there says why); every rank of the group stops")
        self.table = table

    @classmethod
    def share(cls, facts, scale, fields, device, group, error) -> "RankFacts":
        """All-gather this rank's ``facts`` (numbers, then the logit scale as a tensor:
        no device sync) as a table of ``fields``, one row per rank; then raise this
        rank's own ``error`` (its peers learn of it from its row of zeros) or the
        group's. ``facts``/``scale`` are unused when ``error`` is set."""
        if error is None:
            mine = torch.cat([torch.tensor(facts, dtype=torch.float64, device=device),
                              scale.detach().to(torch.float64).reshape(1)])
        else:
            mine = torch.zeros(len(fields), dtype=torch.float64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        table = [dict(zip(fields, row)) for row in torch.stack(gathered).cpu().tolist()]
        if error is not None:
            raise error
        return cls(table)

    def per_rank(self, field, show=lambda v: v) -> str:
        return ", ".join(f"rank {q}: {show(row[field])}" for q, row in enumerate(self.table))

    def differs(self, field) -> bool:  # NaN (a non-finite logit_scale) equals NaN here
        return len({row[field] if row[field] == row[field] else "nan" for row in self.table}) > 1
