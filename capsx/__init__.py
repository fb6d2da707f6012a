"""capsx: an experiment runner for Capsule Networks and the CNNs they are measured against."""

__version__ = "0.1.0"
