"""The simulated GPU's steady-state predictions, as markdown tables for docs/power-caps.md and docs/clocks.md.

    python bench/sim_model.py [--profile a100-250w] [--sequences 64] [--clocks]

Prints, for a GPU kept busy with ``--sequences`` in flight, per power cap (or, with ``--clocks``, per
locked SM clock): the SM clock the model settles at, the power drawn, and the change in time and energy
per unit of work against the first row. Every number is **simulated** (the model of
server/gpu/simulated.py), not measured.
"""

from __future__ import annotations

import argparse

from llmwatts.server.gpu import SIM_PROFILES, predicted_cap_table, predicted_clock_table


def markdown(rows: list[dict], first: tuple[str, str], with_clock: bool) -> str:
    """A table of ``predicted_*_table`` rows: ``first`` = (header, row key) of the lever's column."""
    head = [first[0]] + (["SM clock MHz"] if with_clock else []) + ["power W", "time", "energy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[first[1]])] + ([str(row["sm_clock_mhz"])] if with_clock else [])
        cells += [f"{row['power_w']:.0f}", f"{row['time_change_pct']:+.1f}%", f"{row['energy_change_pct']:+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="a100-250w", choices=sorted(SIM_PROFILES))
    parser.add_argument("--sequences", type=int, default=64, help="sequences in flight (default 64)")
    parser.add_argument("--clocks", action="store_true", help="per locked SM clock instead of per cap")
    args = parser.parse_args(argv)
    lever = "locked SM clocks" if args.clocks else "power caps"
    print(f"Simulated ({SIM_PROFILES[args.profile].label}, {args.sequences} sequences in flight): {lever}\n")
    if args.clocks:
        print(markdown(predicted_clock_table(args.profile, n_sequences=args.sequences), ("locked SM MHz", "lock_mhz"), False))
    else:
        print(markdown(predicted_cap_table(args.profile, n_sequences=args.sequences), ("cap W", "cap_w"), True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
