"""Data-parallel runs under ``torchrun`` (torch.distributed): every rank takes a disjoint share of the work.

``torchrun --nproc-per-node 8 -m safetyneurons contrast ...`` starts 8 processes; each loads the pair on its
own device (``--device cuda``: GPU ``LOCAL_RANK``; ``--device cpu``: the gloo backend) and takes every 8th
batch. ``contrast`` adds the float64 change-score sums of all ranks' batches in batch order
(:class:`OrderedSum`, so the scores are bitwise those of one process) and the token counts with ``all_reduce``;
``extract`` has every rank write its own shards (shard ``i`` belongs to rank ``i % world``) and rank 0 writes
the one manifest, so the store is byte-identical to a single-process run. Outside torchrun (no
``WORLD_SIZE`` above 1 in the environment) every helper here is a no-op for a single process.

``--device auto`` (``device_map="auto"``) is the other way to scale: one model spread over several GPUs in
one process, for a model larger than one GPU.
"""

from __future__ import annotations

import atexit
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from safetyneurons.errors import UserError


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA). False outside torchrun."""
    if not launched() or _dist() is not None:
        return _dist() is not None
    if device == "auto":
        raise UserError("--device auto spreads one model over all GPUs of one process; under torchrun give "
                        "--device cuda (one GPU per rank) or --device cpu.")
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA GPU is available. Use --device cpu.")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend=backend)
    atexit.register(finish)
    return True


def finish() -> None:
    """Leave the process group (at exit)."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def share(items: list) -> list:
    """This rank's items: every ``world``-th one, starting at ``rank`` (all of them outside a group)."""
    rank, size = world()
    return items[rank::size]


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over ranks, in place (no-op for a single process)."""
    dist = _dist()
    if dist is not None:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast(obj: Any) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (sent as JSON text)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [json.dumps(obj)]
    dist.broadcast_object_list(box, src=0)
    return json.loads(box[0])


def gather(obj: Any) -> list:
    """Every rank's JSON-able ``obj``, in rank order, on every rank (sent as JSON text)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, json.dumps(obj))
    return [json.loads(x) for x in out]


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


class OrderedSum:
    """Per-batch tensors of all ranks added one by one in batch order: bitwise the single-process running sum
    ``((0 + t_0) + t_1) + ...`` (an ``all_reduce`` of per-rank sums adds in another order, equal only to rounding).

    Batches go out round-robin (:func:`share`: batch ``j * world + r`` is rank ``r``'s ``j``-th), so every rank
    calls :meth:`add` once per round, with its batch's tensor or ``None`` when it has none left; each round
    gathers ``world`` tensors, so memory stays at ``world`` batch sums whatever the number of batches.
    """

    def __init__(self, like: "torch.Tensor") -> None:
        import torch

        self.total = torch.zeros_like(like)

    def add(self, part: "torch.Tensor | None") -> None:
        import torch

        dist = _dist()
        if dist is None:
            if part is not None:
                self.total += part
            return
        has = torch.tensor([part is not None], dtype=torch.float64, device=self.total.device)
        part = torch.zeros_like(self.total) if part is None else part.to(self.total.device)
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        flags = [torch.empty_like(has) for _ in parts]
        dist.all_gather(parts, part.contiguous())
        dist.all_gather(flags, has)
        for t, flag in zip(parts, flags):  # rank order = batch order within a round
            if bool(flag.item()):
                self.total += t

    @staticmethod
    def rounds(n_batches: int) -> int:
        """Rounds of :meth:`add` calls every rank makes for ``n_batches`` batches shared round-robin."""
        return -(-n_batches // world()[1])
