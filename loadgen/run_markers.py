"""The run's markers on the server: ``BeginRun`` when a test starts (its labels and secret, the client's
``client_runs`` row), ``EndRun`` when it stops, and the server's clock offset to this machine."""

from __future__ import annotations

import logging
import time

import grpc

from llmwatts.credentials import inference_token_refused
from llmwatts.errors import Unauthenticated
from llmwatts.loadgen import records
from llmwatts.loadgen.clock import CONTROL_DEADLINE_S, server_clock_offset_ns
from llmwatts.loadgen.grpc_user import call_metadata, make_channel, normalise_target
from llmwatts.loadgen.run_secret import OpenRun, remove_run_secret, write_run_secret
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

log = logging.getLogger("llmwatts.loadgen")

END_RUN_DEADLINE_S = 120.0  # EndRun waits on the server for the run's requests still in flight


class RunMarkers:
    """What ``LoadSession`` does on the server's Control service around a test. Uses the session's
    ``environment``, ``config``, ``token``, ``run_id``, ``dataset``, ``db``, ``secret_file``,
    ``channel_options()`` and ``_fail()``; sets ``run_secret``, ``clock_offset_ns`` and ``_begun``."""

    def token_refused(self) -> None:
        """The server refused this node's inference token (UNAUTHENTICATED, at BeginRun or on a request): every
        later call would be refused too, so the run stops at once with one line saying what to set (#18)."""
        target = normalise_target(self.environment.host or self.config.target or "")
        self._fail(inference_token_refused(target, self.token), Unauthenticated)

    def _control(self):
        channel = make_channel(self.channel_options(self.environment.host or self.config.target))
        return channel, pb_grpc.ControlStub(channel)

    def _measure_clock_offset(self) -> None:
        channel, control = self._control()
        try:
            _, self.clock_offset_ns = server_clock_offset_ns(control, call_metadata(self.token))
        except grpc.RpcError as e:
            log.error("GetServerInfo failed, no clock offset recorded: %s", _rpc_text(e))
        finally:
            channel.close()

    def _mark_begin(self):
        c = self.config
        labels = c.run_labels(self.dataset)
        started_ns = time.time_ns()
        self._measure_clock_offset()
        channel, control = self._control()
        metadata = call_metadata(self.token)
        try:
            try:
                marker = control.BeginRun(pb.BeginRunRequest(run_id=self.run_id, labels=labels),
                                          timeout=CONTROL_DEADLINE_S, metadata=metadata)
                self.run_secret = marker.run_secret
                if self.secret_file:
                    write_run_secret(self.secret_file, OpenRun(self.run_id, self.environment.host or c.target or "",
                                                               marker.run_secret))
                if self.environment.parsed_options is not None:  # workers get it with the spawn message
                    self.environment.parsed_options.llm_run_secret = marker.run_secret
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # another run's window: send nothing under it
                    self._begun = False
                    self._fail(f"run id {self.run_id!r} was already used on this server: nothing was sent; "
                               "pass a new --run-id (or none: one is made)")
                    return
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # nothing sent: no requests, no EndRun
                    self._begun = False
                    self.token_refused()
                    return
                log.error("BeginRun(%s) failed: %s", self.run_id, _rpc_text(e))
        finally:
            channel.close()
        self._begun = True
        records.write_run_start(self.db, {
            "run_id": self.run_id, "target": normalise_target(self.environment.host or c.target or ""),
            "started_ns": started_ns, "labels": labels, "clock_offset_ns": self.clock_offset_ns,
            "users": c.closed_loop_users(), "batch_size": c.batch_size, "dataset": self.dataset, "stream": int(c.stream),
        })

    def _mark_end(self):
        if not self._begun:  # the run id was another run's: its window is not ours to end
            return
        channel, control = self._control()
        try:
            # The server answers once the run's requests have ended (its window holds their energy).
            control.EndRun(pb.EndRunRequest(run_id=self.run_id, run_secret=self.run_secret),
                           timeout=END_RUN_DEADLINE_S, metadata=call_metadata(self.token))
            remove_run_secret(self.secret_file)
        except grpc.RpcError as e:
            log.error("EndRun(%s) failed: %s", self.run_id, _rpc_text(e))
        finally:
            channel.close()
        records.write_run_end(self.db, self.run_id, time.time_ns())


def _rpc_text(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    return f"{code.name if code else 'UNKNOWN'}: {e.details() if hasattr(e, 'details') else e}"


