"""One host, several workers: each worker's share of the host's RAM and commit (pure; no I/O).

Each GPU's VRAM is its own, but the host's RAM, swap and commit are shared by every worker on it: a pool of N
workers (worker/pool.py) plans each job on its worker's share, so the N plans together never ask more of the
machine than one plan could. The shares keep the budgets' reserves once for the host, not once per worker.
"""
from __future__ import annotations

from dataclasses import replace

from ..probe import Machine
from .budgets import COMMIT_MARGIN_BYTES, RAM_RESERVE_BYTES


# The host's own figures, which its workers share (the rest of a Machine is the worker's GPU, or the disk)
HOST_FIELDS = ("ram_total_bytes", "ram_available_bytes", "swap_total_bytes", "swap_free_bytes",
               "commit_limit_bytes", "commit_available_bytes")


def host_share(machine: Machine, workers: int, host: Machine | None = None) -> Machine:
    """`machine` as one of `workers` equal workers sees it: the host's RAM, swap and commit (`host`'s figures where
    given, else `machine`'s) divided so that the RAM and commit budgets of the shares (budgets.budgets_for) sum to
    no more than the host's own; VRAM, the GPU and the disk stay `machine`'s (each worker's own device)."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if host is not None:
        machine = replace(machine, **{name: getattr(host, name) for name in HOST_FIELDS})
    if workers == 1:
        return machine
    # budgets_for keeps RAM_RESERVE_BYTES off the total and COMMIT_MARGIN_BYTES off the commit: the shares keep
    # them once for the host, and each share divides what is above them
    ram_total = RAM_RESERVE_BYTES + max(0, machine.ram_total_bytes - RAM_RESERVE_BYTES) // workers
    commit_limit = commit_available = None
    if machine.commit_limit_bytes is not None:
        commit_limit = machine.commit_limit_bytes // workers
    if machine.commit_available_bytes is not None:
        above_margin = machine.commit_available_bytes - COMMIT_MARGIN_BYTES
        # at or below the margin no share can commit anything, nor could the whole machine
        commit_available = (COMMIT_MARGIN_BYTES + above_margin // workers if above_margin > 0
                            else machine.commit_available_bytes)
    return replace(machine, ram_total_bytes=ram_total, ram_available_bytes=machine.ram_available_bytes // workers,
                   swap_total_bytes=machine.swap_total_bytes // workers,
                   swap_free_bytes=(machine.swap_free_bytes or 0) // workers,
                   commit_limit_bytes=commit_limit, commit_available_bytes=commit_available,
                   description=f"{machine.description}, one of {workers} workers' shares of its RAM and commit")
