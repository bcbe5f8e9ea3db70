"""The sweep's outputs: a markdown table, the Pareto frontier and matplotlib plots.

Rows are `tcjax.eval.sweep.run`'s. Plots (Agg backend, PNG):
  accuracy_vs_tokens.png   accuracy per family against image tokens per decoder layer
  accuracy_vs_flops.png    accuracy against prefill FLOPs, with the Pareto frontier
  loyalty_vs_tokens.png    loyalty to the uncompressed model per family against tokens
  adaptive_vs_fixed.png    (with adaptive-policy rows) per family, each policy's accuracy at the
                           tokens it kept on average, beside the fixed-budget curve of `topk`
                           (the same scores, a fixed count) at the same stage
  retained_<budget>.png    (with the sweep's `pictures`) each vision-side setting's kept,
                           dropped and merged patches on the sweep's own images
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# The fixed-budget twin of the adaptive policies: the same ranking (`scores`), a fixed count.
TWIN = "topk"


def pareto(points: Sequence[Tuple[float, float]]) -> List[int]:
  """Indices of the Pareto-optimal (cost, value) points: no other point costs at most as much
  and is worth more, or costs less and is worth as much. Sorted by cost; of equal points only
  the first counts."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
  out, best = [], None
  for i in order:
    if best is None or points[i][1] > best:
      out.append(i)
      best = points[i][1]
  return out


def _fmt(v, spec: str = ".3f") -> str:
  return "-" if v is None else format(v, spec)


def _per_shape(row, key: str, families: Sequence[str], spec: str = ".0f",
               scale: float = 1.0, note: Optional[Callable[[str], str]] = None) -> str:
  """A cost as one number, or one per input shape ("256/2048/1024") where they differ; "-" for
  shapes where it was not measured, `note(message)` where its measurement raised."""
  vals = []
  for f in families:
    c = row["cost_per_family"].get(f)
    if c is not None:
      if note is not None and "latency_error" in c:
        v = note(c["latency_error"])
      else:
        v = "-" if c.get(key) is None else format(c[key] * scale, spec)
      if v not in vals:
        vals.append(v)
  return "/".join(vals) or "-"


