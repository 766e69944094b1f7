"""results.json -> results.md and the figures. A pure function of the JSON, so a report can be redrawn:

    python -m evaluation.report docs/results/cifar10-cpu
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FIGURES = {"responses": "fig2_responses.png", "entropy": "entropy_histograms.png", "tradeoff": "tradeoff.png",
           "attacks": "attacks.png"}


def pm(cell: dict, scale: float = 100.0, signed: bool = False, mark: bool = False) -> str:
    """mean ± the half-width of its 95% interval over seeds, in percent (one seed: the mean alone). `mark`: a
    paired difference whose interval excludes 0 is starred."""
    mean = f"{cell['mean'] * scale:+.2f}" if signed else f"{cell['mean'] * scale:.2f}"
    if len(cell["values"]) < 2:
        return mean
    half = cell.get("ci95")
    if half is None:  # results written before the intervals: the std
        half = cell["std"]
    star = "*" if mark and cell.get("significant") else ""
    return f"{mean} ± {half * scale:.2f}{star}"


def _seeds_note(results: dict) -> str:
    n = len(results["settings"]["seeds"])
    return ("one seed: no interval." if n < 2 else
            f"± is the half-width of the 95% t interval over the {n} seeds (t with {n - 1} degrees of freedom); "
            "a paired difference is taken seed by seed (the same student seed against both teachers), and a * "
            "marks one whose interval excludes 0.")


def practitioner_table(results: dict) -> list[str]:
    """One line per defense, for choosing one: what it costs the teacher and the service, and what the strongest
    thief of the suite still takes, against Base and against labelling the queries."""
    if not results.get("worst_case"):
        return []
    s = results["settings"]
    students = s["students"]
    rows = [r for r in _main_rows(results) if r in results["worst_case"]]
    latency = results.get("latency_ms", {})
    base = next((r for r in rows if s.get("row_kinds", {}).get(r) == "teacher" and r == "base"), None)
    ref = results["students"].get("reference", {})
    n_attacks = len(next(iter(results['attacks'].values()))[students[0]])
    lines = ["## At a glance: which defense, at what cost", "",
             f"Per defense, the worst case over the {n_attacks} attacks of the suite (query protocol: the thief has "
             f"no labels and queries the served model with {s['query_size']} images the teacher never saw). "
             f"{_seeds_note(results)}", ""]
    if any(w.get("raced_out") for row in rows for w in results["worst_case"][row].values()):
        lines += [f"† the seeds after the first ran only the attacks within {s.get('race'):g} points of the row's "
                  "worst case on the first seed (a race; the attacks left out are in the suite's table below): "
                  "their worst case is over those, so it can only be lower than the whole suite's, by as much as "
                  "a left-out attack would have beaten the ones kept.", ""]
    if ref:
        lines += ["Reference: " + ", ".join(f"a {a} trained with the true labels of the thief's queries reaches "
                                            f"{pm(ref[a])}%" for a in students)
                  + ". A thief that steals less than that has gained nothing over labelling its queries.", ""]
    for a in students:
        head = ["Defense", "Teacher acc. (%)", "Robust acc. (%)", f"Worst-case stolen {a} (%)", "by",
                "vs Base (pts, paired)", "vs reference (pts)", "Added latency (ms/image)"]
        lines += (["", f"Student `{a}`:", ""] if len(students) > 1 else []) + \
            ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in rows:
            t, w = results["teachers"][name], results["worst_case"][name][a]
            change = w.get("change_from_base")
            r = results.get("resistance", {}).get(name, {}).get(a)
            if change is None and r is not None:  # results written before the change was kept: -resistance
                change = {**r, "mean": -r["mean"], "values": [-v for v in r["values"]]}
            vs_base = "" if name == base or change is None else pm(change, signed=True, mark=True)
            vs_ref = pm(w["minus_reference"], signed=True, mark=True) if "minus_reference" in w else ""
            lat = ""
            if name in latency and base in latency:
                lat = f"{latency[name] - latency[base]:+.2f}" if name != base else f"{latency[name]:.2f} (itself)"
            raced = "†" if w.get("raced_out") else ""
            lines.append("| " + " | ".join([name, pm(t["accuracy"]), _robust(t), pm(w["accuracy"]) + raced,
                                            _by(w["attacks"]), vs_base, vs_ref, lat]) + " |")
    lines += ["", "Latency: the median of 60 single-image answers in onnxruntime behind the row's output defense, "
              "without HTTP, minus Base's (the rows measured in turn on the same machine).", ""]
    return lines


def _main_rows(results: dict) -> list[str]:
    return results["settings"]["teachers"]


def _robust(teacher: dict) -> str:
    """Accuracy under the card's PGD attack (training/robustness.py); empty where it is not known (an endpoint
    whose card has none)."""
    return pm(teacher["robust_accuracy"]) if "robust_accuracy" in teacher else ""


def _by(attacks: list[str]) -> str:
    """Which attack was the worst case: one name, or each seed's when they differ."""
    return attacks[0] if len(set(attacks)) == 1 else "/".join(attacks)


