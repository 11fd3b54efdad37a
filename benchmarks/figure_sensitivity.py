"""The article's hyperparameter-sensitivity figure, from real ppo_discrete.py runs ("Hyperparameter cheat
sheet": "Clip eps has a wide, flat optimum ... Learning rate is narrower -- a factor of 3 misstep costs 5-10% of
return. The epochs x batch heatmap reveals an interaction: too many epochs on a small batch overfits").

    python benchmarks/figure_sensitivity.py                 # run the cells not yet stored, then draw
    python benchmarks/figure_sensitivity.py --plot-only     # draw from benchmarks/results/sensitivity/

Env and budget: CartPole-v1 at 100k steps (195 iterations of 4 envs x 128 steps), every other flag ppo_discrete.py's
default (cleanrl's). At 500k steps every sane setting reaches 500 and nothing shows; at 100k a default run is
half-way (~250), so better and worse settings both have room, and a run takes ~10 s (up to ~100 s with 30 epochs
of 16-sample minibatches), so 6 seeds of every cell fit in about an hour on 2 cores.

The cells, each one `benchmarks/run.py ppo_discrete.py CartPole-v1 --seeds 1 ... 6` with only the swept flags
changed (a cell shared by two panels runs once):
    learning rate --learning-rate 2.5e-4 x 3^k, k = -3 ... 5 (factors of 3, the article's unit), annealed to 0.
                  At this budget the default 2.5e-4 is far below the best, 6.75e-3 (= HIGH_LR, k = 3).
    clip eps      --clip-coef in 0.02 ... 10 (10: the ratio never reaches the clip), three times: at the default
                  learning rate as a user gets it (ppo_discrete.py, like cleanrl and PPO2, also clips the value
                  update to +-clip_coef), the same with --no-clip-vloss (only the policy's clip moves), and at
                  HIGH_LR, where the clip acts (at 2.5e-4 it clips < 1% of the samples for eps >= 0.1)
    epochs x minibatch size   --update-epochs 1 2 4 10 30 x minibatches of 512, 128, 32, 16 samples
                  (--num-minibatches 1 4 16 32 of the 512-sample batch), at 2.5e-4 and at HIGH_LR

Each cell is stored as it finishes, in benchmarks/results/sensitivity/<cell>/summary.json (run.py's summary:
command, seeds, machine, date, every seed's final return = mean of its last 100 episodes, plus the mean over
iterations of approx_kl_k3 and clipfrac, which this script adds before deleting the per-iteration files, so a
cell is ~2 KB). A cell with a summary for the same seeds is skipped: kill the sweep and start it again, it goes
on from the next unfinished cell. The figure: benchmarks/figures/sensitivity_cartpole.png; the table printed
is the one in RESULTS.md. Needs matplotlib to draw (optional dependency: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics  # noqa: E402
from plot import pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "CartPole-v1"
TOTAL_TIMESTEPS = 100_000
BATCH = 512  # ppo_discrete.py's default 4 envs x 128 steps
DEFAULTS = {"clip_coef": 0.2, "clip_vloss": True, "learning_rate": 2.5e-4, "update_epochs": 4, "minibatch_size": 128}
CLIP_COEFS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 10.0]
LEARNING_RATES = [2.5e-4 * 3.0**k for k in range(-3, 6)]
HIGH_LR = 2.5e-4 * 3.0**3  # the LR panel's best; the clip panel and the heatmap are run again there
EPOCHS = [1, 2, 4, 10, 30]
MINIBATCH_SIZES = [512, 128, 32, 16]


def cell_name(cell: dict) -> str:
    """The folder of a cell: the flags it changes from the defaults, 'default' if none."""
    parts = []
    for key, value in cell.items():
        if value == DEFAULTS[key]:
            continue
        parts.append("no_clip_vloss" if key == "clip_vloss" else f"{key}{value:.3g}")
    return "_".join(parts) or "default"


def cell_flags(cell: dict) -> list[str]:
    """ppo_discrete.py's flags for a cell (only those that differ from its defaults)."""
    flags = ["--total-timesteps", str(TOTAL_TIMESTEPS)]
    if cell["clip_coef"] != DEFAULTS["clip_coef"]:
        flags += ["--clip-coef", str(cell["clip_coef"])]
    if not cell["clip_vloss"]:
        flags += ["--no-clip-vloss"]
    if cell["learning_rate"] != DEFAULTS["learning_rate"]:
        flags += ["--learning-rate", f"{cell['learning_rate']:.6g}"]
    if cell["update_epochs"] != DEFAULTS["update_epochs"]:
        flags += ["--update-epochs", str(cell["update_epochs"])]
    if cell["minibatch_size"] != DEFAULTS["minibatch_size"]:
        flags += ["--num-minibatches", str(BATCH // cell["minibatch_size"])]
    return flags


def all_cells() -> list[dict]:
    """Every cell of the three panels, without repeats, in the order they run (the 1-D sweeps first)."""
    cells = [dict(DEFAULTS, clip_coef=c, clip_vloss=v) for v in (True, False) for c in CLIP_COEFS]
    cells += [dict(DEFAULTS, learning_rate=lr) for lr in LEARNING_RATES]
    cells += [dict(DEFAULTS, clip_coef=c, learning_rate=HIGH_LR) for c in CLIP_COEFS]
    for lr in (DEFAULTS["learning_rate"], HIGH_LR):
        cells += [dict(DEFAULTS, update_epochs=e, minibatch_size=m, learning_rate=lr)
                  for e in EPOCHS for m in MINIBATCH_SIZES]
    unique = {}
    for cell in cells:
        unique.setdefault(cell_name(cell), cell)
    return list(unique.values())


def run_cell(cell: dict, seeds: list[int], jobs: int, out: Path) -> None:
    """Train the cell's seeds with benchmarks/run.py, then keep only the summary (with mean KL and clipfrac)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "ppo_discrete.py", ENV_ID,
               "--seeds", *map(str, seeds), "--jobs", str(jobs), "--out", str(out), "--", *cell_flags(cell)]
    subprocess.run(command, check=True)
    summary = json.loads((out / "summary.json").read_text())
    for seed in seeds:
        rows = read_metrics(out / f"seed{seed}.json.gz")
        summary["per_seed"][str(seed)]["mean_approx_kl_k3"] = float(np.mean([r["approx_kl_k3"] for r in rows]))
        summary["per_seed"][str(seed)]["mean_clipfrac"] = float(np.mean([r["clipfrac"] for r in rows]))
    summary["cell"] = cell
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "summary.json")
    for seed in seeds:
        (out / f"seed{seed}.json.gz").unlink()


def load(results: Path) -> dict[str, dict]:
    """Every stored cell: name -> {"cell", "returns", "kl", "clipfrac"} (arrays over seeds)."""
    cells = {}
    for path in sorted(results.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        per_seed = summary["per_seed"].values()
        cells[path.parent.name] = {
            "cell": summary["cell"],
            "returns": np.array([s["final_return_last100"] for s in per_seed]),
            "kl": np.array([s["mean_approx_kl_k3"] for s in per_seed]),
            "clipfrac": np.array([s["mean_clipfrac"] for s in per_seed]),
        }
    return cells


def table(cells: dict[str, dict]) -> str:
    """The markdown table RESULTS.md carries: every cell's final return and mean KL over seeds."""
    default = cells.get("default")
    lines = ["| cell | flags | final return (mean +- std) | vs default | mean approx KL (k3) | mean clipfrac |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, c in cells.items():
        flags = " ".join(cell_flags(c["cell"])[2:]) or "(defaults)"
        relative = f"{100 * (c['returns'].mean() / default['returns'].mean() - 1):+.0f}%" if default else ""
        lines.append(f"| {name} | `{flags}` | {c['returns'].mean():.1f} +- {c['returns'].std():.1f} | {relative} | "
                     f"{c['kl'].mean():.4f} | {c['clipfrac'].mean():.3f} |")
    return "\n".join(lines)


def plot(cells: dict[str, dict], out_png: Path) -> None:
    plt = pyplot()

    def find(**changed):
        return cells.get(cell_name(dict(DEFAULTS, **changed)))

    def sweep(ax, xs, found, label=None):
        """Mean +- std over seeds against x (points of cells not stored yet are left out), seeds as dots."""
        xs, rs = zip(*[(x, c["returns"]) for x, c in zip(xs, found) if c]) if any(found) else ((), ())
        (line,) = ax.plot(xs, [r.mean() for r in rs], marker="o", label=label)
        ax.fill_between(xs, [r.mean() - r.std() for r in rs], [r.mean() + r.std() for r in rs],
                        color=line.get_color(), alpha=0.15)
        for x, r in zip(xs, rs):
            ax.scatter([x] * len(r), r, s=6, color=line.get_color(), alpha=0.4)

    n_seeds = {len(c["returns"]) for c in cells.values()}
    fig, ((ax_clip, ax_lr), (ax_grid, ax_grid_high)) = plt.subplots(2, 2, figsize=(13, 9.5))
    for clip_vloss, lr, label in ((True, DEFAULTS["learning_rate"], "lr 2.5e-4 (default)"),
                                  (False, DEFAULTS["learning_rate"], "lr 2.5e-4, --no-clip-vloss"),
                                  (True, HIGH_LR, f"lr {HIGH_LR:.3g}")):
        sweep(ax_clip, CLIP_COEFS, [find(clip_coef=c, clip_vloss=clip_vloss, learning_rate=lr) for c in CLIP_COEFS],
              label)
    ax_clip.set_xlabel("clip eps (--clip-coef; also the value clip unless --no-clip-vloss); 10: never clips")
    ax_clip.set_title("clip eps")
    ax_clip.legend(fontsize=8)
    sweep(ax_lr, LEARNING_RATES, [find(learning_rate=lr) for lr in LEARNING_RATES])
    ax_lr.axvline(DEFAULTS["learning_rate"], color="grey", ls=":", lw=1)
    ax_lr.set_xlabel("learning rate (points a factor of 3 apart; dotted: the default 2.5e-4)")
    ax_lr.set_title("learning rate")
    for ax in (ax_clip, ax_lr):
        ax.set_xscale("log")
        ax.set_ylabel("final return (mean of last 100 episodes)")
        ax.grid(alpha=0.3)

    for ax, lr in ((ax_grid, DEFAULTS["learning_rate"]), (ax_grid_high, HIGH_LR)):
        grid = np.full((len(EPOCHS), len(MINIBATCH_SIZES)), np.nan)
        kls = np.full_like(grid, np.nan)
        for i, e in enumerate(EPOCHS):
            for j, m in enumerate(MINIBATCH_SIZES):
                c = find(update_epochs=e, minibatch_size=m, learning_rate=lr)
                if c:
                    grid[i, j], kls[i, j] = c["returns"].mean(), c["kl"].mean()
        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto", vmin=0, vmax=500)
        for i in range(len(EPOCHS)):
            for j in range(len(MINIBATCH_SIZES)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}\nKL {kls[i, j]:.1e}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < 300 else "black")
        ax.set_xticks(range(len(MINIBATCH_SIZES)), [str(m) for m in MINIBATCH_SIZES])
        ax.set_yticks(range(len(EPOCHS)), [str(e) for e in EPOCHS])
        ax.set_xlabel("minibatch size (of a 512-sample batch)")
        ax.set_ylabel("update epochs")
        ax.set_title(f"lr {lr:.3g}: final return; mean approx KL (k3) per update")
        fig.colorbar(image, ax=ax, fraction=0.05)
    seeds = f"{min(n_seeds)} seeds" if len(n_seeds) == 1 else f"{min(n_seeds)}-{max(n_seeds)} seeds"
    fig.suptitle(f"ppo_discrete.py on {ENV_ID}, {TOTAL_TIMESTEPS // 1000}k steps, {seeds} per point "
                 "(mean +- std; dots: seeds)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--jobs", type=int, default=2, help="seeds of a cell run at once")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "sensitivity")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures" / "sensitivity_cartpole.png")
    parser.add_argument("--plot-only", action="store_true", help="run nothing: draw from the stored cells")
    args = parser.parse_args()
    if not args.plot_only:
        cells = all_cells()
        for k, cell in enumerate(cells, 1):
            out = args.results / cell_name(cell)
            done = out / "summary.json"
            if done.exists():
                stored = json.loads(done.read_text())
                if stored.get("cell") == cell and stored["seeds"] == args.seeds:
                    continue
            print(f"cell {k}/{len(cells)}: {cell_name(cell)}", flush=True)
            run_cell(cell, args.seeds, args.jobs, out)
    cells = load(args.results)
    if not cells:
        raise SystemExit(f"error: no cells stored in {args.results}; run without --plot-only first")
    print(table(cells))
    plot(cells, args.out)


if __name__ == "__main__":
    main()
