"""Reward over-optimisation in ppo_rlhf_toy.py: gold and proxy reward against sqrt(KL(pi || pi_ref)) for
several KL coefficients beta, over several seeds, and PPO against DPO. Runs the sweep, then plots and tabulates.

    python benchmarks/rlhf_overoptimisation.py                                  # betas 0 0.01 0.03 0.1 0.3, seeds 1 2 3
    python benchmarks/rlhf_overoptimisation.py --betas 0.1 --seeds 1 2 3        # the default run, 3 seeds
    python benchmarks/rlhf_overoptimisation.py --plot-only                      # redraw from stored results
    python benchmarks/rlhf_overoptimisation.py --jobs 2 -- --ppo-iterations 120 # after --: passed to the script

Every (beta, seed) run is `python ppo_rlhf_toy.py --beta <beta> --seed <seed> --exp-name beta<beta> <extra>`,
in its own folder, at most --jobs at a time. For one seed every beta shares the same pi_ref, reward model and
DPO policy (same data and seeds; only PPO differs). Results land in benchmarks/results/ppo_rlhf_toy/:
    beta<beta>/seed<k>.json.gz the run's metrics (every stage; rows have a "stage" key; benchmarks/compact.py)
    summary.json               command, machine, date, per-run final numbers
then it prints the table (markdown; also written to --table if given) and draws the figure in --plot (default
benchmarks/figures/rlhf_overoptimisation.png; needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, seed_files, write_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ppo_rlhf_toy.py"


def machine() -> str:
    model = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def run_sweep(betas: list[str], seeds: list[int], jobs: int, extra: list[str], out: Path) -> None:
    """Run every (beta, seed), store its metrics as out/beta<beta>/seed<seed>.json.gz, write out/summary.json."""
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    pending = [(beta, seed) for beta in betas for seed in seeds]
    procs, commands, start = {}, {}, time.time()
    while pending or procs:
        while pending and len(procs) < jobs:
            beta, seed = pending.pop(0)
            cwd = work / f"beta{beta}" / f"seed{seed}"
            cwd.mkdir(parents=True)
            cmd = [sys.executable, str(SCRIPT), "--beta", beta, "--seed", str(seed), "--exp-name", f"beta{beta}",
                   *extra]
            commands[(beta, seed)] = " ".join(["python", "ppo_rlhf_toy.py"] + cmd[2:])
            procs[(beta, seed)] = subprocess.Popen(cmd, cwd=cwd, stdout=open(cwd / "stdout.log", "w"),
                                                   stderr=subprocess.STDOUT)
            print(f"started: {commands[(beta, seed)]}", flush=True)
        for key, proc in list(procs.items()):
            if proc.poll() is not None:
                del procs[key]
                print(f"beta {key[0]} seed {key[1]}: {'done' if proc.returncode == 0 else 'FAILED'}", flush=True)
        time.sleep(1)
    runs = {}
    for beta in betas:
        for seed in seeds:
            found = sorted((work / f"beta{beta}" / f"seed{seed}" / "runs").glob("*/metrics.jsonl"))
            if not found:
                raise SystemExit(f"error: beta {beta} seed {seed} wrote no metrics; see "
                                 f"{work / f'beta{beta}' / f'seed{seed}' / 'stdout.log'}")
            (out / f"beta{beta}").mkdir(parents=True, exist_ok=True)
            rows = read_metrics(found[-1])
            write_metrics(out / f"beta{beta}" / f"seed{seed}.json.gz", rows)
            runs[f"beta{beta}/seed{seed}"] = rows[-1]
    summary = {
        "command": commands[(betas[0], seeds[0])].replace(f"--beta {betas[0]}", "--beta <beta>")
        .replace(f"--seed {seeds[0]}", "--seed <seed>").replace(f"beta{betas[0]}", "beta<beta>"),
        "betas": betas, "seeds": seeds, "parallel_jobs": jobs, "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds_all_runs": round(time.time() - start, 1),
        "final": runs,  # the "summary" row of every run
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work)


def load(out: Path, betas: list[str] | None) -> dict:
    """{beta: [rows of seed 1, rows of seed 2, ...]} from out/beta*/seed<k> files (only `betas` if given)."""
    runs = {}
    folders = [out / f"beta{b}" for b in betas] if betas else out.glob("beta*")
    for folder in sorted(folders, key=lambda p: float(p.name[4:])):
        seeds = [read_metrics(f) for f in seed_files(folder)]
        if seeds:
            runs[folder.name[4:]] = seeds
    if not runs:
        raise SystemExit(f"error: no results in {out}; run the sweep first")
    return runs


def stage(rows: list[dict], name: str, key: str) -> np.ndarray:
    return np.array([r[key] for r in rows if r["stage"] == name], dtype=float)


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f}"


def write_table(runs: dict, path: Path | None, summary: dict) -> None:
    """Markdown: final gold / proxy / KL per beta (mean ± std over seeds), pi_ref and DPO; printed, and written to
    path if given."""
    any_beta = next(iter(runs.values()))
    finals = {beta: [rows[-1] for rows in seeds] for beta, seeds in runs.items()}
    lines = [
        f"Command: `{summary.get('command', 'python ppo_rlhf_toy.py --beta <beta> --seed <seed>')}`, seeds "
        f"{summary.get('seeds', '?')}; {summary.get('machine', '')}, {summary.get('date', '')}. Mean ± std over "
        "seeds of the final evaluation (one sampled response to each of --eval-episodes prompts). The best "
        "possible gold reward is 4.",
        "",
        "| policy | gold reward | proxy reward | KL(pi ‖ pi_ref) | gold - pi_ref's |",
        "| --- | --- | --- | --- | --- |",
    ]
    ref = [rows[-1] for rows in any_beta]
    demo_gold = mean_std([r["gold_reward_demonstrator"] for r in ref])
    lines.append(f"| demonstrator (behaviour policy) | {demo_gold} | - | - | |")
    lines.append(f"| pi_ref (SFT) | {mean_std([r['gold_reward_ref'] for r in ref])} | "
                 f"{mean_std([r['proxy_reward_ref'] for r in ref])} | 0 | |")
    for beta, rows in finals.items():
        gain = [r["gold_reward_ppo"] - r["gold_reward_ref"] for r in rows]
        lines.append(f"| PPO, beta = {beta} | {mean_std([r['gold_reward_ppo'] for r in rows])} | "
                     f"{mean_std([r['proxy_reward_ppo'] for r in rows])} | "
                     f"{mean_std([r['kl_ref_ppo'] for r in rows])} | "
                     f"{mean_std(gain)} |")
    gain = [r["gold_reward_dpo"] - r["gold_reward_ref"] for r in ref]
    lines.append(f"| DPO (same pairs) | {mean_std([r['gold_reward_dpo'] for r in ref])} | "
                 f"{mean_std([r['proxy_reward_dpo'] for r in ref])} | {mean_std([r['kl_ref_dpo'] for r in ref])} | "
                 f"{mean_std(gain)} |")
    lines.append(f"| reward model held-out accuracy | {mean_std([r['rm_heldout_acc'] for r in ref])} (labels' own "
                 f"ceiling {mean_std([r['label_ceiling_acc'] for r in ref])}) | | | |")
    lines.append("")
    lines.append("Peak of the gold reward along each PPO run (iteration means over seeds) and where it ended:")
    lines.append("")
    lines.append("| beta | peak gold | at KL | final gold | final KL | final proxy - proxy at the peak |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for beta, seeds in runs.items():
        gold = np.mean([stage(rows, "ppo", "gold_reward") for rows in seeds], axis=0)
        kl = np.mean([stage(rows, "ppo", "kl_ref") for rows in seeds], axis=0)
        proxy = np.mean([stage(rows, "ppo", "proxy_reward") for rows in seeds], axis=0)
        peak = int(gold.argmax())
        lines.append(f"| {beta} | {gold[peak]:.2f} | {kl[peak]:.2f} | {gold[-1]:.2f} | {kl[-1]:.2f} | "
                     f"{proxy[-1] - proxy[peak]:+.2f} |")
    print("\n".join(lines))
    if path is not None:
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")


def plot(runs: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.tab10(np.arange(len(runs)) % 10)
    for color, (beta, seeds) in zip(colors, runs.items()):
        n = min(len(stage(rows, "ppo", "kl_ref")) for rows in seeds)
        sqrt_kl = np.mean([np.sqrt(np.maximum(stage(rows, "ppo", "kl_ref")[:n], 0)) for rows in seeds], axis=0)
        for ax, key in ((ax_gold, "gold_reward"), (ax_proxy, "proxy_reward")):
            for rows in seeds:  # each seed, thin
                ax.plot(np.sqrt(np.maximum(stage(rows, "ppo", "kl_ref"), 0)), stage(rows, "ppo", key), color=color,
                        alpha=0.2, lw=0.8)
            ax.plot(sqrt_kl, np.mean([stage(rows, "ppo", key)[:n] for rows in seeds], axis=0), color=color, lw=2,
                    label=f"PPO, beta = {beta}")
    any_beta = next(iter(runs.values()))
    for ax, key in ((ax_gold, "gold_reward"), (ax_proxy, "proxy_reward")):
        dpo_kl = np.mean([np.sqrt(np.maximum(stage(rows, "dpo", "kl_ref"), 0)) for rows in any_beta], axis=0)
        dpo_y = np.mean([stage(rows, "dpo", key) for rows in any_beta], axis=0)
        ax.plot(dpo_kl, dpo_y, "k--", marker="o", ms=3, label="DPO (same pairs)")
        ref_key = "gold_reward_ref" if key == "gold_reward" else "proxy_reward_ref"
        ax.axhline(np.mean([rows[-1][ref_key] for rows in any_beta]), color="gray", lw=1, ls=":", label="pi_ref")
        ax.set_xlabel("sqrt(KL(pi || pi_ref))  (nats^0.5, per response)")
        ax.grid(alpha=0.3)
    ax_gold.set_ylabel("gold reward (the hidden truth; best 4)")
    ax_proxy.set_ylabel("proxy reward (the learnt reward model)")
    ax_gold.legend(fontsize=8)
    fig.suptitle(f"ppo_rlhf_toy.py: reward over-optimisation ({len(any_beta)} seeds; thin lines: single seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", nargs="+", default=["0", "0.01", "0.03", "0.1", "0.3"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at once")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ppo_rlhf_toy")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "figures" / "rlhf_overoptimisation.png")
    parser.add_argument("--table", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--plot-only", action="store_true", help="no runs: redraw from --out")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: passed to ppo_rlhf_toy.py")
    args = parser.parse_args()
    if not args.plot_only:
        run_sweep(args.betas, args.seeds, args.jobs, [a for a in args.script_args if a != "--"], args.out)
    summary_file = args.out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    runs = load(args.out, summary.get("betas"))
    write_table(runs, args.table, summary)
    plot(runs, args.plot)


if __name__ == "__main__":
    main()
