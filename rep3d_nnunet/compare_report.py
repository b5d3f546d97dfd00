"""The report of ``rep3d-nnunet compare``: tables and plot from its probe rows and step times, no training.

A row is one probe of one run (``compare.CSV_FIELDS`` plus ``dice_<class>`` per foreground class); a speed row one
contender's median seconds per training step, measured interleaved in one process (``compare.measure_speed``).
Contenders appear in the order of their first row; a contender marked ``control`` is one of nnU-Net's own, and every
other contender is compared with the best control fold by fold. Means over folds only use the folds that every
contender has at that probe, so that no mean compares unlike folds; where contenders have different probes (a budget
in seconds gives each its own schedule) each contender's own folds at that probe are used.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)


def _iterations(rows: list[dict]) -> list[int]:
    return sorted({int(r["iteration"]) for r in rows})


def _trainers(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["trainer"] for r in rows))


def class_names(rows: list[dict]) -> list[str]:
    """The foreground classes of the rows' ``dice_<class>`` columns, in column order."""
    return [k[len("dice_"):] for k in rows[0] if k.startswith("dice_") and any(r.get(k) for r in rows)] if rows else []


def dice_at(rows: list[dict], key: str = "mean_dice") -> dict[tuple[str, int, int], float]:
    """{(trainer, fold, iteration): value}."""
    return {(r["trainer"], int(r["fold"]), int(r["iteration"])): float(r[key]) for r in rows}


def complete_folds(rows: list[dict], iteration: int) -> list[int]:
    """The folds on which every contender in ``rows`` has a probe at ``iteration``: means over different folds per
    contender would not compare like with like."""
    trainers = set(r["trainer"] for r in rows)
    folds = sorted({int(r["fold"]) for r in rows})
    have = {(r["trainer"], int(r["fold"])) for r in rows if int(r["iteration"]) == iteration}
    return [f for f in folds if all((t, f) in have for t in trainers)]


def own_schedules(rows: list[dict]) -> bool:
    """Whether the contenders ran schedules of their own (a budget in seconds): then they have different probes."""
    return len({r.get("max_iterations") for r in rows}) > 1


def probe_folds(values: dict, rows: list[dict], trainer: str, iteration: int) -> list[int]:
    """The folds a mean of ``trainer`` at ``iteration`` uses: those every contender has there; with schedules of
    their own, the folds of the trainer's probe that every contender has run."""
    if not own_schedules(rows):
        return complete_folds(rows, iteration)
    shared = set.intersection(*({int(r["fold"]) for r in rows if r["trainer"] == t} for t in _trainers(rows)))
    return sorted(f for t, f, i in values if t == trainer and i == iteration and f in shared)


def is_control(rows: list[dict], trainer: str) -> bool:
    return any(r["trainer"] == trainer and r.get("control") == "True" for r in rows)


def best_control(values: dict, rows: list[dict], fold: int, iteration: int) -> tuple[str, float] | None:
    """The nnU-Net control with the highest Dice on this fold at this probe, and that Dice."""
    candidates = [(values[t, fold, iteration], t) for t in _trainers(rows)
                  if is_control(rows, t) and (t, fold, iteration) in values]
    return (max(candidates)[1], max(candidates)[0]) if candidates else None


