"""RUN/report.png, drawn by test.py: training and validation loss, every other validation metric the run logged (with
its test value), the learning rate against the optimizer step (epochs on the top axis), and each matrix a test
metric gives (a confusion matrix); its title names the test metrics, the checkpoint and its step. Everything
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


def write_report(run_dir: Path, results_dir: Path, derived: dict, test: dict) -> Path:
    """Draws the report from the run's csv log and test.py's metrics (numbers, and matrices drawn as confusion
    matrices) into results_dir; returns its path. Epochs get an axis only in a run that covers one."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter

    series = read_series(run_dir / "logs" / "csv" / "metrics.csv")
    scores = [name.removeprefix("val_") for name in series if name.startswith("val_") and name != "val_loss"]
    matrices = {name: value for name, value in test.items() if isinstance(value, list)}
    panels = 2 + len(scores) + len(matrices)  # the loss, each other metric, the LR, each matrix
    columns = 2 if panels == 4 else min(panels, 3)
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.3 * columns, 4.6 * rows + 0.5), layout="constrained",
                             squeeze=False)
    axes = list(axes.flatten())
    for unused in axes[panels:]:
        unused.set_visible(False)
    numbers = ", ".join(f"test {name} {value:.4f}" for name, value in test.items() if isinstance(value, float))
    step = f" at step {test['checkpoint_step']}" if test.get("checkpoint_step") is not None else ""
    fig.suptitle(f"{run_dir.name}: {numbers}\ncheckpoint {Path(test['checkpoint']).name}{step}", fontsize=12)
    steps_per_epoch = derived["steps_per_epoch"]
    show_epochs = derived.get("total_steps", steps_per_epoch) >= steps_per_epoch

    def by_step(ax, title: str, ylabel: str) -> None:
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if show_epochs:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
            top.set_xlabel("epoch")

    loss_ax = axes.pop(0)
    for name, label, style in (("train_loss", "training", "-"), ("val_loss", "validation", "o-")):
        if name in series:
            loss_ax.plot(*series[name], style, label=label, markersize=3)
    positive = all(value > 0 for name in ("train_loss", "val_loss") for value in series.get(name, ([], []))[1])
    if positive:  # early and late losses differ by orders of magnitude
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.1, not 10^-1
        loss_ax.yaxis.set_minor_formatter(LogFormatter())  # a range under a decade gets plain labels between
    loss_ax.legend()
    by_step(loss_ax, "loss", "training_step's loss" + (" (log scale)" if positive else ""))
    for name in scores:
        ax = axes.pop(0)
        ax.plot(*series[f"val_{name}"], "o-", markersize=3, label="validation")
        if isinstance(test.get(name), float):
            ax.axhline(test[name], color="tab:red", linestyle="--", label=f"test {test[name]:.4f}")
        ax.legend()
        by_step(ax, name, name)
    lr_ax = axes.pop(0)
    if "lr" in series:
        lr_ax.plot(*series["lr"])
    by_step(lr_ax, "learning rate", "lr")
    lr_ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no "1e-3" offset text over the epoch axis
    for name, matrix in matrices.items():
        ax = axes.pop(0)
        image = ax.imshow(matrix, cmap="Blues")
        classes = len(matrix)
        ax.set(title=f"test {name}", xlabel="predicted", ylabel="true", xticks=range(classes), yticks=range(classes))
        for true in range(classes):
            for predicted in range(classes):
                count = matrix[true][predicted]
                if count:
                    ax.text(predicted, true, f"{count:g}", ha="center", va="center", fontsize=7,
                            color="white" if count > max(map(max, matrix)) / 2 else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    path = results_dir / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)  # a reader never sees half a picture
    return path
