"""The rows of W a step uses, chosen from the step's labels alone, and their gathering.

A step's row selection needs only the labels (gathered over the group) and the sampling stream, not the
embeddings. ``PartialFC.prefetch(labels)`` therefore makes it before the backbone's forward, and with a
separately stored W (host memory) it gathers the rows on a worker thread, into the compute buffer on a
side stream of the compute device, while the caller runs the backbone; ``forward(embeddings, labels)``
with the same labels tensor waits for it and goes on. Without a prefetch the same functions run inline
at the start of the forward. Both orders draw the same samples and give the same bits.

Ordering: the selection's kernels are queued on the compute device's current stream; the side stream
first waits for them (so the row ids are ready), then the worker copies the ids to the storage device,
gathers there and copies the rows over; the forward makes its current stream wait for the side stream.
On CPU the streams are torch.cpu's no-op streams, so the same code runs (and is tested) here.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from largefr.heads.workspace import Lease


@dataclass
class RowSelection:
    """One step's selection: the labels it was made for, and (once gathered) this rank's rows.

    labels: the caller's local labels tensor (a prefetch is used only by a forward given this very
        tensor); ids: local W row ids (None: every row, in place);
    cols: each global row's target column (-1 where another rank owns it); rows / inv_norm: the W rows
    [R, D] and 1/||row|| (None when not normalised); leases: the workspace slots they live in.
    """

    labels: torch.Tensor
    ids: torch.Tensor | None
    cols: torch.Tensor
    rows: torch.Tensor
    inv_norm: torch.Tensor | None
    leases: tuple[Lease, ...] = ()
    pending: Future[None] | None = field(default=None, repr=False)
    stream: object | None = field(default=None, repr=False)

    def wait(self) -> "RowSelection":
        """Block until the rows are gathered; the caller's stream then orders after the gather."""
        if self.pending is not None:
            self.pending.result()  # re-raises what the worker raised
            self.pending = None
            device = self.rows.device
            torch.get_device_module(device).current_stream().wait_stream(self.stream)  # type: ignore[arg-type]
        return self


class RowGatherer:
    """Runs a gather inline, or on one worker thread and a side stream of the compute device."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, object] = {}

    def start(self, gather: Callable[[], None], device: torch.device) -> tuple[Future[None], object]:
        """Submit ``gather`` after the work already queued on ``device``'s current stream."""
        module = torch.get_device_module(device)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = module.Stream(device=device) if device.type != "cpu" else module.Stream()
        stream.wait_stream(module.current_stream())  # type: ignore[attr-defined]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="largefr-rows")

        def run() -> None:
            with module.stream(stream):
                gather()

        return self._executor.submit(run), stream

    def __getstate__(self) -> dict[str, object]:  # deep copies and pickles of the head carry no thread
        return {"_executor": None, "_streams": {}}
