"""The article's adaptive-KL figure from a real ppo_penalty.py run: beta on a log axis, and the measured KL
per update against the band [kl_target / 1.5, 1.5 kl_target] that the beta rule steers it into.

    python benchmarks/plot_beta.py runs/<run_name>/metrics.jsonl --out beta.png
    python benchmarks/plot_beta.py benchmarks/results/ppo_penalty/HalfCheetah-v4/seed1.json.gz \
        --out benchmarks/figures/ppo_penalty_beta_halfcheetah.png --with-k3

Each argument is a metrics.jsonl written by ppo_penalty.py (or stored by benchmarks/run.py as seed<k>.json.gz);
several files are drawn on the same axes, one colour each. Top panel: `beta`, the penalty coefficient each
iteration's update used (log axis). Bottom panel: `kl_exact`, the exact mean KL(pi_old || pi_new) over the
batch after that update (log axis; iterations with KL = 0 are not drawn), with the target as a dashed line
and the band where beta stays unchanged shaded; `--with-k3` adds the k3 estimate as a thin dotted line.
Above the band, the next iteration's beta is doubled; below it, halved.
Needs matplotlib (optional dependency: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, stem  # noqa: E402


def load(path: Path) -> dict[str, np.ndarray]:
    """iteration, beta, kl_exact, approx_kl_k3 and kl_target columns of a ppo_penalty metrics file."""
    if not path.is_file():
        raise SystemExit(f"error: no file {path}")
    rows = read_metrics(path)
    if not rows or "beta" not in rows[0] or "kl_exact" not in rows[0]:
        raise SystemExit(f"error: {path} has no beta / kl_exact columns; is it a ppo_penalty.py metrics file?")
    return {
        key: np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
        for key in ("iteration", "beta", "kl_exact", "approx_kl_k3", "kl_target")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+", help="metrics files of ppo_penalty.py runs (.jsonl, .json.gz)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--with-k3", action="store_true", help="also draw the k3 estimate of the KL")
    parser.add_argument("--title", default=None, help="default: the folder of the first file")
    args = parser.parse_args()
    runs = [(path, load(path)) for path in args.files]
    targets = {float(run["kl_target"][0]) for _, run in runs}
    if len(targets) != 1:
        raise SystemExit(f"error: the runs have different --kl-target values {sorted(targets)}; plot them apart")
    kl_target = targets.pop()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None

    fig, (ax_beta, ax_kl) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    ax_kl.axhspan(kl_target / 1.5, kl_target * 1.5, color="tab:green", alpha=0.15,
                  label=f"band: beta unchanged [{kl_target / 1.5:.3g}, {kl_target * 1.5:.3g}]")
    ax_kl.axhline(kl_target, color="tab:green", linestyle="--", linewidth=1, label=f"kl_target {kl_target:g}")
    for index, (path, run) in enumerate(runs):
        color = f"C{index}"
        label = stem(path) if stem(path) != "metrics" else path.parent.name
        ax_beta.plot(run["iteration"], run["beta"], color=color, label=label, drawstyle="steps-post")
        kl = np.where(run["kl_exact"] > 0, run["kl_exact"], np.nan)  # a log axis cannot show 0
        ax_kl.plot(run["iteration"], kl, color=color, linewidth=1, label=f"exact KL ({label})")
        if args.with_k3:
            k3 = np.where(run["approx_kl_k3"] > 0, run["approx_kl_k3"], np.nan)
            ax_kl.plot(run["iteration"], k3, color=color, linewidth=0.8, linestyle=":", label=f"k3 ({label})")
    ax_beta.set_yscale("log")
    ax_beta.set_ylabel("beta (penalty coefficient)")
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(pi_old || pi_new) after the update")
    ax_kl.set_xlabel("iteration")
    for ax in (ax_beta, ax_kl):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(args.title or f"PPO-Penalty: adaptive beta, {args.files[0].parent.name}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
