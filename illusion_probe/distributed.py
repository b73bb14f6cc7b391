"""Many processes under ``torchrun``: which process this is, the rows it takes, and how processes combine.

Every stage runs unchanged in one process. Under ``torchrun`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), :func:`world` joins the process group, creating it
if the user's script has not: ``gloo`` for CPU tensors and, where CUDA is available, ``nccl`` for CUDA
tensors, each process on GPU ``LOCAL_RANK``. Each stage then takes a disjoint shard of the sequences and
combines through the helpers here, so that every process ends with the whole answer:

- :func:`all_reduce`: sums of tensors, e.g. PCA's moments and gradients;
- :func:`all_gather`: every process's named tensors and JSON metadata, e.g. k-means samples, fitted
  states and evaluation tables. Tensors travel as safetensors bytes: nothing is ever unpickled.

A collective that fails because another process died raises :class:`PeerFailed`: the process that
failed prints its own error, and of the others only the main process adds that it stopped.
A process that hangs makes the others fail after ``ILLUSION_PROBE_TIMEOUT_S`` seconds (default 300).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from illusion_probe.errors import IllusionProbeError, require

#: Seconds a collective waits for the other processes before the run fails.
TIMEOUT_ENV = "ILLUSION_PROBE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


class PeerFailed(IllusionProbeError):
    """Another process of the run failed, so this one stops; that process reports the cause."""


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes: ``rank`` 0 is the main one, which writes artefacts."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def block(self, n: int) -> slice:
        """This process's contiguous share of ``n`` items in order (sizes differ by at most one)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def interleaved(self, n: int) -> slice:
        """Items ``rank, rank + size, ...`` of ``n``: an even share of a list sorted by cost."""
        return slice(self.rank, n, self.size)


def log(message: str) -> None:
    """A progress line on the terminal (stderr), from the main process only."""
    if world().is_main:
        print(f"[illusion-probe] {message}", file=sys.stderr, flush=True)


def launched() -> bool:
    """Whether a launcher such as ``torchrun`` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_cuda_device() -> str:
    """``cuda:LOCAL_RANK`` under a launcher (one GPU per process), else ``cuda``."""
    return f"cuda:{os.environ['LOCAL_RANK']}" if launched() and "LOCAL_RANK" in os.environ else "cuda"


def world() -> World:
    """This process's :class:`World`: the process group's when there is one (joined here from the launcher's
    environment if the user has not), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if not launched():
        return World()
    require(dist.is_available(), "WORLD_SIZE > 1, but this torch build has no torch.distributed; run one process")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as err:
        raise IllusionProbeError(f"could not join the torchrun process group ({str(err).splitlines()[0]}); "
                                 "check MASTER_ADDR, MASTER_PORT and that every process was started") from None
    return World(dist.get_rank(), dist.get_world_size())


def timeout_s() -> float:
    """How long a collective waits for the other processes (``ILLUSION_PROBE_TIMEOUT_S``, default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    require(value > 0, f"{TIMEOUT_ENV}={raw!r}: give the seconds a process waits for the others, e.g. 300")
    return value


def _collective(call: Callable[[], T]) -> T:
    """Run a collective: a peer that died becomes :class:`PeerFailed`, one that did not answer in time an error
    naming the timeout (the process that hangs will not say why)."""
    try:
        return call()
    except RuntimeError as err:  # torch.distributed.DistError and gloo's transport errors are RuntimeErrors
        if "timed out" in str(err).lower() or "timeout" in str(err).lower():
            raise IllusionProbeError(f"another process did not answer within {TIMEOUT_ENV}={timeout_s():g} s: it "
                                     f"hung or fell far behind; raise {TIMEOUT_ENV} if its work is uneven") from None
        raise PeerFailed(f"process {dist.get_rank()} stopped: another process failed "
                         f"({str(err).splitlines()[0][:200]})") from None


def all_reduce(tensor: Tensor) -> Tensor:
    """Replace ``tensor`` by its sum over every process, in place; returns it."""
    if world().is_distributed:
        _collective(lambda: dist.all_reduce(tensor))
    return tensor


def sum_gradients(parameters: list[Tensor], extra: Tensor) -> Tensor:
    """Sum the gradients of ``parameters`` over every process, in place, and ``extra`` (a float tensor that rides
    along in the same all-reduce, e.g. the loss); returns the summed ``extra``. What ``DistributedDataParallel``
    does after ``backward``, in one call, with no hook left on the parameters."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = all_reduce(torch.cat([*(g.reshape(-1) for g in grads), extra.detach().reshape(-1).to(grads[0])]))
    start = 0
    for grad in grads:
        grad.copy_(flat[start:start + grad.numel()].view_as(grad))
        start += grad.numel()
    return flat[start:].view_as(extra)


