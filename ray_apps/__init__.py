"""Oppen: what Ray lacks for ML training (queue, quotas, cost, agent), on Ray's public APIs."""

__version__ = "0.1.0"
