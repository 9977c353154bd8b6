"""ektp-monitor collector: the district side that ingests kit reports."""

from agent import __version__

__all__ = ["__version__"]
