"""Every preference-learning method of ppo_rlhf_toy.py side by side (issue 29): PPO, GRPO and RLOO, each on the
learnt proxy reward and on the gold reward (a verifier), and DPO, IPO and KTO on the same pairs. Runs the
configurations one after another (so wall times are comparable), then tabulates and plots.

    python benchmarks/rlhf_methods.py                        # seeds 1 2 3, beta 0.1 (the default)
    python benchmarks/rlhf_methods.py --beta 0 --only ppo_gold grpo_gold rloo_gold --out benchmarks/results/rlhf_methods_beta0 -- --ppo-iterations 80
    python benchmarks/rlhf_methods.py --plot-only            # redraw and reprint from stored results

Each configuration is `python ppo_rlhf_toy.py --algo <algo> --reward <reward> --beta <beta> --seed <seed>` with
`--direct dpo ipo kto` on the (ppo, model) run and `--direct` (none) on the others: a direct method's result does
not depend on the online flags (it starts from the same pi_ref, pairs and seeds). Stored in --out as
<algo>_<reward>/seed<k>.json.gz (benchmarks/compact.py) plus summary.json (command, machine, date, final numbers,
wall time of each online stage and each direct stage from the logged rows' clock).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, write_metrics  # noqa: E402
from rlhf_overoptimisation import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONLINE = [(algo, reward) for algo in ("ppo", "grpo", "rloo") for reward in ("model", "gold")]
DIRECT = ("dpo", "ipo", "kto")


def run_all(seeds: list[int], beta: str, extra: list[str], out: Path, only: list[str] | None) -> None:
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    summary = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "beta": beta, "seeds": seeds, "runs": {}}
    for algo, reward in ONLINE:
        if only and f"{algo}_{reward}" not in only:
            continue
        for seed in seeds:
            direct = list(DIRECT) if (algo, reward) == ("ppo", "model") else []
            cmd = [sys.executable, str(ROOT / "ppo_rlhf_toy.py"), "--algo", algo, "--reward", reward, "--beta", beta,
                   "--seed", str(seed), "--exp-name", f"{algo}_{reward}", "--direct", *direct, *extra]
            cwd = work / f"{algo}_{reward}" / f"seed{seed}"
            cwd.mkdir(parents=True)
            start = time.time()
            subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
            rows = read_metrics(next(cwd.glob("runs/*/metrics.jsonl")))
            (out / f"{algo}_{reward}").mkdir(parents=True, exist_ok=True)
            write_metrics(out / f"{algo}_{reward}" / f"seed{seed}.json.gz", rows)
            final = [r for r in rows if r["stage"] == "summary"][-1]
            summary["runs"][f"{algo}_{reward}/seed{seed}"] = {
                "command": " ".join(["python ppo_rlhf_toy.py", *cmd[2:]]), "wall_s": time.time() - start, **final}
            print(f"{algo} {reward} seed {seed}: {time.time() - start:.0f} s, gold {final[f'gold_reward_{algo}']:.3f}")
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def stage_seconds(out: Path, name: str, method: str) -> list[float]:
    """Seconds each seed spent in a method's stage: from the first to the last logged row of the stage, plus
    one row's interval (rows are logged at the end of an iteration or an evaluation)."""
    seconds = []
    for path in sorted((out / name).glob("seed*.json.gz")):
        times = [r["time"] for r in read_metrics(path) if r["stage"] == method]
        if len(times) >= 2:
            seconds.append((times[-1] - times[0]) * len(times) / (len(times) - 1))
    return seconds


