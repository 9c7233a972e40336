"""fedtune: federated fine-tuning of large language models, on Kubernetes or on one machine."""

__version__ = "0.1.0"