def accuracy_table(results: dict, protocol: str, rows: list[str]) -> list[str]:
    students = results["settings"]["students"]
    worst = results.get("worst_case", {}) if protocol == "query" else {}
    head = ["Teacher", "Teacher acc. (%)", "Robust acc. (%)", "Δ from Base"] + [f"{s} (%)" for s in students] + \
           [f"Δ {s} from alone" for s in students]
    if worst:  # the strongest thief of the suite, and what the defense takes from it against Base
        head += [c for s in students for c in (f"worst-case {s} (%)", "by", f"resistance {s} (pts)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    alone = results["students"]["alone"]
    lines.append("| Student alone | | | | " + " | ".join(pm(alone[s]) for s in students) + " |"
                 + " |" * (len(students) + (3 * len(students) if worst else 0)))
    ref = results["students"].get("reference") if protocol == "query" else None
    if ref:  # the thief's queries with their true labels
        lines.append("| Reference (queries with labels) | | | | " + " | ".join(pm(ref[s]) for s in students) + " |"
                     + " |" * (len(students) + (3 * len(students) if worst else 0)))
    for name in rows:
        t = results["teachers"][name]
        st = results["students"][protocol].get(name)
        if st is None:  # a black box has no logits; a serving-time defense only changes what is served
            kind = results["settings"].get("row_kinds", {}).get(name)
            why = "n/a: serving-time defense" if kind == "serving-time defense" else "n/a: no logits"
            lines.append(f"| {name} | {pm(t['accuracy'])} | {_robust(t)} | | "
                         + " | ".join([why] * 2 * len(students)) + " |")
            continue
        change = pm(t["change_from_base"], signed=True) if "change_from_base" in t else ""
        cells = [name, pm(t["accuracy"]), _robust(t), change] + [pm(st[s]["accuracy"]) for s in students] + \
                [pm(st[s]["change_from_alone"], signed=True) for s in students]
        if worst:
            for s_ in students:
                w = worst.get(name, {}).get(s_)
                r = results.get("resistance", {}).get(name, {}).get(s_)
                raced = "†" if w and w.get("raced_out") else ""
                cells += [pm(w["accuracy"]) + raced, _by(w["attacks"])] if w else ["", ""]
                cells.append(pm(r, signed=True, mark=True) if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def attack_tables(results: dict) -> list[str]:
    """Per student: every attack's student accuracy against every row, the worst case in bold."""
    attacked = [r for r in _main_rows(results) + [v["row"] for vs in results.get("sweeps", {}).values() for v in vs]
                if r in results["attacks"]]
    lines = ["## The attack suite (query protocol)", "",
             "Each attack's student accuracy (%) on the test set; in bold, the attack with the highest mean. The worst "
             "case is what a defense is judged by: the columns above take each seed's most accurate thief, and "
             "`resistance` is Base's worst case minus the row's, seed by seed, in points.", ""]
    for s in results["settings"]["students"]:
        names = list(results["attacks"][attacked[0]][s]) if attacked else []
        lines += [f"Student `{s}`:", "", "| Teacher | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row in attacked:
            cells = results["attacks"][row][s]
            full = [n for n in names if not cells[n]["accuracy"].get("raced_out")] or names  # means over all seeds
            top = max(full, key=lambda n: (cells[n]["accuracy"]["mean"], cells[n]["agreement"]["mean"] or 0))
            lines.append(f"| {row} | " + " | ".join(
                (f"**{pm(cells[n]['accuracy'])}**" if n == top else pm(cells[n]["accuracy"]))
                + ("†" if cells[n]["accuracy"].get("raced_out") else "") for n in names) + " |")
        lines.append("")
    race = results["settings"].get("race")
    if race is not None and any(c["accuracy"].get("raced_out") for row in attacked
                                for s in results["settings"]["students"] for c in results["attacks"][row][s].values()):
        lines += [f"† raced out: after the first seed, an attack runs again only where its student came within {race:g} "
                  "points of the row's worst case on the first seed; the cell is the seeds that ran it (the first "
                  "seed's alone: no interval). Each seed's worst case is over the attacks it ran.", ""]
    params = {n: p for n, p in results["settings"].get("attack_params", {}).items() if p}
    lines += ["Attack parameters: " + "; ".join(f"{n} " + ", ".join(f"{k}={v}" for k, v in p.items())
                                                for n, p in params.items()) + ".", ""] if params else []
    return lines


def statistics_table(results: dict, rows: list[str]) -> list[str]:
    head = ["Teacher"] + [f"{stat} {k}" for stat in ("entropy", "KL") for k in ("mean", "var", "min", "max")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in rows:
        s = results["statistics"][name]
        cells = [f"{s[stat][k]:.4f}" for stat in ("entropy", "within_class_kl") for k in ("mean", "var", "min", "max")]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    c = s["teacher_config"]
    run = results["run"]
    lines = [f"# Evaluation: {s['dataset']} at scale `{s['scale']}`", "",
             f"`{results['command']}`", "",
             f"- Scale: {s['scale_summary']}.",
             f"- Teachers: {c['arch']}, {c['epochs']} epochs (base {c['base_epochs'] or c['epochs']}), "
             f"{c['limit_train'] or 'all'} training images, batch {c['batch_size']}, lr {c['lr']} ({c['schedule']}); "
             f"AST alpha {c['alpha']}, T {c['temperature']}, top-k {s['top_k']}, divergence {c['divergence']}; "
             f"PGD eps {c['pgd_eps']}, step {c['pgd_step']}, {c['pgd_steps']} steps; NT w {c['nt_weight']}, "
             f"T {c['nt_temperature']}.",
             *([f"- Where a row's network trains otherwise (the scale's reduction of its recipe, a variant's fields): "
                + "; ".join(f"{r}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in o.items()) for r, o in s["recipes"].items() if o) + "."]
               if any(s.get("recipes", {}).values()) else []),
             (f"- Robust accuracy: the test set under PGD L-inf, eps {s['robustness']['eps']:.4g}, step "
              f"{s['robustness']['step']:.4g}, {s['robustness']['steps']} steps, random start (setting "
              f"`{s['robustness']['setting']}`, training/robustness.py); an output defense leaves it as the network's."
              if s.get("robustness") else "- Robust accuracy: not measured."),
             f"- Students: {', '.join(s['students'])}, {s['student_epochs']} epochs; KD T {s['kd_temperature']}, "
             f"alpha {s['kd_alpha']} (paper protocol); label mode `{s['label_mode']}`, "
             f"{s['query_size']} held-out queries (query protocol).",
             f"- Test set: {c['limit_test'] or 'all'} images. Seeds: {', '.join(map(str, s['seeds']))} "
             f"({_seeds_note(results)} "
             + ("Every seed retrains teachers and students.)" if s.get("teacher_seed") is None else
                f"The teachers trained once with seed {s['teacher_seed']}, so their interval is 0 and the spread is "
                "the students'.)"),
             f"- Device {s['device']}, torch {s['torch']}; this invocation took {run['wall_seconds']:.0f} s "
             f"and trained {run['trained']['teacher_epochs']} teacher and {run['trained']['student_epochs']} "
             "student epochs (0: everything came from the cache).", ""]
    lines += practitioner_table(results)
    rows = _main_rows(results)
    for protocol, title in (("paper", "Paper protocol: KD on the teacher's training set, with labels, "
                                      "from its logits (Table 1/2 shape)"),
                            ("query", "Query protocol: no labels, the served probabilities on held-out "
                                      "queries (as clients/steal.py)")):
        if protocol in results["students"]:
            lines += [f"## {title}", ""] + accuracy_table(results, protocol, rows) + [""]
    if results.get("attacks"):
        lines += attack_tables(results) + [""]
    lines += [f"## Answer statistics on the test set at T = {s['kd_temperature']} (Table 3 shape)", "",
              "Per-class entropy of the teacher's softmax and within-class KL (each image's answer against its "
              "class's mean answer), in nats; mean, variance, min and max over classes.", ""]
    lines += statistics_table(results, rows) + [""]
    for name, variants in results.get("sweeps", {}).items():
        lines += [f"## Ablation: AST {name} (Tables 4-6 shape)", ""]
        for protocol in ("paper", "query"):
            if protocol in results["students"]:
                lines += [f"{protocol} protocol:", ""]
                lines += accuracy_table(results, protocol, [v["row"] for v in variants]) + [""]
    lines += ["## Figures", "",
              "![answers](fig2_responses.png)", "", "![entropy](entropy_histograms.png)", "",
              "![trade-off](tradeoff.png)", ""] + (["![attacks](attacks.png)", ""] if results.get("attacks") else [])
    return "\n".join(lines)


def figures(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = results.get("examples")
    if ex:
        names = list(ex["answers"])
        n = len(ex["indices"])
        fig, axes = plt.subplots(n, len(names), figsize=(2.6 * len(names), 1.9 * n), squeeze=False)
        for i in range(n):
            for j, name in enumerate(names):
                a = ex["answers"][name]
                ax = axes[i][j]
                ax.bar(range(len(a["probs"][i])), a["probs"][i], color="C0" if j else "C2")
                ax.set_ylim(0, 1)
                ax.set_xticks(range(len(a["probs"][i])))
                ax.tick_params(labelsize=6)
                if i == n - 1:  # class names under the last row only
                    ax.set_xticklabels([c[:8] for c in ex["class_names"]], rotation=90, fontsize=5)
                else:
                    ax.set_xticklabels([])
                ax.set_title(f"{name}\nH={a['entropy'][i]:.2f}" if i == 0 else f"H={a['entropy'][i]:.2f}",
                             fontsize=7)
            axes[i][0].set_ylabel(ex["class_names"][ex["labels"][i]], fontsize=7)
        fig.suptitle(f"What each teacher answers (softmax of its logits at T = {ex['temperature']:g}) to one test "
                     "image per row (its true class on the left); H: entropy in nats", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / FIGURES["responses"], dpi=110, bbox_inches="tight")
        plt.close(fig)

    hist = results["histograms"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in _main_rows(results):
        h = hist[name]
        centers = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        ax.plot(centers, h["counts"], label=name)
    ax.set_xlabel(f"entropy of the answer at T = {results['settings']['kd_temperature']:g} (nats)")
    ax.set_ylabel("test images")
    ax.set_title("How spread out each teacher's answers are: entropy of its answer per test image", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / FIGURES["entropy"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.6))
    markers = {"paper": "o", "query": "^", "worst": "s"}
    labelled = set()  # each row named once in the legend, whichever protocol it has cells in
    names = _main_rows(results) + [v["row"] for vs in results.get("sweeps", {}).values() for v in vs]

    def half(cell):  # the 95% interval's half-width in points (0 for one seed)
        return (cell.get("ci95") or 0.0) * 100

    for protocol in ("paper", "query", "worst"):
        cells = ({n: results["worst_case"][n] for n in names if n in results.get("worst_case", {})}
                 if protocol == "worst" else results["students"].get(protocol))
        if not cells:
            continue
        for i, name in enumerate(names):
            t = results["teachers"][name]["accuracy"]
            for student, cell in cells.get(name, {}).items():
                a = cell["accuracy"]
                ax.errorbar(t["mean"] * 100, a["mean"] * 100, yerr=half(a), xerr=half(t) or None,
                            fmt=markers[protocol], color=f"C{i % 10}", ms=6, capsize=2, lw=0.8,
                            label=None if name in labelled else name)
                labelled.add(name)
    for student, cell in results["students"]["alone"].items():
        ax.axhline(cell["mean"] * 100, color="grey", lw=0.8, ls="--")
    for student, cell in results["students"].get("reference", {}).items():
        ax.axhline(cell["mean"] * 100, color="black", lw=0.8, ls=":")
    ax.set_xlabel("teacher accuracy (%)")
    ax.set_ylabel("student accuracy (%)")
    from matplotlib.lines import Line2D
    keys = [Line2D([], [], marker=markers[p], ls="", color="grey", label=label) for p, label in
            (("paper", "paper protocol (KD, labels)"), ("query", "query protocol (soft answers)"),
             ("worst", "worst case of the attack suite"))]
    keys += [Line2D([], [], color="grey", ls="--", label="student alone (labels)"),
             Line2D([], [], color="black", ls=":", label="reference: the queries with labels")]
    first = ax.legend(handles=keys, fontsize=6, loc="lower right")
    ax.add_artist(first)
    ax.legend(fontsize=6, loc="upper left", title="teacher", title_fontsize=6)
    ax.set_title("What each defense costs the teacher (x) and the thief (y); bars: 95% intervals over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / FIGURES["tradeoff"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    attacks_figure(results, out, plt)


def attacks_figure(results: dict, out: Path, plt) -> None:
    """Per teacher row, each attack's student accuracy as a dot; the worst case ringed."""
    rows = [r for r in _main_rows(results) if r in results.get("attacks", {})]
    if not rows:
        return
    student = results["settings"]["students"][0]
    names = list(results["attacks"][rows[0]][student])
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(rows)), 4.2))
    for i, row in enumerate(rows):
        cells = results["attacks"][row][student]
        width = 0.7 / max(1, len(names))
        for j, name in enumerate(names):
            a = cells[name]["accuracy"]
            ax.errorbar(i + (j - (len(names) - 1) / 2) * width, a["mean"] * 100, yerr=(a.get("ci95") or 0) * 100,
                        fmt="o", color=f"C{j % 10}", ms=4, capsize=1.5, lw=0.7, label=name if i == 0 else None)
        top = max(names, key=lambda n: cells[n]["accuracy"]["mean"])
        j = names.index(top)
        ax.scatter(i + (j - (len(names) - 1) / 2) * width, cells[top]["accuracy"]["mean"] * 100, s=140,
                   facecolors="none", edgecolors="black", linewidths=1.2, label="highest mean" if i == 0 else None)
    ax.axhline(results["students"]["alone"][student]["mean"] * 100, color="grey", lw=0.8, ls="--",
               label="student alone (labels)")
    if "reference" in results["students"]:
        ax.axhline(results["students"]["reference"][student]["mean"] * 100, color="black", lw=0.8, ls=":",
                   label="reference: queries with labels")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, fontsize=7, rotation=20)
    ax.set_ylabel(f"{student} student accuracy (%)")
    ax.set_title("How much each attack steals from each defense (bars: 95% intervals over seeds)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / FIGURES["attacks"], dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    figures(results, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "results.json").is_file():
        print("usage: python -m evaluation.report RESULTS_DIR (a folder with results.json)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    write_report(json.loads((out / "results.json").read_text()), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
