"""Locustfile for LLM inference load: ``locust -f loadgen/locustfile.py --host HOST:PORT --llm-...``.

Declarative on purpose: the user class, its host and its task. Prompts, request numbering, the client
records and the server's run markers (BeginRun at test start, EndRun at test stop, once per run on the
local runner or the master) are wired by ``llmwatts.loadgen.users`` on import. See docs/loadgen.md.
"""

from llmwatts.loadgen.users import LlmUser


class InferenceUser(LlmUser):
    host = "127.0.0.1:50051"  # `llmwatts serve`'s default address; --host overrides
    tasks = [LlmUser.generate]
