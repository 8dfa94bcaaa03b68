"""The simulated GPU's steady-state predictions, as markdown tables for docs/power-caps.md.

    python bench/sim_model.py [--profile a100-250w] [--sequences 64]

Prints, for a GPU kept busy with ``--sequences`` in flight, per power cap: the SM clock the model
settles at, the power drawn, and the change in time and energy per unit of work against the uncapped
card. Every number is **simulated** (the model of server/gpu/simulated.py), not measured.
"""

from __future__ import annotations

import argparse

from llmwatts.server.gpu import SIM_PROFILES, predicted_cap_table


def cap_table_markdown(profile: str, n_sequences: int) -> str:
    lines = ["| cap W | SM clock MHz | power W | time | energy |", "|---|---|---|---|---|"]
    for row in predicted_cap_table(profile, n_sequences=n_sequences):
        lines.append(f"| {row['cap_w']} | {row['sm_clock_mhz']} | {row['power_w']:.0f} | "
                     f"{row['time_change_pct']:+.1f}% | {row['energy_change_pct']:+.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="a100-250w", choices=sorted(SIM_PROFILES))
    parser.add_argument("--sequences", type=int, default=64, help="sequences in flight (default 64)")
    args = parser.parse_args(argv)
    print(f"Simulated ({SIM_PROFILES[args.profile].label}, {args.sequences} sequences in flight): power caps\n")
    print(cap_table_markdown(args.profile, args.sequences))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