def dice_table(rows: list[dict]) -> list[str]:
    """Mean Dice of the foreground classes at every probe: mean ± std over the folds every contender has at that
    probe (each contender's own folds where contenders have different probes)."""
    values = dice_at(rows)
    iterations = _iterations(rows)
    folds = {i: complete_folds(rows, i) for i in iterations}

    def column(i: int) -> str:
        return f"{i} it" if own_schedules(rows) else f"{i} it ({len(folds[i])} fold{'s' * (len(folds[i]) != 1)})"

    lines = [f"**mean Dice ({' and '.join(class_names(rows))}), mean ± std over folds**\n",
             "| trainer | " + " | ".join(column(i) for i in iterations) + " |",
             "| --- |" + " --- |" * len(iterations)]
    for trainer in _trainers(rows):
        cells = []
        for i in iterations:
            v = [values[trainer, f, i] for f in probe_folds(values, rows, trainer, i) if (trainer, f, i) in values]
            cells.append("-" if not v else f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def class_table(rows: list[dict]) -> list[str]:
    """Dice per class at the last probe of those with the most complete folds (a longer probe run on fewer folds
    has its means in the Dice table); with schedules of their own, at the end of each contender's schedule."""
    names = class_names(rows)
    values = dice_at(rows)
    if own_schedules(rows):
        last = {t: max(int(r["iteration"]) for r in rows if r["trainer"] == t) for t in _trainers(rows)}
        folds = {t: probe_folds(values, rows, t, last[t]) for t in last}
        title = (f"**Dice per class at the end of each contender's schedule** (folds "
                 f"{', '.join(map(str, sorted(set().union(*folds.values()))))})\n")
    else:
        iterations = [i for i in _iterations(rows) if complete_folds(rows, i)]
        if not iterations:
            return []
        end = max(iterations, key=lambda i: (len(complete_folds(rows, i)), i))
        last = {t: end for t in _trainers(rows)}
        folds = {t: complete_folds(rows, end) for t in last}
        title = f"**Dice per class after {end} iterations** (folds {', '.join(map(str, folds[_trainers(rows)[0]]))})\n"
    lines = [title, "| trainer | " + " | ".join(names) + " | mean |", "| --- |" + " --- |" * (len(names) + 1)]
    for trainer in _trainers(rows):
        cells = []
        for key in [f"dice_{name}" for name in names] + ["mean_dice"]:
            v = [float(r[key]) for r in rows if r["trainer"] == trainer and int(r["iteration"]) == last[trainer]
                 and int(r["fold"]) in folds[trainer]]
            cells.append(f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def paired_table(rows: list[dict]) -> list[str]:
    """Each non-control contender's mean Dice minus the best nnU-Net control's on the same fold and probe (paired:
    folds differ more from each other than contenders on one fold): mean over folds, and on how many folds it is at
    least level. Empty without controls."""
    values = dice_at(rows)
    iterations = [i for i in _iterations(rows) if complete_folds(rows, i)]
    controls = [t for t in _trainers(rows) if is_control(rows, t)]
    if not controls or not iterations:
        return []
    lines = [f"**mean Dice minus the best nnU-Net control ({' / '.join(controls)}, whichever is higher) on the same "
             f"fold and probe: mean over folds (at least level on k of n folds)**\n",
             "| trainer | " + " | ".join(f"{i} it" for i in iterations) + " |", "| --- |" + " --- |" * len(iterations)]
    for trainer in _trainers(rows):
        if trainer in controls:
            continue
        cells = []
        for i in iterations:
            differences = [values[trainer, f, i] - best_control(values, rows, f, i)[1]
                           for f in complete_folds(rows, i)]
            cells.append(f"{np.mean(differences):+.3f} ({sum(d >= 0 for d in differences)}/{len(differences)})")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def plateau_lines(rows: list[dict]) -> list[str]:
    """The best control's gain over each doubling of the budget, per fold: the budget says something once the last
    doubling adds < 0.01 Dice."""
    values = dice_at(rows)
    iterations = _iterations(rows)
    lines = []
    for fold in sorted({int(r["fold"]) for r in rows}):
        gains = []
        for previous, current in zip(iterations, iterations[1:]):
            a, b = best_control(values, rows, fold, previous), best_control(values, rows, fold, current)
            if a and b and current == 2 * previous:
                gains.append(f"{previous} -> {current}: {b[1] - a[1]:+.3f}")
        if gains:
            lines.append(f"- fold {fold}: best control's gain per doubling: " + ", ".join(gains))
    if lines:
        lines = ["**plateau** (the best nnU-Net control's mean Dice gain over each doubling; < 0.01: plateaued)\n",
                 *lines, ""]
    return lines


def _step_times(rows: list[dict], speed: list[dict]) -> tuple[dict[str, float], list[str]]:
    """({trainer: seconds per iteration}, the controls that have one, in the rows' order: the first is the reference
    whose probes set the equal-time budgets)."""
    seconds = {r["trainer"]: float(r["seconds_per_iteration"]) for r in speed}
    return seconds, [t for t in _trainers(rows) if is_control(rows, t) and t in seconds]


def speed_table(rows: list[dict], speed: list[dict]) -> list[str]:
    """Seconds per iteration (one process, interleaved, one thread) and Dice at equal training time: each contender's
    Dice at the last probe reached within the time the reference control needs for each of its probes."""
    if not speed:
        return ["Speed: not measured (run with --speed-iterations N).\n"]
    seconds, controls = _step_times(rows, speed)
    reference = controls[0] if controls else None
    first = speed[0]
    lines = [f"**speed**: median seconds of one training step (nnU-Net's train_step: forward, loss, backward, "
             f"optimizer), {first['steps']} steps each, contenders interleaved in one process, {first['device']}"
             f"{', one thread' if first['device'] == 'cpu' else ''}, batch {first['batch_size']}\n",
             "| trainer | s / iteration | relative to " + (reference or "-") + " |", "| --- | --- | --- |"]
    for trainer in _trainers(rows) + [t for t in seconds if t not in _trainers(rows)]:
        if trainer in seconds:
            ratio = f"{seconds[trainer] / seconds[reference]:.2f}x" if reference else "-"
            lines.append(f"| {trainer} | {seconds[trainer]:.3f} | {ratio} |")
    lines.append("")
    if reference is None:
        return lines
    values = dice_at(rows)
    probed = {(t, i) for t, _, i in values}
    probes = {t: [i for i in _iterations(rows) if (t, i) in probed and probe_folds(values, rows, t, i)]
              for t in _trainers(rows)}
    budgets = [i * seconds[reference] for i in probes[reference]]
    lines += [f"**Dice at equal training time**: mean Dice at the last probe each contender reaches within the "
              f"training time {reference} needs for its probes (time = iterations x s / iteration above; - : not "
              f"even the first probe)\n",
              "| trainer | " + " | ".join(f"{b:.0f} s" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for trainer in _trainers(rows):
        if trainer not in seconds:
            continue
        cells = []
        for budget in budgets:
            reached = [i for i in probes[trainer] if i * seconds[trainer] <= budget * (1 + 1e-9)]
            if not reached:
                cells.append("-")
                continue
            i = reached[-1]
            v = [values[trainer, f, i] for f in probe_folds(values, rows, trainer, i) if (trainer, f, i) in values]
            cells.append(f"{np.mean(v):.3f} ({i} it)")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def reached_within(rows: list[dict], seconds: dict[str, float], trainer: str, fold: int,
                   budget: float) -> tuple[int, float] | None:
    """(iteration, mean Dice) of ``trainer``'s last probe on ``fold`` within ``budget`` seconds of training; None where
    its run has not trained that far: no probe within the budget, a last probe short of half of it (probes double at
    most), or a stop before a probe it makes on another fold that would still be within the budget (a run cut short is
    not counted as if it had used the time)."""
    own = sorted((int(r["iteration"]), float(r["mean_dice"])) for r in rows
                 if r["trainer"] == trainer and int(r["fold"]) == fold)
    within = [(i, v) for i, v in own if i * seconds[trainer] <= budget * (1 + 1e-9)]
    if not within or 2 * own[-1][0] * seconds[trainer] < budget * (1 - 1e-9):
        return None
    later = [i for i in _iterations([r for r in rows if r["trainer"] == trainer]) if i > own[-1][0]]
    if later and later[0] * seconds[trainer] <= budget * (1 + 1e-9):
        return None
    return within[-1]


def equal_time_paired_table(rows: list[dict], speed: list[dict]) -> list[str]:
    """Each non-control contender against the best nnU-Net control at equal training time, fold by fold: at each
    budget (the reference control's probes times its seconds per step) every contender's last probe within the budget,
    minus the best of the controls' last probes within it on the same fold; mean over the folds where both have run
    that far, and on how many of them the contender is at least level. Empty without step times or controls."""
    seconds, controls = _step_times(rows, speed)
    if not controls:
        return []
    reference = controls[0]
    budgets = [i * seconds[reference] for i in _iterations([r for r in rows if r["trainer"] == reference])]
    folds = sorted({int(r["fold"]) for r in rows})
    best_control = {}  # (fold, budget) -> the best control's Dice there, where a control has trained that far
    for fold in folds:
        for budget in budgets:
            reached = [v for v in (reached_within(rows, seconds, c, fold, budget) for c in controls) if v is not None]
            if reached:
                best_control[fold, budget] = max(v for _, v in reached)
    lines = [f"**at equal training time, mean Dice minus the best nnU-Net control ({' / '.join(controls)}) on the same "
             f"fold**: each at its last probe within the training time {reference} needs for its probes (in brackets "
             f"its iterations there); mean over the folds where both have run that far (at least level on k of n "
             f"folds)\n",
             "| trainer | " + " | ".join(f"{b:.0f} s ({b / seconds[reference]:.0f} it)" for b in budgets) + " |",
             "| --- |" + " --- |" * len(budgets)]
    for trainer in _trainers(rows):
        if trainer in controls or trainer not in seconds:
            continue
        cells = []
        for budget in budgets:
            differences, reached = [], set()
            for fold in folds:
                own = reached_within(rows, seconds, trainer, fold, budget)
                if own is None or (fold, budget) not in best_control:
                    continue
                differences.append(own[1] - best_control[fold, budget])
                reached.add(own[0])
            cells.append("-" if not differences else
                         f"{np.mean(differences):+.3f} ({sum(d >= 0 for d in differences)}/{len(differences)}; "
                         f"{'/'.join(map(str, sorted(reached)))} it)")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_table(rows: list[dict], speed: list[dict] | None = None) -> str:
    """Markdown: the header, Dice at every probe, per class at the last, paired against the best control, plateau,
    speed and Dice at equal training time."""
    folds = sorted({int(r["fold"]) for r in rows})
    first = rows[0]
    schedules = sorted({r.get("max_iterations") or "?" for r in rows}, key=lambda s: (len(s), s))
    schedule = (f"one schedule of {schedules[0]} iterations per run" if len(schedules) == 1 else
                f"one schedule per contender ({', '.join(schedules)} iterations: the same training time)")
    header = (f"Fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))} of nnU-Net's 5-fold split; "
              f"{schedule} (nnU-Net's poly decay over all of them), probed on the way; batch {first['batch_size']}, "
              f"features {first['features']}, mirroring {'on' if first['mirroring'] == 'True' else 'off'}, "
              f"{first['device']}. Dice from nnU-Net's validation (compute_metrics_on_folder, mean over the fold's "
              f"validation cases).\n")
    # contenders with schedules of their own are compared at equal time only: at equal iterations their learning
    # rates have decayed differently
    per_iteration = [] if own_schedules(rows) else [*paired_table(rows), *plateau_lines(rows)]
    lines = [header, *dice_table(rows), *class_table(rows), *per_iteration, *speed_table(rows, speed or []),
             *equal_time_paired_table(rows, speed or [])]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, speed: list[dict] | None = None) -> None:
    """Mean Dice (and the min-max band over folds) against iterations and, with step times, against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = {r["trainer"]: float(r["seconds_per_iteration"]) for r in speed or []}
    device = (speed or [{}])[0].get("device", "cpu")
    values = dice_at(rows)
    with plt.style.context("default"):  # nnU-Net's progress plots change matplotlib's global style
        panels = 2 if seconds else 1
        figure, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5), squeeze=False)
        for panel, axis in enumerate(axes[0]):
            for trainer in _trainers(rows):
                if panel == 1 and trainer not in seconds:
                    continue
                per_probe = [(i, [values[trainer, f, i] for f in probe_folds(values, rows, trainer, i)
                                  if (trainer, f, i) in values]) for i in _iterations(rows)]
                kept = [(i, v) for i, v in per_probe if v]
                if not kept:
                    continue
                x = [i * (seconds[trainer] if panel else 1) for i, _ in kept]
                style = "--" if is_control(rows, trainer) else "-"
                axis.plot(x, [np.mean(v) for _, v in kept], style, marker="o", label=trainer)
                axis.fill_between(x, [min(v) for _, v in kept], [max(v) for _, v in kept], alpha=0.12)
            folds = sorted({int(r["fold"]) for r in rows})
            axis.set_xscale("log", base=2)
            clock = "one CPU thread" if device == "cpu" else device
            axis.set_xlabel("training iteration" if panel == 0 else f"training time (s, {clock}, measured step time "
                                                                      f"x iterations)")
            axis.set_ylabel(f"validation Dice, mean of {', '.join(class_names(rows))}")
            axis.set_title(f"mean and min-max over folds {', '.join(map(str, folds))}", fontsize=10)
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3, which="both")
        axes[0][-1].legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def write_report(rows: list[dict], speed: list[dict], output: Path, stem: str,
                 tabulate: Callable[[list[dict], list[dict]], str] = summary_table) -> str:
    """``stem``.png and ``stem``.md in ``output``; returns the tables (Markdown)."""
    plot(rows, output / f"{stem}.png", speed)
    table = tabulate(rows, speed)
    (output / f"{stem}.md").write_text(table)
    return table