def table(rows: Sequence[Dict[str, Any]], families: Sequence[str]) -> str:
  """Markdown: one line per row (setting, method family, image tokens to the decoder per
  input shape, image tokens per decoder layer, prefill GFLOPs and KV-cache KiB per example,
  measured prefill ms, decode ms per token and peak MiB per device, per input shape (one batch;
  "-" when not measured), accuracy, loyalty, relative accuracy, accuracy per family, seconds), then the
  errors.

  A number marked * is over the families that ran (cost and accuracy alike); a family that
  raised shows `e<k>`, the k-th error listed under the table (also an input shape whose latency
  measurement raised, in the latency cells)."""
  head = (["setting", "kind", "image tokens", "tokens / layer", "GFLOPs", "KV KiB",
           "prefill ms", "decode ms", "peak MiB", "accuracy", "loyalty", "rel. acc."]
          + list(families) + ["s"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  notes: List[str] = []
  for r in rows:
    msgs: Dict[str, int] = {}

    def note(msg: str) -> str:
      if msg not in msgs:
        notes.append(msg)
        msgs[msg] = len(notes)
      return f"e{msgs[msg]}"

    cells = [r["setting"], r["family"], _per_shape(r, "image_tokens", families),
             _per_shape(r, "mean_llm_image_tokens", families)]
    partial = "*" if r["errors"] and r["accuracy"] is not None else ""
    if r["accuracy"] is None:
      cells += ["-", "-"]
    else:
      cells += [f"{r['flops'] / 1e9:.3f}{partial}", f"{r['kv_bytes'] / 1024:.1f}{partial}"]
    cells += [_per_shape(r, "prefill_seconds", families, ".1f", 1e3, note),
              _per_shape(r, "decode_seconds", families, ".2f", 1e3, note),
              _per_shape(r, "peak_bytes", families, ".1f", 2.0 ** -20, note)]
    cells += [_fmt(r["accuracy"]) + partial, _fmt(r["loyalty"]) + partial,
              _fmt(r["relative_accuracy"]) + partial]
    for f in families:
      if f in r["errors"]:
        cells.append(note(r["errors"][f]))
      else:
        cells.append(_fmt(r["per_family"].get(f)))
    cells.append(f"{r['seconds']:.1f}")
    lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
  if notes:
    lines += ["", "Errors:", ""]
    for k, msg in enumerate(notes, 1):
      first = msg.splitlines()[0] if msg else msg
      lines.append(f"- e{k}: {first}")
  return "\n".join(lines)


def _curves(rows, families):
  """{(method, stage): [row, ...] sorted by budget (largest first)} of compressed rows."""
  out: Dict[Tuple[str, str], list] = {}
  for r in rows:
    if r["budget"] is not None and r["accuracy"] is not None:
      out.setdefault((r["method"], r["stage"]), []).append(r)
  for v in out.values():
    v.sort(key=lambda r: -r["budget"])
  return out


_STAGE_STYLE = {"vit": ":", "post_vit": "-", "post_proj": "--", "llm": "-."}


def _per_family_plot(rows, families, value_key: str, ylabel: str, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  curves = _curves(rows, families)
  methods = sorted({m for m, _ in curves})
  cmap = plt.get_cmap("tab20")
  color = {m: cmap(i % 20) for i, m in enumerate(methods)}
  marker = {m: "os^D"[(i // 20) % 4] for i, m in enumerate(methods)}  # past 20 colours
  ncols = min(4, len(families))
  nrows = -(-len(families) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
  full = rows[0]
  for ax, fam in zip(axes.flat, families):
    for (m, st), rs in curves.items():
      pts = [(r["cost_per_family"][fam]["mean_llm_image_tokens"], r[value_key][fam])
             for r in rs if fam in r[value_key]]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, _STAGE_STYLE[st], marker=marker[m], ms=3, lw=1, color=color[m],
                label=f"{m} ({st})")
    if fam in full.get(value_key, {}):
      ax.axhline(full[value_key][fam], color="k", lw=1, ls="--", label="uncompressed")
      ax.plot([full["cost_per_family"][fam]["mean_llm_image_tokens"]],
              [full[value_key][fam]], "k*", ms=9)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)  # one scale for every family
    ax.set_title(fam)
    ax.set_xlabel("image tokens per decoder layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(families):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _flops_plot(rows, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in rows if r["complete"]]
  pts = [(r["flops"] / 1e9, r["accuracy"]) for r in done]
  front = pareto(pts)
  fig, ax = plt.subplots(figsize=(7.5, 5))
  ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, c="tab:blue", alpha=0.6,
             label="settings with every family")
  fx = [pts[i][0] for i in front]
  fy = [pts[i][1] for i in front]
  ax.step(fx, fy, where="post", color="tab:red", lw=1.5, label="Pareto frontier")
  ax.scatter(fx, fy, s=24, c="tab:red")
  for i in front:
    ax.annotate(done[i]["setting"], pts[i], fontsize=6, xytext=(3, 3),
                textcoords="offset points")
  full = rows[0]
  if full["accuracy"] is not None:
    ax.plot([full["flops"] / 1e9], [full["accuracy"]], "k*", ms=10, label="uncompressed")
  ax.set_xscale("log")
  ax.set_xlabel("prefill GFLOPs per example (analytic, mean over examples)")
  ax.set_ylabel("accuracy (all families)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plots(rows: Sequence[Dict[str, Any]], families: Sequence[str], out_dir: str) -> List[str]:
  """Writes the three plots (and adaptive_vs_fixed.png when adaptive policies ran) into
  `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, n) for n in ("accuracy_vs_tokens.png", "accuracy_vs_flops.png",
                                               "loyalty_vs_tokens.png")]
  _per_family_plot(rows, families, "per_family", "accuracy", paths[0])
  _flops_plot(rows, paths[1])
  _per_family_plot(rows, families, "loyalty_per_family", "loyalty", paths[2])
  if _adaptive_rows(rows):
    paths.append(os.path.join(out_dir, "adaptive_vs_fixed.png"))
    _adaptive_plot(rows, families, paths[-1])
  return paths


# ---------------------------------------------------------------------------------------------
# Adaptive budgets against fixed budgets at equal mean tokens.
# ---------------------------------------------------------------------------------------------


def at_tokens(points: Sequence[Tuple[float, float]], tokens: float) -> Optional[float]:
  """The value of a fixed-budget curve [(tokens, value)] at `tokens`, linear in log2(tokens)
  between the two nearest budgets around it (exact at a budget); None outside the budgets."""
  pts = sorted(points)
  for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[-1:]):
    if x0 <= tokens <= x1:
      if x1 == x0:
        return y0
      t = (math.log2(tokens) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
      return y0 + t * (y1 - y0)
  return None


def _adaptive_rows(rows):
  return [r for r in rows if r.get("kept_per_family") and r["accuracy"] is not None]


def _twin_curves(rows, family: str) -> Dict[str, List[Tuple[float, float]]]:
  """{stage: [(budget, accuracy on `family`)]} of the fixed-budget twin's rows."""
  out: Dict[str, List[Tuple[float, float]]] = {}
  for r in rows:
    if (r["method"] == TWIN and r["budget"] is not None and "[" not in r["setting"]
        and family in r.get("per_family", {})):
      out.setdefault(r["stage"], []).append((float(r["budget"]), r["per_family"][family]))
  return out


def adaptive_table(rows: Sequence[Dict[str, Any]], families: Sequence[str]) -> str:
  """Markdown: one line per adaptive-policy row; per family "acc vs fixed @ tokens": the
  policy's accuracy, the accuracy of `topk` at the same stage with a fixed budget equal to the
  tokens the policy kept on average on that family (interpolated between the two nearest budgets
  the sweep ran, linear in log2 tokens; "-" outside them), and those mean tokens. Then how many
  (setting, family) cells the policy is above, equal to and below the fixed budget. "" without
  adaptive rows."""
  adaptive = _adaptive_rows(rows)
  if not adaptive:
    return ""
  head = ["setting", "capacity", "kept tokens"] + list(families)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  tally = [0, 0, 0]  # above, equal, below
  for r in adaptive:
    cells = [r["setting"], str(r["budget"]), f"{r['kept_tokens']:.1f}"]
    for f in families:
      kept = r["kept_per_family"].get(f)
      if kept is None or f not in r["per_family"]:
        cells.append("-")
        continue
      fixed = at_tokens(_twin_curves(rows, f).get(r["stage"], []), kept)
      acc = r["per_family"][f]
      cells.append(f"{acc:.2f} vs {_fmt(fixed, '.2f')} @ {kept:.1f}")
      if fixed is not None:
        tally[0 if acc > fixed + 1e-9 else 2 if acc < fixed - 1e-9 else 1] += 1
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Adaptive above the fixed budget at equal mean tokens in {tally[0]} (setting, "
            f"family) cells, equal in {tally[1]}, below in {tally[2]}."]
  return "\n".join(lines)


def _adaptive_plot(rows, families, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  adaptive = _adaptive_rows(rows)
  stages = sorted({r["stage"] for r in adaptive}, key=list(_STAGE_STYLE).index)
  color = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(stages)}
  policies = sorted({r["method"] for r in adaptive})
  marker = {m: "os^D"[i % 4] for i, m in enumerate(policies)}
  ncols = min(4, len(families))
  nrows = -(-len(families) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
  for ax, fam in zip(axes.flat, families):
    for st, pts in _twin_curves(rows, fam).items():
      if st in color:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, _STAGE_STYLE[st], color=color[st], lw=1.2,
                label=f"{TWIN} ({st}), fixed budget")
    for m in policies:
      for st in stages:
        pts = [(r["kept_per_family"][fam], r["per_family"][fam]) for r in adaptive
               if r["method"] == m and r["stage"] == st and fam in r["kept_per_family"]
               and fam in r["per_family"]]
        if pts:
          xs, ys = zip(*sorted(pts))
          ax.plot(xs, ys, linestyle="none", marker=marker[m], ms=5, mfc="none",
                  color=color[st], label=f"{m} ({st}), mean kept")
    full = rows[0]
    if fam in full.get("per_family", {}):
      ax.axhline(full["per_family"][fam], color="k", lw=1, ls="--", label="uncompressed")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(fam)
    ax.set_xlabel("image tokens kept per example (mean)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(families):]:
    ax.axis("off")
  legend = {}  # every series once, whichever family has it
  for ax in axes.flat:
    for h, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, h)
  fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5),
             fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Retained patches on the sweep's own images.
# ---------------------------------------------------------------------------------------------


def retained_picture(image: np.ndarray, src: Sequence[int], patch: int) -> np.ndarray:
  """What a compressed token set keeps of one image: float[H, W, 3] in [0, 1].

  image: float[H, W, 3] in [-1, 1] (the model's input); src: int[(H/patch) * (W/patch)], the
  token carrying each patch in raster order (-1: dropped). A patch carried alone keeps its
  pixels, a dropped one is dimmed, and the patches merged into one token are painted in their
  mean colour (what the decoder gets is one vector for all of them).
  """
  img = (np.asarray(image, np.float32) + 1.0) / 2.0
  h, w = img.shape[0] // patch, img.shape[1] // patch
  src = np.asarray(src, np.int64)
  if src.shape != (h * w,):
    raise ValueError(f"src must have one entry per patch ({h * w}), got shape {src.shape}")
  colour = img.reshape(h, patch, w, patch, 3).mean((1, 3)).reshape(-1, 3)
  carried = src >= 0
  n = int(src.max()) + 1 if carried.any() else 0
  count = np.bincount(src[carried], minlength=n)
  mean = np.zeros((n, 3))
  np.add.at(mean, src[carried], colour[carried])
  mean /= np.maximum(count, 1)[:, None]
  merged = carried & (count[np.maximum(src, 0)] > 1)
  up = lambda a: np.repeat(np.repeat(a.reshape(h, w, *a.shape[1:]), patch, 0), patch, 1)
  out = np.where(up(carried)[..., None], img, 0.25 * img + 0.1)
  return np.where(up(merged)[..., None], up(mean[np.maximum(src, 0)]), out)


def retained_pictures(rows: Sequence[Dict[str, Any]], examples: Sequence[Dict[str, Any]],
                      out_dir: str, patch: int) -> List[str]:
  """One PNG per budget, retained_<budget>.png: a row per vision-side setting that recorded
  pictures ("retained", from `sweep.run` with `pictures`), a column per recorded example (its
  family and question above it), the input image first. Returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with_pics = [r for r in rows if r.get("retained")]
  paths = []
  for budget in sorted({r["budget"] for r in with_pics}, reverse=True):
    rs = [r for r in with_pics if r["budget"] == budget]
    cols = sorted({int(i) for r in rs for i in r["retained"]})
    fig, axes = plt.subplots(len(rs) + 1, len(cols), figsize=(1.3 * len(cols), 1.3 * (len(rs) + 1)),
                             squeeze=False)
    for c, i in enumerate(cols):
      axes[0, c].imshow((examples[i]["image"] + 1.0) / 2.0, interpolation="nearest")
      axes[0, c].set_title(f"{examples[i]['family']}: {examples[i]['prefix']}", fontsize=5)
      for k, r in enumerate(rs, 1):
        src = r["retained"].get(str(i))
        if src is not None:
          axes[k, c].imshow(retained_picture(examples[i]["image"], src, patch),
                            interpolation="nearest")
    for k, r in enumerate([None] + rs):
      axes[k, 0].set_ylabel("input" if r is None else f"{r['method']}\n({r['stage']})",
                            fontsize=5, rotation=0, ha="right", va="center")
    for ax in axes.flat:
      ax.set_xticks([])
      ax.set_yticks([])
    fig.suptitle(f"retained patches at {budget} image tokens (dimmed: dropped; flat colour: "
                 "merged into one token)", fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f"retained_{budget}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths
