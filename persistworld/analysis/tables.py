"""Paper-layout tables (METHOD.md §6-7) rendered as Markdown, LaTeX (booktabs), CSV and HTML.

Layouts
-------
* ``ablation`` (Tables 3-11): rows = the factor's settings; columns External SSIM / PSNR /
  LPIPS | Wrist SSIM / PSNR / LPIPS.
* ``cameras`` (Table 1): row blocks External / Wrist, rows = models; columns SSIM / PSNR /
  LPIPS.
* ``masked`` (Table 2): row blocks External / Wrist, rows = models; columns Object-only
  SSIM / PSNR / LPIPS | Robot-only SSIM / PSNR / LPIPS.

Marking: per column (and per row block), the best value is bold and the second best
underlined, in each metric's direction (SSIM, PSNR higher is better; LPIPS lower). Values are
compared as displayed (rounded to the column's decimals) with dense ranking, which is what the
paper does: tied best values are all bold and the next distinct value is underlined (Table 4:
0.872 twice bold, 0.871 underlined). A block with a single row, or a column whose displayed
values are all equal, gets no second. Cells are ``mean ± std`` over seeds with the number of
seeds in an ``n`` column; with one seed per row only the value is shown. A table's ``note``
(e.g. ``sample_size_note``: "n = 3 seeds × 20 episodes (val split)") is printed under it in
every format but the CSV.

Tables are generated from the runs table, never edited by hand (STYLE.md point 11).
"""
from __future__ import annotations

import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from persistworld.analysis.collect import condition_order
from persistworld.analysis.stats import HIGHER_IS_BETTER, summarize_conditions
from persistworld.utils.io import atomic_write_text

METRIC_NAMES = {"ssim": "SSIM", "psnr": "PSNR", "lpips": "LPIPS"}
GROUP_NAMES = {"external": "External", "wrist": "Wrist", "object": "Object-only",
               "robot": "Robot-only"}
# Decimals of the paper's ablation tables (3-11); Tables 1-2 use 2 / 2 / 3.
ABLATION_DECIMALS = {"ssim": 3, "psnr": 2, "lpips": 4}
MAIN_DECIMALS = {"ssim": 2, "psnr": 2, "lpips": 3}
LAYOUTS = {
    "ablation": [(g, m) for g in ("external", "wrist") for m in ("ssim", "psnr", "lpips")],
    "cameras": [("", m) for m in ("ssim", "psnr", "lpips")],
    "masked": [(g, m) for g in ("object", "robot") for m in ("ssim", "psnr", "lpips")],
}


