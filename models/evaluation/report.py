"""Reports of a ProteinGym evaluation: CSV rows, markdown summary (win rates), PNG curves."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from models.artifact import Artifact
from models.evaluation.probe import ALPHAS, N_FOLDS
from models.evaluation.proteingym import Evaluation

CSV_COLUMNS = ("assay", "config", "kind", "dim", "spearman", "n_variants")


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """% of assays where a > b (strictly; ties count as losses)."""
    return float(100.0 * np.mean(a > b))


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of the paired differences (None when all are zero)."""
    if len(a) < 2 or np.all(a == b):
        return None
    return float(wilcoxon(a, b).pvalue)


def comparisons(dims: Sequence[int]) -> list[tuple[str, str]]:
    """(winner?, baseline) pairs, generalising the paper's four for a chain d_1 < … < d_n.

    RD vs raw at every level above the first (at d_1 they coincide); each consecutive pair of
    levels within RD and within raw; and first vs last level when n > 2.
    """
    pairs = [(f"rd-{d}", f"raw-{d}") for d in dims[1:]]
    for lo, hi in itertools.pairwise(dims):
        pairs += [(f"rd-{hi}", f"rd-{lo}"), (f"raw-{hi}", f"raw-{lo}")]
    if len(dims) > 2:
        pairs += [(f"rd-{dims[-1]}", f"rd-{dims[0]}"), (f"raw-{dims[-1]}", f"raw-{dims[0]}")]
    return pairs


def csv_rows(ev: Evaluation) -> list[dict[str, object]]:
    """One row per assay × configuration."""
    return [
        {
            "assay": r.name,
            "config": c.name,
            "kind": c.kind,
            "dim": c.dim,
            "spearman": f"{r.scores[c.name]:.6f}",
            "n_variants": r.n_variants,
        }
        for r in ev.results
        for c in ev.configs
    ]


