"""RUN/report.png, drawn by test.py: training and validation loss, the validation accuracy, the learning rate against
the optimizer step (epochs on the top axis), and for a classification run the test confusion matrix; its title names
the checkpoint and its step. Everything
comes from logs/csv/metrics.csv, which a resume continues, so a resumed run shows one curve."""

import csv
from pathlib import Path

REPORT = "report.png"


def read_series(metrics_csv: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{column: (steps, values)} for every logged column, skipping the rows where it is empty."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def write_report(run_dir: Path, results_dir: Path, derived: dict, test: dict,
                 confusion: list[list[int]] | None) -> Path:
    """Draws the report from the run's csv log and test.py's metrics into results_dir; returns its path. Epochs get
    an axis only in a run that covers one (a step-based run over part of an epoch has none)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter

    series = read_series(run_dir / "logs" / "csv" / "metrics.csv")
    if confusion is not None:  # a 2 x 2 grid, the matrix in the last cell
        fig, axes = plt.subplots(2, 2, figsize=(12, 9.5), layout="constrained")
        axes = axes.flatten()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    step = f" at step {test['checkpoint_step']}" if test.get("checkpoint_step") is not None else ""
    fig.suptitle(f"{run_dir.name}: test loss {test['loss']:.4f}, test accuracy {test['acc']:.4f}\n"
                 f"checkpoint {Path(test['checkpoint']).name}{step}", fontsize=12)
    steps_per_epoch = derived["steps_per_epoch"]
    show_epochs = derived.get("total_steps", steps_per_epoch) >= steps_per_epoch

    def by_step(ax, title: str, ylabel: str) -> None:
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if show_epochs:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
            top.set_xlabel("epoch")

    loss_ax, acc_ax, lr_ax = axes[:3]
    for name, label, style in (("train_loss", "training", "-"), ("val_loss", "validation", "o-")):
        if name in series:
            loss_ax.plot(*series[name], style, label=label, markersize=3)
    loss_ax.set_yscale("log")  # early and late losses differ by orders of magnitude
    loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.1, not 10^-1
    loss_ax.yaxis.set_minor_formatter(LogFormatter())  # a range under a decade gets plain labels between
    loss_ax.legend()
    by_step(loss_ax, "loss", "cross-entropy (log scale)")
    if "val_acc" in series:
        acc_ax.plot(*series["val_acc"], "o-", markersize=3, label="validation")
    acc_ax.axhline(test["acc"], color="tab:red", linestyle="--", label=f"test {test['acc']:.4f}")
    acc_ax.legend()
    by_step(acc_ax, "accuracy", "accuracy")
    if "lr" in series:
        lr_ax.plot(*series["lr"])
    by_step(lr_ax, "learning rate", "lr")
    lr_ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no "1e-3" offset text over the epoch axis
    if confusion is not None:
        ax = axes[3]
        image = ax.imshow(confusion, cmap="Blues")
        classes = len(confusion)
        ax.set(title="test confusion matrix", xlabel="predicted", ylabel="true", xticks=range(classes),
               yticks=range(classes))
        for true in range(classes):
            for predicted in range(classes):
                count = confusion[true][predicted]
                if count:
                    ax.text(predicted, true, count, ha="center", va="center", fontsize=7,
                            color="white" if count > max(map(max, confusion)) / 2 else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    path = results_dir / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)  # a reader never sees half a picture
    return path
