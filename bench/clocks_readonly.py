"""Read-only clock check on a real GPU (issue 22): the GPU's real supported clocks through `llmwatts clocks
get`, then a short fast-engine load with telemetry, then which limits held the clocks back (NVML's
clock-event reasons) from the telemetry table.

READ-ONLY: the server runs the ``nvml-readonly`` backend, whose GPU class has no code path to an NVML
setter; this script never asks for a set. Safe on shared and lent GPUs.

    python bench/clocks_readonly.py --json clocks.json        # cuda: random llama-7b, fast engine, ~3 min
    python bench/clocks_readonly.py --quick                   # tiny on cpu, simulated GPU: proves the path
"""

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

from fixed_prompts import fixed_length_prompts

from llmwatts.server.gpu import clock_event_names


def reasons_table(db: Path) -> list[dict]:
    """Telemetry samples grouped by their clock-event reasons: count, mean SM/memory clock and power."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select clock_event_reasons, count(*), avg(sm_clock_mhz), avg(mem_clock_mhz), avg(power_mw) / 1000.0, "
            "max(simulated) from telemetry group by clock_event_reasons order by count(*) desc").fetchall()
    return [{"reasons": ", ".join(clock_event_names(mask or 0)) or "none", "mask": mask, "samples": n,
             "sm_clock_mhz": round(sm or 0), "mem_clock_mhz": round(mem or 0), "power_w": round(p or 0, 1),
             "simulated": bool(sim)} for mask, n, sm, mem, p, sim in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on cpu with a simulated GPU")
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batches", default="1,64", help="batch sizes loaded in turn")
    ap.add_argument("--seconds", type=float, default=30.0, help="load per batch size")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.seconds, args.new_tokens = "tiny", 1.0, 8

    import grpc

    from llmwatts.cli import main as llmwatts_main
    from llmwatts.server.config import ServerConfig
    from llmwatts.server.service import create_server
    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

    db = Path(tempfile.mkdtemp()) / "clocks.db"
    batches = [int(b) for b in args.batches.split(",")]
    config = ServerConfig(model=args.model, device="cpu" if args.quick else "cuda", engine="fast",
                          power_backend="simulated" if args.quick else "nvml-readonly",  # never a setter
                          port=0, db_path=db, telemetry_hz=10, max_batch_size=max(batches), queue_size=8)
    server, port = create_server(config)
    server.start()
    target = f"127.0.0.1:{port}"
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": args.model, "backend": config.power_backend}
    try:
        print("$ llmwatts clocks get", flush=True)
        llmwatts_main(["clocks", "get", "--target", target])
        with grpc.insecure_channel(target) as channel:
            control, inference = pb_grpc.ControlStub(channel), pb_grpc.InferenceStub(channel)
            got = control.GetClocks(pb.GetClocksRequest(), timeout=30)
            results["gpus"] = [{"uuid": g.uuid, "sm_max_mhz": g.sm_max_mhz, "mem_max_mhz": g.mem_max_mhz,
                                "supported": {s.mem_mhz: list(s.sm_mhz) for s in g.supported},
                                "event_reasons": list(g.event_reasons)} for g in got.gpus]
            texts, _ = fixed_length_prompts(server.host.loaded.tokenizer, 128, max(batches))
            results["load"] = []
            for batch in batches:
                stop_at, done = time.monotonic() + args.seconds, 0
                while time.monotonic() < stop_at or done == 0:
                    inference.Generate(pb.GenerateRequest(
                        request_id=uuid.uuid4().hex, run_id=f"clocks-b{batch}", prompts=texts[:batch],
                        max_new_tokens=args.new_tokens, sampling=pb.SamplingParams(greedy=True), ignore_eos=True),
                        timeout=600)
                    done += 1
                results["load"].append({"batch": batch, "requests": done})
                print(f"batch {batch}: {done} requests of {args.new_tokens} new tokens", flush=True)
            time.sleep(0.5)  # a few idle samples after the load
    finally:
        stop = threading.Thread(target=server.stop, args=(10,))
        stop.start()
        stop.join()
    results["reasons"] = reasons_table(db)
    simulated = any(row["simulated"] for row in results["reasons"])
    print(f"\nclock-event reasons in the telemetry (samples at 10 Hz){' — SIMULATED GPU' if simulated else ''}:")
    print("| reasons | samples | SM MHz | memory MHz | power W |\n|---|---|---|---|---|")
    for row in results["reasons"]:
        print(f"| {row['reasons']} | {row['samples']} | {row['sm_clock_mhz']} | {row['mem_clock_mhz']} | {row['power_w']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
