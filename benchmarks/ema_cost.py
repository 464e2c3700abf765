"""What --ema_decay costs per step: the GPT preset cut to 300 steps, without and with the average, alternated over a
few rounds; the median samples_per_sec of each run's logged windows (the first, with the warm-up, dropped).

    OMP_NUM_THREADS=2 python benchmarks/ema_cost.py --rounds 3
"""

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_speed(root: Path, decay: float) -> float:
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config_path", str(REPO / "configs" /
                    "shakespeare_char.yaml"), "--max_steps", "300", "--logger_name", "csv", "--root_dir", str(root),
                    "--ema_decay", str(decay)], check=True, capture_output=True)
    (log,) = root.glob("*/logs/csv/metrics.csv")
    with open(log) as f:
        speeds = [float(row["samples_per_sec"]) for row in csv.DictReader(f) if row["samples_per_sec"]]
    return statistics.median(speeds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decay", type=float, default=0.999)
    args = parser.parse_args()
    print(f"| round | without | with {args.decay} | ratio |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            without, with_ema = (median_speed(Path(tmp) / f"{round_}-{decay}", decay) for decay in (0.0, args.decay))
            print(f"| {round_} | {without:.1f} | {with_ema:.1f} | {with_ema / without:.3f} |")


if __name__ == "__main__":
    main()
