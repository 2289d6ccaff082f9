"""Timing of benchmark steps (benchmarks/model.py, profile_step.py): points on the device's stream
or the host clock, and the calls that bracket falqon.attach's proxy update in an optimizer step."""

from __future__ import annotations

import time

import torch


class Stamp:
    """A point in time on the device's stream (a CUDA event) or on the host clock (CPU)."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.t = None

    def record(self):
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()
        return self

    def ms_to(self, later: "Stamp") -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event)
        return (later.t - self.t) * 1e3


class AttachBracket:
    """Calls around falqon.attach's optimizer post-hook: hooks run in the order they were
    registered, so `before` (registered before attach()) and `after` (registered after it)
    bracket the proxy update of every optimizer step."""

    def __init__(self, optimizer, attach, before, after):
        self.handles = [optimizer.register_step_post_hook(lambda *_: before())]
        self.attach_handle = attach()
        self.handles.append(optimizer.register_step_post_hook(lambda *_: after()))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.attach_handle.remove()


class UpdateTimer(AttachBracket):
    """Device time of each proxy update (falqon.attach's hook), as (start, end) Stamp pairs."""

    def __init__(self, optimizer, device, attach):
        self.pairs, self._start = [], None
        super().__init__(optimizer, attach, self._before, self._after)
        self.device = device

    def _before(self):
        self._start = Stamp(self.device).record()

    def _after(self):
        self.pairs.append((self._start, Stamp(self.device).record()))
