"""Memory before allocation: how much a run will need, how much the machine has.

Runs, sweeps and inversions add up what they will allocate (latents, the UNet's largest
activations, explicit cross-attention, the attention record, the controller's tables,
decoding) and refuse, with the estimate, when it exceeds the memory available, before
anything is allocated. The estimates count what certainly will be allocated, so a refusal
is never wrong by much; a run that passes may still need more (other programs, the
allocator's caches).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NotEnoughMemory", "MemoryEstimate", "available_memory", "format_bytes"]


class NotEnoughMemory(ValueError):
    """A run, sweep or inversion would need more memory than the device has (raised
    before anything is allocated; the message gives the estimate and what to change)."""


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 kB"`` (powers of 1000, as disks and `free -h --si` count)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} PB"  # unreachable; keeps type checkers content


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """What a container's memory limit leaves (cgroup v2, then v1), or None."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on ``device`` now, or None when unknown (then nothing is
    refused). CPU: the smaller of the kernel's MemAvailable and a container's limit; CUDA:
    the driver's free memory plus what PyTorch's allocator holds unused."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free + max(0, cached))
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        if not known and hasattr(os, "sysconf"):
            try:
                known.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            except (ValueError, OSError):
                pass
        return min(known) if known else None
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    """What a job will allocate, in bytes, by part, on the device and in host memory."""

    what: str  # e.g. "this run (3 branches, 50 steps, 512x512)"
    device: torch.device
    on_device: tuple[tuple[str, int], ...]
    on_host: tuple[tuple[str, int], ...] = ()

    @property
    def device_bytes(self) -> int:
        return sum(b for _, b in self.on_device)

    @property
    def host_bytes(self) -> int:
        return sum(b for _, b in self.on_host)

    def _parts(self, parts: tuple[tuple[str, int], ...]) -> str:
        largest = sorted(parts, key=lambda p: -p[1])[:3]
        return ", ".join(f"{name} {format_bytes(size)}" for name, size in largest if size > 0)

    def check(self, advice: str, available: Callable[[torch.device], int | None] | None = None) -> None:
        """Raise :class:`NotEnoughMemory` when the estimate exceeds what is free.

        ``advice``: what to change, e.g. "use fewer steps, a smaller size or fewer targets".
        ``available``: a function of a device giving free bytes or None; default
        :func:`available_memory`.
        """
        available = available or available_memory
        host = torch.device("cpu")
        if self.device.type == "cpu":
            needs = [(self.device, self.device_bytes + self.host_bytes, self.on_device + self.on_host)]
        else:
            needs = [(self.device, self.device_bytes, self.on_device), (host, self.host_bytes, self.on_host)]
        for device, needed, parts in needs:
            if needed == 0:
                continue
            free = available(device)
            if free is not None and needed > free:
                raise NotEnoughMemory(
                    f"{self.what} needs about {format_bytes(needed)} on {device.type}, but only "
                    f"{format_bytes(free)} is free ({self._parts(parts)}); {advice}"
                )
