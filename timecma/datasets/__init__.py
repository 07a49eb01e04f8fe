"""Data shipped with timecma: ETTh1 (CC BY-ND 4.0, see README.md here) for the demo and tests."""

from pathlib import Path

ETTH1 = Path(__file__).with_name("ETTh1.csv")
