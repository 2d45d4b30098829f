"""Byte units, defined once. Decimal GB/MB where a figure is shown to users (as disks and Hugging Face count);
binary GiB/MiB where it is compared with what CUDA and the kernel report."""
GB = 1_000_000_000
MB = 1_000_000
GiB = 2**30
MiB = 2**20
