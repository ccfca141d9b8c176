"""Cost model: an RD-k embedding costs the sum of the chain's forwards up to the level k needs.

FLOPs per residue of one ESM-2 forward at sequence length L (multiply-add = 2 FLOPs):
    layers × (24 d² + 4 L d)        # QKV+O projections 8d², 4d-wide FFN 16d²; QKᵀ and AV 4Ld
The projection adds (d_i + d_{i+1})(d_{i+1} − d_i) × 2 FLOPs per step per residue when applied
per residue, and the same once per *sequence* for pooled output — negligible either way.

    python -m benchmarks.cost_model [--length 300]
"""

from __future__ import annotations

import argparse

from benchmarks.common import ESM2_SIZES


def forward_flops(d: int, layers: int, length: int) -> float:
    return layers * (24 * d * d + 4 * length * d)


def table(length: int) -> list[dict[str, float | str]]:
    rows = []
    prefix = 0.0
    prev_d = 0
    for size, (d, layers, _) in ESM2_SIZES.items():
        f = forward_flops(d, layers, length)
        proj = 2 * (prev_d + d) * (d - prev_d) if prev_d else 0
        prefix += f + proj
        rows.append(
            {
                "size": size,
                "dim": d,
                "gflop_per_residue": f / 1e9,
                "rd_prefix_gflop_per_residue": prefix / 1e9,
                "rd_over_largest": prefix / f,
                "projection_share": proj / (f + proj),
            }
        )
        prev_d = d
    return rows


def markdown(length: int) -> str:
    lines = [
        f"| RD level | dim | forward GFLOP/residue (L={length}) | RD-k chain GFLOP/residue | "
        "RD-k / that model alone |",
        "|---|---|---|---|---|",
    ]
    for r in table(length):
        lines.append(
            f"| {r['size']} | {r['dim']} | {r['gflop_per_residue']:.3f} | "
            f"{r['rd_prefix_gflop_per_residue']:.3f} | {r['rd_over_largest']:.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--length", type=int, default=300)
    print(markdown(ap.parse_args().length))
