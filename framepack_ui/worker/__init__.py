"""The worker: one background thread that runs queued jobs one at a time and keeps every job's events."""
from ..weights.layout import DOWNLOAD_COMMAND
from .events import Queued
from .gallery import PastOutput
from .worker import DownloadStatus, JobInfo, Worker

__all__ = ["DOWNLOAD_COMMAND", "DownloadStatus", "JobInfo", "PastOutput", "Queued", "Worker"]