@dataclass
class Table:
    """A rendered-ready table. ``mean``/``std``/``n`` are (rows, columns) arrays; ``columns``
    are (column group, metric) pairs; ``blocks`` gives each row's block label (Tables 1-2)."""
    rows: list[str]
    columns: list[tuple[str, str]]
    mean: np.ndarray
    std: np.ndarray | None = None
    n: np.ndarray | None = None
    blocks: list[str] | None = None
    decimals: Mapping[str, int] = field(default_factory=lambda: dict(ABLATION_DECIMALS))
    row_header: str = ""
    caption: str = ""
    label: str = ""
    note: str = ""             # printed under the table (sample sizes, split)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=float).reshape(len(self.rows), len(self.columns))
        if self.std is not None:
            self.std = np.asarray(self.std, dtype=float).reshape(self.mean.shape)
        if self.n is not None:
            self.n = np.asarray(self.n, dtype=float).reshape(self.mean.shape)
        if self.blocks is not None and len(self.blocks) != len(self.rows):
            raise ValueError("one block label per row")

    # -- marking ---------------------------------------------------------------------------------
    def displayed(self) -> np.ndarray:
        """The means rounded as they are printed (what marking compares)."""
        out = np.empty_like(self.mean)
        for j, (_, metric) in enumerate(self.columns):
            out[:, j] = np.round(self.mean[:, j], self.decimals[metric])
        return out

    def marks(self) -> np.ndarray:
        """(rows, columns) array of ``"best"``, ``"second"`` or ``""``."""
        marks = np.full(self.mean.shape, "", dtype=object)
        shown = self.displayed()
        block_ids = self.blocks if self.blocks is not None else [""] * len(self.rows)
        for block in dict.fromkeys(block_ids):
            idx = np.array([i for i, b in enumerate(block_ids) if b == block])
            if idx.size < 2:
                continue
            for j, (_, metric) in enumerate(self.columns):
                vals = shown[idx, j]
                finite = np.unique(vals[np.isfinite(vals)])  # ascending, distinct
                if finite.size == 0:
                    continue
                ranked = finite[::-1] if HIGHER_IS_BETTER[metric] else finite
                marks[idx[vals == ranked[0]], j] = "best"
                if ranked.size > 1:
                    marks[idx[vals == ranked[1]], j] = "second"
        return marks

    # -- cells -----------------------------------------------------------------------------------
    def _n_per_row(self) -> list[str] | None:
        if self.n is None:
            return None
        out = []
        for row in self.n:
            vals = row[np.isfinite(row)].astype(int)
            lo, hi = (vals.min(), vals.max()) if vals.size else (0, 0)
            out.append(str(lo) if lo == hi else f"{lo}–{hi}")
        return out

    def _cell(self, i: int, j: int, pm: str) -> str:
        m = self.mean[i, j]
        if not np.isfinite(m):
            return "–"
        d = self.decimals[self.columns[j][1]]
        s = f"{m:.{d}f}"
        if self.std is not None and np.isfinite(self.std[i, j]):
            s += f"{pm}{self.std[i, j]:.{d}f}"
        return s

    def _header_names(self, arrow_up: str, arrow_down: str) -> list[str]:
        return [f"{METRIC_NAMES.get(m, m)}{arrow_up if HIGHER_IS_BETTER[m] else arrow_down}"
                for _, m in self.columns]

    def _groups(self) -> list[tuple[str, int]]:
        """Consecutive column groups as (label, span)."""
        spans: list[tuple[str, int]] = []
        for g, _ in self.columns:
            if spans and spans[-1][0] == g:
                spans[-1] = (g, spans[-1][1] + 1)
            else:
                spans.append((g, 1))
        return spans

    # -- renderers -------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Tidy form (what the CSV holds): one row per cell with its mark."""
        marks = self.marks()
        rows = []
        for i, r in enumerate(self.rows):
            for j, (g, m) in enumerate(self.columns):
                rows.append({"block": self.blocks[i] if self.blocks else "", "row": r,
                             "group": g, "metric": m,
                             "higher_is_better": HIGHER_IS_BETTER[m],
                             "mean": self.mean[i, j],
                             "std": self.std[i, j] if self.std is not None else np.nan,
                             "n": self.n[i, j] if self.n is not None else np.nan,
                             "mark": marks[i, j]})
        return pd.DataFrame(rows)

    def to_csv(self) -> str:
        buf = io.StringIO()
        self.to_frame().to_csv(buf, index=False)
        return buf.getvalue()

    def to_markdown(self) -> str:
        """GitHub Markdown: **best**, <u>second</u> (Markdown has no underline of its own)."""
        marks, n_row = self.marks(), self._n_per_row()
        names = self._header_names(" ↑", " ↓")
        head = ([("Cameras" if self.blocks is not None else None)] + [self.row_header or " "]
                + (["n"] if n_row else [])
                + [f"{GROUP_NAMES.get(g, g)} {nm}".strip() for (g, _), nm in
                   zip(self.columns, names)])
        head = [h for h in head if h is not None]
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join([":--"] * (len(head) - len(self.columns))
                                + ["--:"] * len(self.columns)) + "|"]
        prev_block = None
        for i, r in enumerate(self.rows):
            cells = []
            if self.blocks is not None:
                cells.append(GROUP_NAMES.get(self.blocks[i], self.blocks[i])
                             if self.blocks[i] != prev_block else "")
                prev_block = self.blocks[i]
            cells.append(_md_escape(r))
            if n_row:
                cells.append(n_row[i])
            for j in range(len(self.columns)):
                c = self._cell(i, j, " ± ")
                c = {"best": f"**{c}**", "second": f"<u>{c}</u>"}.get(marks[i, j], c)
                cells.append(c)
            lines.append("| " + " | ".join(cells) + " |")
        out = "\n".join(lines) + "\n"
        if self.caption:
            out = f"**{_md_escape(self.caption)}**\n\n" + out
        if self.note:
            out += f"\n{self.note}\n"
        return out

    def to_latex(self) -> str:
        """A booktabs ``table`` (needs ``\\usepackage{booktabs}``): \\textbf best,
        \\underline second."""
        marks, n_row = self.marks(), self._n_per_row()
        lead = (1 if self.blocks is not None else 0) + 1 + (1 if n_row else 0)
        spec = "l" * lead + "c" * len(self.columns)
        lines = [r"\begin{table}[t]", r"\centering"]
        if self.caption:
            lines.append(rf"\caption{{{_tex_escape(self.caption)}}}")
        if self.label:
            lines.append(rf"\label{{{self.label}}}")
        lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
        groups = self._groups()
        names = self._header_names(r"$\uparrow$", r"$\downarrow$")
        lead_cells = ((["Cameras"] if self.blocks is not None else [])
                      + [_tex_escape(self.row_header)] + (["$n$"] if n_row else []))
        if any(g for g, _ in groups):
            top, rules, col = [""] * lead, [], lead + 1
            for g, span in groups:
                top.append(rf"\multicolumn{{{span}}}{{c}}{{{_tex_escape(GROUP_NAMES.get(g, g))}}}")
                rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
                col += span
            lines.append(" & ".join(top) + r" \\")
            lines.append(" ".join(rules))
        lines.append(" & ".join(lead_cells + names) + r" \\")
        lines.append(r"\midrule")
        prev_block = None
        for i, r in enumerate(self.rows):
            if self.blocks is not None and self.blocks[i] != prev_block:
                if prev_block is not None:
                    lines.append(r"\midrule")
                first = _tex_escape(GROUP_NAMES.get(self.blocks[i], self.blocks[i]))
                prev_block = self.blocks[i]
            elif self.blocks is not None:
                first = ""
            cells = ([first] if self.blocks is not None else []) + [_tex_escape(r)]
            if n_row:
                cells.append(n_row[i])
            for j in range(len(self.columns)):
                c = self._cell(i, j, r"$\pm$")
                c = {"best": rf"\textbf{{{c}}}", "second": rf"\underline{{{c}}}"}.get(
                    marks[i, j], c)
                cells.append(c)
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        if self.note:
            lines += [r"\par\smallskip", rf"{{\footnotesize {_tex_escape(self.note)}}}"]
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """An HTML ``<table>`` (<b> best, <u> second) for the report."""
        marks, n_row = self.marks(), self._n_per_row()
        esc = html.escape
        lead = ((["Cameras"] if self.blocks is not None else []) + [self.row_header or ""]
                + (["n"] if n_row else []))
        out = ['<table class="paper">']
        if self.caption:
            out.append(f"<caption>{esc(self.caption)}</caption>")
        groups = self._groups()
        if any(g for g, _ in groups):
            out.append("<tr>" + "".join("<th></th>" for _ in lead) + "".join(
                f'<th colspan="{s}">{esc(GROUP_NAMES.get(g, g))}</th>' for g, s in groups)
                + "</tr>")
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in
                                    lead + self._header_names(" ↑", " ↓")) + "</tr>")
        prev_block = None
        for i, r in enumerate(self.rows):
            cells = []
            if self.blocks is not None:
                b = self.blocks[i]
                cells.append(esc(GROUP_NAMES.get(b, b)) if b != prev_block else "")
                prev_block = b
            cells.append(esc(r))
            if n_row:
                cells.append(n_row[i])
            row_html = "".join(f"<td>{c}</td>" for c in cells)
            for j in range(len(self.columns)):
                c = esc(self._cell(i, j, " ± "))
                c = {"best": f"<b>{c}</b>", "second": f"<u>{c}</u>"}.get(marks[i, j], c)
                row_html += f'<td class="num">{c}</td>'
            out.append(f"<tr>{row_html}</tr>")
        out.append("</table>")
        if self.note:
            out.append(f'<p class="note">{esc(self.note)}</p>')
        return "\n".join(out) + "\n"

    def write(self, stem: str | os.PathLike) -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.tex`` and ``<stem>.csv`` (atomically)."""
        stem = Path(stem)
        paths = {}
        for ext, text in (("md", self.to_markdown()), ("tex", self.to_latex()),
                          ("csv", self.to_csv())):
            paths[ext] = stem.with_name(f"{stem.name}.{ext}")
            atomic_write_text(paths[ext], text)
        return paths


def _md_escape(s: str) -> str:
    return str(s).replace("|", r"\|")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "–": "--", "±": r"$\pm$", "×": r"$\times$", "*": r"$^*$"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _count(values: Sequence[int], unit: str) -> str:
    vals = sorted({int(v) for v in values})
    if not vals:
        return f"? {unit}"
    text = str(vals[0]) if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"
    one = len(vals) == 1 and vals[0] == 1
    return f"{text} {unit[:-1] if one and unit.endswith('s') else unit}"


def split_text(splits: Sequence[str | None]) -> str:
    """``"val split"`` from the split of each run (None where unknown), saying when some are
    unknown or when the runs disagree."""
    known = sorted({str(s) for s in splits if s is not None and str(s) not in ("", "nan")})
    unknown = any(s is None or str(s) in ("", "nan") for s in splits) or not list(splits)
    if len(known) == 1:
        return f"{known[0]} split" + (", not recorded for some runs" if unknown else "")
    if known:
        return "/".join(known) + " splits: they differ between runs!"
    return "split not recorded"


def sample_size_note(seeds: Sequence[int], episodes: Sequence[int],
                     splits: Sequence[str | None] = (), *, unit: str = "episodes",
                     extra: str = "") -> str:
    """The line printed under a table: ``"n = 3 seeds × 20 episodes (val split)"``.

    ``seeds``: seeds per condition (a range is shown when they differ); ``episodes``:
    evaluation samples per run; ``splits``: the split of each run's evaluation (None where
    unknown: "split not recorded", see ``split_text``); ``extra`` is appended after a
    semicolon."""
    line = (f"n = {_count(seeds, 'seeds')} × {_count(episodes, unit)} "
            f"({split_text(splits)})")
    return line + (f"; {extra}" if extra else "")


# -- builders --------------------------------------------------------------------------------------
def table_from_values(rows: Sequence[str], values: Sequence[Sequence[float]], *,
                      layout: str = "ablation", blocks: Sequence[str] | None = None,
                      std: Sequence[Sequence[float]] | None = None,
                      n: Sequence[Sequence[float]] | None = None,
                      decimals: Mapping[str, int] | None = None, **kw) -> Table:
    """A table from numbers typed in (e.g. the paper's), in one of ``LAYOUTS``."""
    if decimals is None:
        decimals = ABLATION_DECIMALS if layout == "ablation" else MAIN_DECIMALS
    return Table(rows=list(rows), columns=list(LAYOUTS[layout]), mean=np.asarray(values),
                 std=None if std is None else np.asarray(std),
                 n=None if n is None else np.asarray(n),
                 blocks=None if blocks is None else list(blocks), decimals=dict(decimals), **kw)


def metric_column(eval_name: str, group: str, metric: str, mask: str | None = None) -> str:
    """Runs-table column of a whole-rollout metric: ``<eval>/[<mask>/]<group>/<metric>``."""
    return "/".join([eval_name] + ([mask] if mask else []) + [group, metric])


def _from_runs(runs: pd.DataFrame, factors: Sequence[str], cells: list[tuple[str, str, str]],
               columns: list[tuple[str, str]], with_blocks: bool, *,
               seed_key: str, order: Sequence[str] | None, labels: Mapping[str, str] | None,
               statuses: Sequence[str], **kw) -> Table:
    """``cells[k] = (block, (group, metric) column index key, runs-table column)``."""
    summary = summarize_conditions(runs, factors, [c for _, _, c in cells], seed_key=seed_key,
                                   statuses=statuses)
    done = runs[runs["status"].isin(list(statuses))]
    conds = list(order) if order is not None else condition_order(done, factors)
    blocks = list(dict.fromkeys(b for b, _, _ in cells))
    row_keys = [(b, c) for b in blocks for c in conds]
    col_index = {key: j for j, key in enumerate(columns)}
    mean = np.full((len(row_keys), len(columns)), np.nan)
    std, n = mean.copy(), np.zeros_like(mean)
    lookup = summary.set_index(["condition", "column"])
    for b, colkey, runs_col in cells:
        j = col_index[colkey]
        for c in conds:
            i = row_keys.index((b, c))
            if (c, runs_col) in lookup.index:
                rec = lookup.loc[(c, runs_col)]
                mean[i, j], std[i, j], n[i, j] = rec["mean"], rec["std"], rec["n"]
    show_std = bool(np.nanmax(n, initial=0) > 1)
    row_labels = [labels.get(c, c) if labels else c for _, c in row_keys]
    row_header = kw.pop("row_header", None) or ", ".join(f.rsplit(".", 1)[-1] for f in factors)
    return Table(rows=row_labels, columns=columns, mean=mean, std=std if show_std else None,
                 n=n, blocks=[b for b, _ in row_keys] if with_blocks else None,
                 row_header=row_header, **kw)


def ablation_table(runs: pd.DataFrame, factors: Sequence[str], eval_name: str, *,
                   mask: str | None = None, seed_key: str = "cfg.seed",
                   order: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                   statuses: Sequence[str] = ("completed",),
                   decimals: Mapping[str, int] = ABLATION_DECIMALS, **kw) -> Table:
    """Tables 3-11 layout from the runs table: one row per factor setting, mean ± std over
    seeds. ``mask="object"|"robot"`` uses the masked metrics. ``order``: condition labels in
    display order (default: by factor value); ``labels``: display names for them."""
    columns = LAYOUTS["ablation"]
    cells = [("", (g, m), metric_column(eval_name, g, m, mask)) for g, m in columns]
    return _from_runs(runs, factors, cells, columns, False, seed_key=seed_key, order=order,
                      labels=labels, statuses=statuses, decimals=dict(decimals), **kw)


def cameras_table(runs: pd.DataFrame, factors: Sequence[str], eval_name: str, *,
                  seed_key: str = "cfg.seed", order: Sequence[str] | None = None,
                  labels: Mapping[str, str] | None = None,
                  statuses: Sequence[str] = ("completed",),
                  decimals: Mapping[str, int] = ABLATION_DECIMALS, **kw) -> Table:
    """Table 1 layout: row blocks External / Wrist, one row per model (factor setting)."""
    columns = LAYOUTS["cameras"]
    cells = [(g, ("", m), metric_column(eval_name, g, m)) for g in ("external", "wrist")
             for _, m in columns]
    return _from_runs(runs, factors, cells, columns, True, seed_key=seed_key, order=order,
                      labels=labels, statuses=statuses, decimals=dict(decimals), **kw)


def masked_table(runs: pd.DataFrame, factors: Sequence[str], eval_name: str, *,
                 seed_key: str = "cfg.seed", order: Sequence[str] | None = None,
                 labels: Mapping[str, str] | None = None,
                 statuses: Sequence[str] = ("completed",),
                 decimals: Mapping[str, int] = ABLATION_DECIMALS, **kw) -> Table:
    """Table 2 layout: row blocks External / Wrist; columns Object-only | Robot-only."""
    columns = LAYOUTS["masked"]
    cells = [(g, (mask, m), metric_column(eval_name, g, m, mask)) for g in ("external", "wrist")
             for mask, m in columns]
    return _from_runs(runs, factors, cells, columns, True, seed_key=seed_key, order=order,
                      labels=labels, statuses=statuses, decimals=dict(decimals), **kw)
