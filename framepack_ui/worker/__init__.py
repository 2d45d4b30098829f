"""The worker: one background thread that runs queued jobs one at a time and keeps every job's events."""
from .events import Queued
from .worker import JobInfo, Worker

__all__ = ["JobInfo", "Queued", "Worker"]
