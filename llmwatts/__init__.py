"""llmwatts: what a token costs in joules, and what a power cap does to latency."""

__version__ = "0.1.0"
