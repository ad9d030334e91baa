"""khmon: live eBPF observability for Linux khugepaged and mTHP collapse."""

__version__ = "0.1.0"