def broadcast(tensor: Tensor) -> Tensor:
    """Replace ``tensor`` by the main process's, in place; returns it."""
    if world().is_distributed:
        _collective(lambda: dist.broadcast(tensor, src=0))
    return tensor


def barrier() -> None:
    """Wait until every process gets here."""
    if world().is_distributed:
        _collective(dist.barrier)


def all_gather(tensors: Mapping[str, Tensor], meta: Any = None) -> list[tuple[dict[str, Tensor], Any]]:
    """Every process's ``(tensors, meta)`` in rank order, this one's included; tensors come back on the CPU.

    ``meta`` is anything JSON can hold. Alone, this is ``[(tensors on the CPU, meta)]``.
    """
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if not world().is_distributed:
        return [(cpu, meta)]
    payload = save_tensors(cpu, metadata={"meta": json.dumps(meta)})
    size = torch.tensor([len(payload)], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    _collective(lambda: dist.all_gather(sizes, size))
    longest = int(max(sizes))
    buffer = torch.zeros(longest, dtype=torch.uint8)
    buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    buffers = [torch.empty_like(buffer) for _ in sizes]
    _collective(lambda: dist.all_gather(buffers, buffer))
    return [_decode(bytes(b[: int(n)].numpy())) for b, n in zip(buffers, sizes, strict=True)]


def _decode(payload: bytes) -> tuple[dict[str, Tensor], Any]:
    header = json.loads(payload[8: 8 + int.from_bytes(payload[:8], "little")])
    return load_tensors(payload), json.loads(header["__metadata__"]["meta"])


@contextmanager
def checked_together() -> Iterator[None]:
    """Checks that every process makes alike (inputs, configuration): a problem any process finds in the block
    is raised on every process once all have checked, and printed once (see :func:`agree`)."""
    problem = None
    try:
        yield
    except IllusionProbeError as err:
        problem = err
    agree(problem)


def agree(error: IllusionProbeError | None) -> None:
    """Raise the first process's error on every process, if any process met one (call on every process).

    For checks that every process makes (inputs, configuration): the main process raises the error to report
    it; the others raise :class:`PeerFailed`, so that it is printed once.
    """
    if not world().is_distributed:
        if error is not None:
            raise error
        return
    found = [meta for _, meta in all_gather({}, None if error is None else str(error)) if meta is not None]
    if not found:
        return
    if world().is_main:
        raise error if error is not None else IllusionProbeError(found[0])
    raise PeerFailed(found[0])


def gather_interleaved(parts: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """Whole ``[n, ...]`` tensors from every process's rows ``rank, rank + size, ...`` (:meth:`World.interleaved`).

    ``parts`` maps names to this process's rows; a name a process lacks leaves its rows zero. Alone, ``parts``.
    """
    here = world()
    if not here.is_distributed:
        return dict(parts)
    whole: dict[str, Tensor] = {}
    for rank, (tensors, _) in enumerate(all_gather(parts)):
        for name, rows in tensors.items():
            if name not in whole:
                whole[name] = rows.new_zeros((n, *rows.shape[1:]))
            whole[name][rank::here.size] = rows
    return whole
