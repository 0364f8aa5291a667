"""`gream-fast index build`: embeddings -> RQ-KMeans -> a SemanticIndex folder with the
reference's index.json, the codebooks and a report (JSON + an SVG of cluster sizes and residual
error per level)."""
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from gream_fast.config import check_ranges
from gream_fast.errors import InvalidInputError
from gream_fast.files import atomic_dir, check_output, save_arrays
from gream_fast.index.embed import load_embeddings, resolve_device
from gream_fast.index.rq import rq_kmeans, size_bounds
from gream_fast.index.semantic_index import MAX_CODEBOOK_SIZE


@dataclass
class IndexBuildConfig:
    emb: str = ""
    out: str = ""
    levels: int = 4
    codebook_size: int = 256
    balanced: bool = True
    iters: int = 20
    seed: int = 0
    device: str = "auto"
    allow_tf32: bool = False


def build(cfg: IndexBuildConfig):
    t0 = time.perf_counter()
    check_ranges(cfg, at_least={"levels": 1, "codebook_size": 2, "iters": 1})
    if cfg.codebook_size > MAX_CODEBOOK_SIZE:  # before the clustering, not after it
        raise InvalidInputError(f"--codebook-size: expected at most {MAX_CODEBOOK_SIZE}, got "
                                f"{cfg.codebook_size}")
    check_output(cfg.out, command="index build", inputs=[cfg.emb], known=("index.safetensors",))
    x = load_embeddings(cfg.emb).to(resolve_device(cfg.device))
    result = rq_kmeans(x, cfg.levels, cfg.codebook_size, cfg.balanced, cfg.iters, cfg.seed,
                       allow_tf32=cfg.allow_tf32)
    index = result.to_index()
    sizes = [np.bincount(result.codes[:, l].cpu().numpy(), minlength=cfg.codebook_size)
             for l in range(cfg.levels)]
    report = {
        "items": index.num_items, "levels": cfg.levels, "codebook_size": cfg.codebook_size,
        "balanced": cfg.balanced, "size_bounds": list(size_bounds(index.num_items, cfg.codebook_size)),
        "collisions": result.collisions, "max_sid_len": index.max_len,
        "per_level": result.stats, "seconds": round(time.perf_counter() - t0, 3),
        "device": str(x.device),
    }
    with atomic_dir(cfg.out, command="index build") as d:
        index.save(d / "index.safetensors")
        index.to_index_json(d / "items.index.json")
        save_arrays(d / "codebooks.safetensors", {"codebooks": result.codebooks.cpu().numpy()},
                    "gream-fast.codebooks", 1, levels=cfg.levels, codebook_size=cfg.codebook_size)
        (d / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (d / "report.svg").write_text(_svg(sizes, [s["mse"] for s in result.stats]))
        (d / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return index, report


def _svg(sizes: list, mse: list) -> str:
    """Left: each level's cluster sizes, sorted (a flat line is a balanced level). Right: the
    mean squared residual after each level. Plain SVG: no plotting dependency."""
    w, h, pad = 360, 220, 40
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    top = max(int(s.max()) for s in sizes) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{pad}" y="14">cluster sizes per level (sorted; max {top})</text>',
           f'<text x="{w + pad}" y="14">mean squared residual after each level</text>']
    for lv, s in enumerate(sizes):
        ys = np.sort(s)[::-1]
        pts = " ".join(f"{pad + i * (w - 2 * pad) / max(len(ys) - 1, 1):.1f},"
                       f"{h - pad - v * (h - 2 * pad) / top:.1f}" for i, v in enumerate(ys))
        out.append(f'<polyline fill="none" stroke="{colors[lv % 6]}" points="{pts}"/>')
        out.append(f'<text x="{w - pad}" y="{30 + 12 * lv}" fill="{colors[lv % 6]}" '
                   f'text-anchor="end">level {lv + 1}</text>')
    peak = max(mse) or 1.0
    bw = (w - 2 * pad) / max(len(mse), 1)
    for lv, m in enumerate(mse):
        bh = m * (h - 2 * pad) / peak
        out.append(f'<rect x="{w + pad + lv * bw + 4:.1f}" y="{h - pad - bh:.1f}" '
                   f'width="{bw - 8:.1f}" height="{bh:.1f}" fill="{colors[lv % 6]}"/>')
        out.append(f'<text x="{w + pad + (lv + 0.5) * bw:.1f}" y="{h - pad + 14}" '
                   f'text-anchor="middle">{m:.3g}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def add_cli(index_subparsers) -> None:
    from gream_fast.config import add_fields, from_args

    p = index_subparsers.add_parser("build", help="embeddings -> balanced RQ-KMeans -> SemanticIndex")
    add_fields(p, IndexBuildConfig, required=("emb", "out"), help={
        "emb": "embeddings from `gream-fast index embed`",
        "out": "index folder: index.safetensors, items.index.json, codebooks, report",
        "allow_tf32": "tf32 tensor cores for the distances on a GPU: faster, but codes may then "
                      "differ from an fp32 run by more than ties"})

    def run(args):
        cfg = from_args(IndexBuildConfig, args)
        index, report = build(cfg)
        print(f"wrote {cfg.out}: {index.num_items} items, {cfg.levels} x {cfg.codebook_size}, "
              f"{report['collisions']} colliding items, residual "
              f"{report['per_level'][-1]['mse']:.4g} in {report['seconds']} s")

    p.set_defaults(run=run)
