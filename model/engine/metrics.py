"""A JSON-lines metrics log (one record per logged iteration) and the plot drawn from it."""
import json
import os


class MetricsLog:
    def __init__(self, path, resume_from_iter=None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_from_iter is None:
            open(path, "w").close()
        else:  # drop records written after the checkpoint we resume from
            records = [r for r in read_metrics(path) if r.get("iter", 0) <= resume_from_iter]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(path, out_png):
    """Losses (log scale) and learning rate / lambda against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(path) if "loss" in r]
    if not records:
        return None
    iters = [r["iter"] for r in records]
    names = sorted(k for k in records[0] if k.startswith("loss"))
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1])
    for name in names:
        ax_loss.plot(iters, [r.get(name, float("nan")) for r in records], label=name, lw=2 if name == "loss" else 1)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (window mean)")
    ax_loss.legend(fontsize=8, ncol=2)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(iters, [r["lr"] for r in records], label="lr")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    if "lambda" in records[0]:
        twin = ax_lr.twinx()
        twin.plot(iters, [r["lambda"] for r in records], color="tab:orange", label="lambda (L_con)")
        twin.set_ylabel("lambda")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
