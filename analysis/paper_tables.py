"""Render the paper's own published numbers (Tables 1-11; METHOD.md §6-7, paper Tables 1-2)
through ``persistworld.analysis.tables``: a check of the renderer (the bold / underlined cells
must be the ones the numbers imply, as in the paper) and an example of its use.

    python analysis/paper_tables.py [--out DIR] [--check]

Prints every table as Markdown; with ``--out`` also writes ``tableN.{md,tex,csv}``.
``--check`` asserts, for every column of every table, that the bold cells hold the best value
and the underlined ones the next distinct value in the metric's direction, and exits 1 if not.
The values are the paper's published numbers (single runs: no std, no n).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from persistworld.analysis.stats import HIGHER_IS_BETTER
from persistworld.analysis.tables import MAIN_DECIMALS, Table, table_from_values

# Tables 3-11: factor, rows ("*" = paper default), values (ext SSIM, PSNR, LPIPS;
# wrist SSIM, PSNR, LPIPS), all 10-step rollouts.
ABLATIONS: dict[int, tuple[str, str, list[tuple[str, list[float]]]]] = {
    3: ("Ablation of the post-training learning rate.", "Learning rate", [
        ("3e-4", [0.865, 25.02, 0.1230, 0.706, 19.95, 0.3603]),
        ("1e-4*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387])]),
    4: ("Ablation of the reward signal.", "Reward", [
        ("LPIPS only", [0.868, 25.17, 0.1156, 0.708, 19.90, 0.3242]),
        ("SSIM only", [0.872, 25.40, 0.1178, 0.724, 20.24, 0.3516]),
        ("PSNR only", [0.871, 25.57, 0.1189, 0.716, 20.45, 0.3544]),
        ("Combined*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387])]),
    5: ("Ablation of the prefix (context-window) strategy.", "Strategy", [
        ("Fixed 3", [0.872, 25.53, 0.1170, 0.723, 20.51, 0.3381]),
        ("Fixed 6", [0.871, 25.41, 0.1174, 0.719, 20.33, 0.3423]),
        ("Curriculum (growing)", [0.871, 25.50, 0.1169, 0.721, 20.43, 0.3412]),
        ("Random 0-9*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387]),
        ("Random 0-4", [0.873, 25.52, 0.1161, 0.722, 20.44, 0.3391])]),
    6: ("Ablation of the group size and best-of-N (at group size 16).", "Config", [
        ("K=4", [0.875, 25.62, 0.1142, 0.724, 20.56, 0.3379]),
        ("K=8", [0.873, 25.61, 0.1176, 0.721, 20.45, 0.3471]),
        ("K=16, no best-of-N", [0.874, 25.69, 0.1127, 0.725, 20.64, 0.3255]),
        ("K=16, best of 5*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387]),
        ("K=16, best of 2", [0.876, 25.79, 0.1107, 0.727, 20.69, 0.3212])]),
    7: ("Ablation of the branch horizon (chunks per candidate).", "Horizon", [
        ("3", [0.872, 25.41, 0.1169, 0.719, 20.31, 0.3424]),
        ("1*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387])]),
    8: ("Ablation of the wrist-camera reward weight.", "Wrist weight", [
        ("2", [0.872, 25.45, 0.1169, 0.722, 20.47, 0.3357]),
        ("1*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387])]),
    9: ("Effect of KL regularisation.", "KL", [
        ("without", [0.873, 25.50, 0.1163, 0.720, 20.38, 0.3392]),
        ("with*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387])]),
    10: ("Effect of a warming EMA schedule on the old policy.", "Old-policy EMA", [
        ("none", [0.872, 25.51, 0.1162, 0.722, 20.46, 0.3390]),
        ("rising to 0.5*", [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387])]),
    11: ("Effect of an EMA of the trained weights (K=16, best of 2).", "EMA of weights", [
        ("0.9", [0.876, 25.81, 0.1105, 0.726, 20.68, 0.3215]),
        ("none", [0.876, 25.79, 0.1107, 0.727, 20.69, 0.3212])]),
}

# Table 1 (14-step rollouts): blocks External / Wrist; SSIM, PSNR, LPIPS.
TABLE1 = [("external", "WPE", [0.77, 20.33, 0.131]),
          ("external", "IRASim", [0.77, 21.36, 0.117]),
          ("external", "Ctrl-World (reported)", [0.83, 23.56, 0.091]),
          ("external", "Ctrl-World (reproduced)", [0.84, 23.02, 0.081]),
          ("external", "PersistWorld", [0.86, 24.42, 0.070]),
          ("wrist", "Ctrl-World (reproduced)", [0.62, 17.80, 0.310]),
          ("wrist", "PersistWorld", [0.67, 19.39, 0.277])]
# Table 2 (paper, 14-step rollouts): Object-only SSIM, PSNR, LPIPS | Robot-only SSIM, PSNR, LPIPS.
TABLE2 = [("external", "Ctrl-World (reproduced)", [0.88, 22.25, 0.025, 0.82, 17.62, 0.039]),
          ("external", "PersistWorld", [0.89, 23.60, 0.021, 0.86, 19.25, 0.033]),
          ("wrist", "Ctrl-World (reproduced)", [0.73, 18.52, 0.088, 0.83, 25.50, 0.027]),
          ("wrist", "PersistWorld", [0.76, 19.87, 0.078, 0.86, 27.24, 0.023])]


def paper_tables() -> dict[int, Table]:
    out: dict[int, Table] = {}
    for k, (blocks_layout, data) in {1: ("cameras", TABLE1), 2: ("masked", TABLE2)}.items():
        out[k] = table_from_values([r for _, r, _ in data], [v for _, _, v in data],
                                   layout=blocks_layout, blocks=[b for b, _, _ in data],
                                   decimals=MAIN_DECIMALS, row_header="Model",
                                   caption=f"Table {k} (paper numbers)", label=f"tab:paper{k}")
    for k, (caption, header, rows) in ABLATIONS.items():
        out[k] = table_from_values([r for r, _ in rows], [v for _, v in rows],
                                   row_header=header, caption=f"Table {k}: {caption}",
                                   label=f"tab:paper{k}")
    return dict(sorted(out.items()))


def check(table: Table) -> list[str]:
    """Independent re-derivation of the marks: per column (within a row block), bold = the
    best displayed value, underline = the next distinct one."""
    errors = []
    marks, shown = table.marks(), table.displayed()
    blocks = table.blocks or [""] * len(table.rows)
    for block in dict.fromkeys(blocks):
        idx = [i for i, b in enumerate(blocks) if b == block]
        if len(idx) < 2:
            continue
        for j, (_, metric) in enumerate(table.columns):
            vals = sorted({shown[i, j] for i in idx}, reverse=HIGHER_IS_BETTER[metric])
            for i in idx:
                want = ("best" if shown[i, j] == vals[0] else
                        "second" if len(vals) > 1 and shown[i, j] == vals[1] else "")
                if marks[i, j] != want:
                    errors.append(f"{table.caption}: row {table.rows[i]!r} column "
                                  f"{table.columns[j]} marked {marks[i, j]!r}, expected "
                                  f"{want!r}")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write tableN.{md,tex,csv} here")
    p.add_argument("--check", action="store_true", help="verify the marks; exit 1 on mismatch")
    args = p.parse_args(argv)
    errors = []
    for k, table in paper_tables().items():
        print(table.to_markdown())
        if args.out:
            table.write(Path(args.out) / f"table{k}")
        errors += check(table)
    if args.check:
        print("\n".join(errors) if errors else "marks: OK (all tables)")
        return 1 if errors else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
