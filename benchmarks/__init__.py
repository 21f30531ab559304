"""Benchmarks: attention kernels (attention.py); results under results/, notes in NOTES.md."""
