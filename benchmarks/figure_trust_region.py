"""The article's trust-region figure ("Parameter space lies; policy space tells the truth": "many small KL-bounded
steps stay safe; one large parameter step falls off the cliff"), on a problem whose J(theta) is exact.

    python benchmarks/figure_trust_region.py      # computes (seconds), writes the JSON, draws the PNG

The problem: a one-step bandit with a continuous action. The policy is pi_theta = N(mu, sigma^2) with
sigma = exp(log_std), so theta = (mu, log_std) has two parameters and J(theta) = E_{a ~ pi_theta}[R(a)] is a
surface. The reward has a ridge and a cliff:

    R(a) = 0.7 exp(-a^2 / (2 * 0.2^2)) + 0.3 exp(-a^2 / (2 * 1.5^2)) - [a > 0.5]

a narrow peak of height 1 at a = 0 on a broad hill, and -1 for every action past the edge a = 0.5. J is in closed
form (a Gaussian bump averaged over a Gaussian is a wider bump; the step averages to the normal CDF), so J, its
gradient (autograd) and the Fisher matrix are exact: nothing is sampled. The ridge is mu ~ 0, narrower the smaller
sigma; J -> 1 along it as sigma -> 0 (no interior optimum: the best policy is the deterministic a = 0). The cliff is
the red region right of it.

Both methods start at theta_0 = (-2.5, 0.5) and take 60 steps:
    TRPO        trpo.py's own functions and default settings (delta = max_kl 0.01, cg_damping 0.1, backtrack 0.8 x
                10): F v by trpo.fisher_vector_product on the exact KL (trpo.gaussian_kl), x = (F + damping I)^-1 g
                by trpo.conjugate_gradient, step sqrt(2 delta / x^T (F + damping I) x) x, then trpo.line_search
                with the exact J and the exact KL(pi_old || pi_new). The ellipse around each iterate is its KL ball
                {dtheta: 1/2 dtheta^T F dtheta = delta} (article, "Natural gradient"), F the exact Fisher there.
    vanilla PG  theta += lr grad J with one fixed lr, chosen so that its first step has TRPO's KL budget:
                lr = sqrt(2 delta / g_0^T F_0 g_0), i.e. 1/2 step^T F_0 step = delta at theta_0. The same start at
                lr x 1/4, 1/2 and 2 is in the right panel: whether the fall hinges on this one lr.
A path "falls off the cliff" at the first iterate with mu > 0.5: the median action past the edge.
Data: benchmarks/results/article_figures/trust_region.json (the paths, J, the KL of every step, the Fisher
matrices; the landscape is recomputed when drawing). Figure: benchmarks/figures/trust_region.png. Needs
matplotlib to draw (optional dependency: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import trpo  # noqa: E402
from compact import rounded_tree  # noqa: E402
from plot import pyplot  # noqa: E402

PEAK_WIDTH, PEAK_HEIGHT = 0.2, 0.7  # the narrow ridge
HILL_WIDTH, HILL_HEIGHT = 1.5, 0.3  # the broad hill under it, so that J has a slope far from the ridge
EDGE, DROP = 0.5, 1.0  # every action past the edge costs DROP
THETA_0 = (-2.5, 0.5)  # (mu, log_std): far left of the ridge, wide
STEPS = 60
LR_FACTORS = (0.25, 0.5, 1.0, 2.0)  # vanilla PG at these multiples of the KL-matched lr
DTYPE = torch.float64  # float32 would blur the KL of two narrow policies a small step apart


def gaussian_bump(mu: torch.Tensor, variance: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """E_{a ~ N(mu, variance)}[height exp(-a^2 / (2 width^2))]: a bump of width sqrt(width^2 + variance)."""
    spread2 = width**2 + variance
    return height * width / spread2.sqrt() * torch.exp(-(mu**2) / (2 * spread2))


def expected_reward(theta: torch.Tensor) -> torch.Tensor:
    """J(theta) = E_{a ~ N(mu, exp(log_std)^2)}[R(a)], exactly; theta [..., 2] -> [...]."""
    mu, log_std = theta[..., 0], theta[..., 1]
    variance = (2 * log_std).exp()
    past_edge = 0.5 * (1 + torch.erf((mu - EDGE) / (log_std.exp() * math.sqrt(2))))  # P(a > EDGE)
    return (gaussian_bump(mu, variance, PEAK_WIDTH, PEAK_HEIGHT) + gaussian_bump(mu, variance, HILL_WIDTH, HILL_HEIGHT)
            - DROP * past_edge)


def policy_kl(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_old || pi_new) of two theta = (mu, log_std), by trpo.py's own gaussian_kl."""
    return trpo.gaussian_kl(old[None, :1], old[None, 1:], new[None, :1], new[None, 1:])[0]