def write_csv(ev: Evaluation, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(csv_rows(ev))


def _f(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None or not np.isfinite(v) else format(v, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(sep) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def summary_lines(ev: Evaluation) -> list[str]:
    """Mean Spearman per configuration and the win-rate table."""
    n = len(ev.results)
    lines = ["### Mean Spearman ρ per configuration", ""]
    rows = []
    for c in ev.configs:
        if c.kind == "trunc":
            continue
        v = ev.matrix(c.name)
        rows.append(
            [f"`{c.name}`", c.kind, str(c.dim), _f(v.mean()), _f(np.median(v)), _f(v.std())]
        )
    lines += _table(["config", "kind", "dim", "mean ρ", "median ρ", "sd over assays"], rows)
    lines += ["", f"### Win rates ({n} assays)", ""]
    rows = []
    for a, b in comparisons(ev.dims):
        va, vb = ev.matrix(a), ev.matrix(b)
        rows.append(
            [
                f"`{a}` > `{b}`",
                f"{win_rate(va, vb):.1f}%",
                f"{int(np.sum(va > vb))}/{n}",
                _f((va - vb).mean(), "+.4f"),
                _f(wilcoxon_p(va, vb), ".2g"),
            ]
        )
    lines += _table(["comparison", "win rate", "wins", "mean Δρ", "Wilcoxon p"], rows)
    lines += ["", "### Truncation curve (RD embedding of the largest level cut to k)", ""]
    trunc = [c for c in ev.configs if c.kind == "trunc"]
    lines += _table(
        ["k", *(str(c.dim) for c in trunc)],
        [["mean ρ", *(_f(ev.matrix(c.name).mean()) for c in trunc)]],
    )
    return lines


def verdict(ev: Evaluation, level: int = -1, significance: float = 0.05) -> str:
    """One sentence: does RD at a level's dim beat that raw model (paired Wilcoxon, two-sided)?"""
    d = ev.dims[level]
    rd, raw = ev.matrix(f"rd-{d}"), ev.matrix(f"raw-{d}")
    diff = float((rd - raw).mean())
    p = wilcoxon_p(rd, raw)
    if p is not None and p < significance:
        word = "beats" if diff > 0 else "is worse than"
    else:
        word = "is not significantly different from"
    return (
        f"**RD-{d} {word} raw-{d}** (Wilcoxon p = {_f(p, '.2g')}): RD wins on "
        f"{win_rate(rd, raw):.1f}% of assays, mean Δρ = {diff:+.4f} "
        f"(mean ρ {rd.mean():.3f} vs {raw.mean():.3f})."
    )


def artifact_lines(artifact: Artifact, artifact_path: Path) -> list[str]:
    fit = artifact.fitting
    lines = [
        f"- artifact: `{artifact_path}` ({artifact.name}), sha256 `{artifact.sha256}`",
        f"- regressor: {artifact.regressor}"
        + (f" (alpha {artifact.alpha})" if artifact.alpha is not None else ""),
        f"- fitted on: {fit.get('n_sequences', '?')} sequences, "
        f"{fit.get('n_residues', '?'):,} residues from `{fit.get('source')}` "
        f"(data sha256 `{str(fit.get('data_sha256', '?'))[:16]}…`, "
        f"long sequences: {fit.get('long_sequence_policy')})",
        "- models: " + ", ".join(f"{lv.name} = `{lv.model_id}`" for lv in artifact.levels),
    ]
    rows = []
    for i, s in enumerate(artifact.stats):
        rows.append(
            [
                f"{artifact.levels[i].name} → {artifact.levels[i + 1].name}",
                _f(s.r2, ".4f"),
                "–" if s.components_kept is None else str(s.components_kept),
                _f(s.appended_variance_explained, ".4f"),
            ]
        )
    return [
        *lines,
        "",
        *_table(["step", "R² (per residue)", "PCs kept", "appended var. explained"], rows),
    ]


def markdown(
    ev: Evaluation,
    artifact: Artifact,
    artifact_path: Path,
    commands: Sequence[str],
    notes: str | None = None,
) -> str:
    """The full report: setup, commands, summary, per-assay table, optional notes."""
    s = ev.settings
    res = ev.results
    n_file = sum(r.fold_source == "fold_random_5" for r in res)
    embed_s = sum(r.embed_seconds for r in res)
    probe_s = sum(r.probe_seconds for r in res)
    n_cached = sum(r.cached for r in res)
    residues = sum(r.length * r.n_variants for r in res)
    forward_s = sum(r.forward_seconds for r in res)
    sub = (
        f"at most {s.max_variants} variants per assay, drawn uniformly without replacement "
        f"(`numpy.random.default_rng({s.seed}).choice(n, {s.max_variants}, replace=False)`, "
        "the same seed for every assay)"
        if s.max_variants
        else "all variants"
    )
    alphas = f"10^{np.log10(ALPHAS[0]):.0f} … 10^{np.log10(ALPHAS[-1]):.0f} ({len(ALPHAS)} values)"
    lines = [
        f"# ProteinGym linear probe: {artifact.name}",
        "",
        "Supervised probe on DMS assays: mean-pooled embedding → standardised ridge regression "
        f"(alpha by inner leave-one-out CV over {alphas}, sklearn `RidgeCV`; scaler fitted on "
        f"the training folds only) → Spearman ρ with `DMS_score` on each held-out fold; the "
        f"per-assay score is the mean over {N_FOLDS} folds. `raw-d` is the level of width d; "
        "`rd-d` the reverse-distilled embedding truncated to d (`rd-"
        f"{ev.dims[0]}` = `raw-{ev.dims[0]}`); `trunc-k` the RD embedding of the largest level "
        "cut to k.",
        "",
        *(f"- {verdict(ev, i)}" for i in range(1, len(ev.dims))),
        "",
        "## Setup",
        "",
        *artifact_lines(artifact, artifact_path),
        "",
        f"- assays: {len(res)} evaluated, {len(ev.skipped)} skipped "
        f"(wild type longer than {s.max_len} aa"
        + (": " + ", ".join(name for name, _ in ev.skipped) if ev.skipped else "")
        + ")",
        f"- subsample: {sub}; {sum(r.n_variants for r in res):,} variants in all",
        f"- folds: `fold_random_5` column for {n_file} assays, seeded random 5-fold "
        f"(`numpy.random.default_rng({s.seed}).permutation(arange(n) % 5)`) for "
        f"{len(res) - n_file}",
        f"- cost: the chain's forwards took {_f(forward_s, ',.0f')} s for {residues:,} residues "
        f"per level ({_f(residues / forward_s, ',.0f')} residues/s through all "
        f"{len(ev.dims)} levels; measured when the {n_cached} cached assays were first "
        f"embedded). This run: embeddings {embed_s:,.0f} s ({len(res) - n_cached} assays "
        f"computed, {n_cached} from the cache), probes {probe_s:,.0f} s",
        "",
        "## Commands",
        "",
        "```bash",
        *commands,
        "```",
        "",
        "## Summary",
        "",
        *summary_lines(ev),
        "",
        "## Per assay (mean held-out Spearman ρ)",
        "",
    ]
    names = [c.name for c in ev.configs if c.kind != "trunc"]
    rows = [
        [r.name, str(r.length), f"{r.n_variants}/{r.n_total}", r.fold_source]
        + [_f(r.scores[c]) for c in names]
        for r in res
    ]
    lines += _table(["assay", "L", "variants", "folds", *names], rows, "lrrl" + "r" * len(names))
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def plot(ev: Evaluation, title: str, path: Path) -> None:
    """Mean ρ vs dimensionality (log₂ axis): raw levels, RD at level dims, RD truncation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    trunc = [c for c in ev.configs if c.kind == "trunc"]
    ax.plot(
        [c.dim for c in trunc],
        [ev.matrix(c.name).mean() for c in trunc],
        "--",
        color="0.6",
        marker=".",
        label="RD truncated to k",
    )
    # Labels: RD above-left, raw below-right, so equal values stay readable.
    for kind, marker, color, label, offset, ha in (
        ("raw", "o", "tab:blue", "raw model", (6, -12), "left"),
        ("rd", "s", "tab:orange", "reverse-distilled", (-6, 6), "right"),
    ):
        cs = [c for c in ev.configs if c.kind == kind]
        means = [ev.matrix(c.name).mean() for c in cs]
        ax.plot([c.dim for c in cs], means, marker=marker, color=color, label=label, lw=2)
        for c, m in zip(cs, means, strict=True):
            ax.annotate(
                f"{m:.3f}",
                (c.dim, m),
                textcoords="offset points",
                xytext=offset,
                ha=ha,
                color=color,
                fontsize=8,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlim(right=ev.dims[-1] * 1.6)
    ticks = [c.dim for c in trunc]
    ax.set_xticks(ticks, [str(k) for k in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("embedding dimensionality")
    ax.set_ylabel(f"mean Spearman ρ ({len(ev.results)} assays)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(
    ev: Evaluation,
    artifact: Artifact,
    artifact_path: Path,
    out_dir: Path,
    name: str,
    commands: Sequence[str],
    notes: str | None = None,
) -> list[Path]:
    """<name>.md, <name>.csv and <name>.png under out_dir."""
    if not ev.results:
        raise ValueError("no assay was evaluated (all skipped?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table, png = (out_dir / f"{name}{ext}" for ext in (".md", ".csv", ".png"))
    md.write_text(markdown(ev, artifact, artifact_path, commands, notes))
    write_csv(ev, table)
    plot(ev, f"ProteinGym linear probe: {artifact.name} ({artifact.regressor})", png)
    return [md, table, png]
