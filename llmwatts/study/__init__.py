"""``llmwatts study PLAN.toml``: a declarative grid of load runs against one or more servers, resumable,
into one study DB and its report (plan.py: the plan; runner.py: running it; cli.py: the command)."""
