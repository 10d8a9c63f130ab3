"""Judging an artifact against its PyTorch original: the comparison engine, paired statistics, gates, ``validate``, ``benchmark`` and latency records."""