def gradient(theta: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    return torch.autograd.grad(expected_reward(theta), theta)[0]


def fisher_product(theta: torch.Tensor, damping: float):
    """v -> (F + damping I) v at theta, as trpo_update builds it: the Hessian of the exact KL(pi_theta || .) at
    theta, by double backprop (trpo.fisher_vector_product). Here the KL is exact, so F is the exact Fisher."""
    params = theta.clone().requires_grad_(True)
    kl_grad = trpo.flat_grad(policy_kl(theta, params), [params], create_graph=True)
    return lambda v: trpo.fisher_vector_product(kl_grad, [params], v, damping)


def fisher_matrix(theta: torch.Tensor) -> torch.Tensor:
    """The 2 x 2 Fisher matrix (no damping), column by column; for this policy it is diag(1 / sigma^2, 2)."""
    product = fisher_product(theta, 0.0)
    return torch.stack([product(e).detach() for e in torch.eye(2, dtype=theta.dtype)], dim=1)


def trpo_path(theta: torch.Tensor, steps: int, settings: trpo.Args) -> dict:
    path, kls, backtracks = [theta], [], []
    for _ in range(steps):
        damped = fisher_product(theta, settings.cg_damping)
        g = gradient(theta)
        x, _ = trpo.conjugate_gradient(damped, g, settings.cg_iters)  # 2 unknowns: exact after 2 products
        full_step = torch.sqrt(2 * settings.max_kl / (x @ damped(x))).detach() * x.detach()

        def evaluate(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return expected_reward(params), policy_kl(theta, params)  # the exact J stands in for the surrogate

        result = trpo.line_search(evaluate, theta, full_step, expected_reward(theta).item(), settings.max_kl,
                                  settings.backtrack_coef, settings.backtrack_iters)
        theta = result.params.detach()
        path.append(theta)
        kls.append(result.kl)
        backtracks.append(result.backtracks)
    return {"path": path, "step_kl": kls, "backtracks": backtracks}


def vanilla_path(theta: torch.Tensor, steps: int, lr: float) -> dict:
    path, kls = [theta], []
    for _ in range(steps):
        new = (theta + lr * gradient(theta)).detach()
        kls.append(policy_kl(theta, new).item())
        path.append(new)
        theta = new
    return {"path": path, "step_kl": kls}


def summarise(run: dict) -> dict:
    """The path as lists, J at every iterate, and where it first fell off the cliff (None: never)."""
    path = torch.stack(run.pop("path"))
    past = (path[:, 0] > EDGE).nonzero()
    return {**run, "path": path.tolist(), "J": expected_reward(path).tolist(),
            "fell_at": past[0].item() if len(past) else None, "steps_past_edge": len(past)}


def compute(steps: int = STEPS) -> dict:
    settings = trpo.Args()
    theta_0 = torch.tensor(THETA_0, dtype=DTYPE)
    g_0, fisher_0 = gradient(theta_0), fisher_matrix(theta_0)
    lr = math.sqrt(2 * settings.max_kl / (g_0 @ fisher_0 @ g_0).item())
    trust = summarise(trpo_path(theta_0, steps, settings))
    trust["fisher"] = [fisher_matrix(torch.tensor(p, dtype=DTYPE)).tolist() for p in trust["path"]]
    return {
        "reward": {"peak_width": PEAK_WIDTH, "peak_height": PEAK_HEIGHT, "hill_width": HILL_WIDTH,
                   "hill_height": HILL_HEIGHT, "edge": EDGE, "drop": DROP},
        "theta_0": list(THETA_0), "steps": steps, "max_kl": settings.max_kl, "cg_damping": settings.cg_damping,
        "backtrack_coef": settings.backtrack_coef, "backtrack_iters": settings.backtrack_iters, "lr": lr,
        "trpo": trust,
        "vanilla": {str(f): dict(summarise(vanilla_path(theta_0, steps, f * lr)), lr=f * lr) for f in LR_FACTORS},
    }


def report(data: dict) -> str:
    trust = data["trpo"]
    shrunk = sum(b > 0 for b in trust["backtracks"])
    lines = [f"TRPO: {data['steps']} steps, final J {trust['J'][-1]:.4f} at theta {trust['path'][-1]}, step KL "
             f"{min(trust['step_kl']):.4f} to {max(trust['step_kl']):.4f} (delta {data['max_kl']}), "
             f"{shrunk} steps shrunk by the line search, fell at {trust['fell_at']}"]
    for factor, run in data["vanilla"].items():
        fall = "" if run["fell_at"] is None else f" (that step's KL {run['step_kl'][run['fell_at'] - 1]:.3g})"
        lines.append(f"vanilla PG lr {run['lr']:.3f} (x{factor}): final J {run['J'][-1]:.4f}, "
                     f"best J {max(run['J']):.4f}, largest step KL {max(run['step_kl']):.3g}, "
                     f"fell at step {run['fell_at']}{fall}, {run['steps_past_edge']} iterates past the edge")
    return "\n".join(lines)


def ellipse(center, fisher, max_kl: float, points: int = 60):
    """The boundary {center + d: 1/2 d^T F d = max_kl}, as (x, y) arrays."""
    eigenvalues, eigenvectors = np.linalg.eigh(np.array(fisher))
    angle = np.linspace(0, 2 * np.pi, points)
    circle = np.stack([np.cos(angle), np.sin(angle)])  # unit circle, scaled along F's axes below
    d = eigenvectors @ (np.sqrt(2 * max_kl / eigenvalues)[:, None] * circle)
    return center[0] + d[0], center[1] + d[1]


def plot(data: dict, out: Path) -> None:
    plt = pyplot()

    vanilla, trust = data["vanilla"]["1.0"], data["trpo"]
    both = np.array(vanilla["path"] + trust["path"])
    (mu_lo, ls_lo), (mu_hi, ls_hi) = both.min(0) - 0.3, both.max(0) + 0.3
    mu, log_std = np.meshgrid(np.linspace(mu_lo, mu_hi, 300), np.linspace(ls_lo, ls_hi, 300))
    with torch.no_grad():
        landscape = expected_reward(torch.tensor(np.stack([mu, log_std], -1))).numpy()

    fig, (ax_v, ax_t, ax_j) = plt.subplots(1, 3, figsize=(18, 5.4), layout="constrained")
    for ax in (ax_v, ax_t):
        image = ax.contourf(mu, log_std, landscape, levels=np.linspace(-1, 1, 21), cmap="RdYlGn")
        ax.axvline(data["reward"]["edge"], color="k", ls=":", lw=1)
        ax.set_xlabel("mu (mean of the action)")
        ax.set_ylabel("log_std")
    fig.colorbar(image, ax=ax_t, label="J(theta) = E[R(a)], exact")

    path = np.array(vanilla["path"])
    ax_v.plot(path[:, 0], path[:, 1], "o-", color="k", ms=3, lw=0.8)
    ax_v.plot(*path[-1], "s", color="w", mec="k", ms=7, label=f"step {len(path) - 1}")
    fell = "never falls off"
    if vanilla["fell_at"] is not None:
        k = vanilla["fell_at"]
        fell = f"falls off at step {k}"
        jump = f"KL {vanilla['step_kl'][k - 1]:.3g}, J {vanilla['J'][k - 1]:.2f} -> {vanilla['J'][k]:.2f}"
        ax_v.annotate(f"step {k}: {jump}", path[k], xytext=(10, 40), textcoords="offset points",
                      arrowprops={"arrowstyle": "->"}, fontsize=9, bbox={"fc": "w", "alpha": 0.8})
    worst = int(np.argmax(vanilla["step_kl"]))
    ax_v.annotate(f"step {worst + 1}: KL {vanilla['step_kl'][worst]:.3g}", path[worst + 1], xytext=(10, -40),
                  textcoords="offset points", arrowprops={"arrowstyle": "->"}, fontsize=9,
                  bbox={"fc": "w", "alpha": 0.8})
    ax_v.legend(fontsize=8, loc="upper right")
    ax_v.set_title(f"vanilla PG, lr {vanilla['lr']:.2f}: {fell}, final J {vanilla['J'][-1]:.2f}", fontsize=10)

    path = np.array(trust["path"])
    for center, fisher in zip(path, trust["fisher"]):
        ax_t.plot(*ellipse(center, fisher, data["max_kl"]), color="tab:blue", lw=0.6)
    ax_t.plot(path[:, 0], path[:, 1], "o-", color="k", ms=2, lw=0.8)
    ax_t.set_title(f"TRPO, KL balls delta = {data['max_kl']}: final J {trust['J'][-1]:.3f}", fontsize=10)

    for factor, run in data["vanilla"].items():
        ax_j.plot(run["J"], lw=1.2 if factor == "1.0" else 0.8, label=f"vanilla PG, lr x {float(factor):g}")
    ax_j.plot(trust["J"], color="k", lw=1.8, label="TRPO")
    ax_j.axhline(0, color="grey", lw=0.5)
    ax_j.set_xlabel("step")
    ax_j.set_ylabel("J(theta)")
    ax_j.set_title(f"J per step; lr x 1 = {data['lr']:.2f} (first step's KL = delta)", fontsize=10)
    ax_j.legend(fontsize=8)
    ax_j.grid(alpha=0.3)
    fig.suptitle(f"A Gaussian policy N(mu, exp(log_std)^2) on a ridge next to a cliff (dotted: mu = edge "
                 f"{data['reward']['edge']}); start theta_0 = {tuple(data['theta_0'])}, {data['steps']} steps each")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks/results/article_figures/trust_region.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/figures/trust_region.png")
    args = parser.parse_args()
    data = rounded_tree(compute(), 6)  # a small JSON, the same figure
    args.data.parent.mkdir(parents=True, exist_ok=True)
    args.data.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(report(data))
    plot(data, args.out)


if __name__ == "__main__":
    main()
