"""The worker: one background thread that runs queued jobs one at a time and keeps every job's events; a pool of
workers, one per GPU, serving one queue."""
from ..weights.layout import DOWNLOAD_COMMAND
from .events import Queued
from .gallery import PastOutput
from .pool import WorkerPool, cuda_device_count, parse_gpus
from .worker import DownloadStatus, JobInfo, Worker

__all__ = ["DOWNLOAD_COMMAND", "DownloadStatus", "JobInfo", "PastOutput", "Queued", "Worker", "WorkerPool",
           "cuda_device_count", "parse_gpus"]
