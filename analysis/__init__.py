"""The analysis box: ingest server and client DBs into a study DB, join them, compute the paper's metrics
and write the report. Modules: ``ingest``, ``join``, ``metrics``, ``report``, ``cli`` (docs/analysis.md).

Import the module you need (``from llmwatts.analysis import metrics``); ``report`` pulls in matplotlib.
"""
