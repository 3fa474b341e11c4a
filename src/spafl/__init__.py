"""spafl: SpaFL (Kim et al., NeurIPS 2024) — federated learning that sends only per-unit thresholds."""

__version__ = "0.1.0"