def table(out: Path) -> str:
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]

    def cell(values):
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else "-"

    lines = [f"beta {summary['beta']}, seeds {summary['seeds']}; {summary['machine']}; {summary['date']}. Final "
             "evaluation on 1024 prompts (best gold: 4); mean ± std over seeds. Wall time: the method's "
             "own stage (not SFT, reward model, evaluation), one run at a time.", "",
             "| method | reward | gold | proxy | KL(pi ‖ pi_ref) | wall time, s | model copies |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    ref = [r["gold_reward_ref"] for r in runs.values()]
    lines.append(f"| pi_ref (SFT) | | {cell(ref)} | | 0 | | |")
    for algo, reward in ONLINE:
        rs = [r for k, r in runs.items() if k.startswith(f"{algo}_{reward}/")]
        if rs:
            lines.append(f"| {algo.upper()} | {reward} | {cell(r[f'gold_reward_{algo}'] for r in rs)} | "
                         f"{cell(r[f'proxy_reward_{algo}'] for r in rs)} | {cell(r[f'kl_ref_{algo}'] for r in rs)} | "
                         f"{cell(stage_seconds(out, f'{algo}_{reward}', algo))} | {rs[0][f'models_{algo}']} |")
    rs = [r for k, r in runs.items() if k.startswith("ppo_model/")]
    for method in DIRECT:
        if rs and f"gold_reward_{method}" in rs[0]:
            seconds = stage_seconds(out, "ppo_model", method)
            lines.append(f"| {method.upper()} | pairs | {cell(r[f'gold_reward_{method}'] for r in rs)} | "
                         f"{cell(r[f'proxy_reward_{method}'] for r in rs)} | {cell(r[f'kl_ref_{method}'] for r in rs)}"
                         f" | {cell(seconds)} | {rs[0][f'models_{method}']} |")
    return "\n".join(lines)


def plot(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {"ppo": "C0", "grpo": "C1", "rloo": "C2", "dpo": "k", "ipo": "C4", "kto": "C5"}
    for algo, reward in ONLINE:
        files = sorted((out / f"{algo}_{reward}").glob("seed*.json.gz"))
        curves = [[r for r in read_metrics(f) if r["stage"] == algo] for f in files]
        if not curves:
            continue
        kl = np.mean([[np.sqrt(max(r["kl_ref"], 0)) for r in c] for c in curves], axis=0)
        gold = np.mean([[r["gold_reward"] for r in c] for c in curves], axis=0)
        ax.plot(kl, gold, color=colours[algo], ls="-" if reward == "gold" else "--", lw=1.2,
                label=f"{algo.upper()}, {'gold reward (verifier)' if reward == 'gold' else 'learnt proxy'}")
    files = sorted((out / "ppo_model").glob("seed*.json.gz"))
    for method in DIRECT:
        curves = [[r for r in read_metrics(f) if r["stage"] == method] for f in files]
        if curves and curves[0]:
            kl = np.mean([[np.sqrt(max(r["kl_ref"], 0)) for r in c] for c in curves], axis=0)
            gold = np.mean([[r["gold_reward"] for r in c] for c in curves], axis=0)
            ax.plot(kl, gold, color=colours[method], ls=":", marker="o", ms=2.5, label=f"{method.upper()} (pairs)")
    ax.axhline(4, color="grey", lw=0.6)
    ax.set_xlabel("sqrt(KL(pi || pi_ref)), nats^0.5 (during training, mean over seeds)")
    ax.set_ylabel("gold reward (best 4)")
    summary = json.loads((out / "summary.json").read_text())
    ax.set_title(f"ppo_rlhf_toy.py: every method, beta {summary['beta']}, seeds {summary['seeds']}", fontsize=10)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--beta", default="0.1")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rlhf_methods")
    parser.add_argument("--plot", type=Path, default=None, help="default: benchmarks/figures/<out's name>.png")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only these configurations, e.g. ppo_gold grpo_model")
    parser.add_argument("extra", nargs="*", help="after --: passed to ppo_rlhf_toy.py")
    args = parser.parse_args()
    if not args.plot_only:
        args.out.mkdir(parents=True, exist_ok=True)
        run_all(args.seeds, args.beta, args.extra, args.out, args.only)
    print(table(args.out))
    plot(args.out, args.plot or ROOT / "benchmarks" / "figures" / f"{args.out.name}.png")


if __name__ == "__main__":
    main()
