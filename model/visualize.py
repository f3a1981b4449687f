"""A picture of predictions on validation images, novel and base categories told apart (like the
paper's Figs. 1 and 6): base detections in blues/greens with solid boxes, novel (box-only during
training) in reds/oranges with dashed boxes and a * after the name.

    python -m model.visualize --config model/configs/demo.json [--checkpoint ...] [--out file.png]

The model is built from the checkpoint's config: a --set of a model.* key is an error (as in model.evaluate).
"""
import os

import numpy as np
import torch

from .data.build import build_dataset
from .evaluate import load_trained_model, trained_model_config, trained_model_parser

BASE_COLORS = ["#1f77b4", "#2ca02c", "#17becf", "#3b5bdb", "#0b7a75", "#6a5acd"]
NOVEL_COLORS = ["#d62728", "#ff7f0e", "#e377c2", "#bcbd22", "#8c564b", "#ff1493"]


def category_colors(dataset):
    """label -> (hex colour, is_novel)."""
    out, nb, nn_ = {}, 0, 0
    for cid, label in sorted(dataset.cat_id_to_label.items(), key=lambda kv: kv[1]):
        novel = cid in set(dataset.novel_cat_ids)
        if novel:
            out[label], nn_ = (NOVEL_COLORS[nn_ % len(NOVEL_COLORS)], True), nn_ + 1
        else:
            out[label], nb = (BASE_COLORS[nb % len(BASE_COLORS)], False), nb + 1
    return out


def _rgb(hex_color):
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64) / 255


def draw(ax, image, output, dataset, colors, score_thresh):
    """image (3, H, W) in [0, 1]; output: the model's detections for it."""
    canvas = image.permute(1, 2, 0).numpy().astype(np.float64).copy()
    keep = output["scores"] >= score_thresh
    boxes, labels, scores = output["boxes"][keep], output["labels"][keep], output["scores"][keep]
    masks = output["masks"][keep][:, 0] > 0.5
    for mask, label in zip(masks.numpy(), labels.tolist()):
        canvas[mask] = 0.45 * canvas[mask] + 0.55 * _rgb(colors[label][0])
    ax.imshow(np.clip(canvas, 0, 1))
    for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        color, novel = colors[label]
        ax.add_patch(_rectangle(x1, y1, x2, y2, color, "--" if novel else "-"))
        name = dataset.cat_names[label - 1] + ("*" if novel else "")
        ax.text(x1, y1 - 1, f"{name} {score:.2f}", color="white", fontsize=6, va="bottom",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    ax.set_axis_off()


def _rectangle(x1, y1, x2, y2, color, linestyle):
    from matplotlib.patches import Rectangle

    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.2, linestyle=linestyle)


@torch.no_grad()
def visualize(cfg, checkpoint_path=None, out_path=None, num_images=8, score_thresh=0.5, device=None, start=0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint_path = checkpoint_path or os.path.join(cfg["output_dir"], "checkpoint.pt")
    out_path = out_path or os.path.join(cfg["output_dir"], "predictions.png")
    dataset = build_dataset(cfg["data"], "val")
    model, iteration = load_trained_model(cfg, checkpoint_path, dataset, device)
    colors = category_colors(dataset)
    indices = list(range(start, min(start + num_images, len(dataset))))
    cols = min(4, len(indices))
    rows = (len(indices) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, index in zip(axes.flat, indices):
        image, _ = dataset[index]
        output = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        draw(ax, image, output, dataset, colors, score_thresh)
    novel = ", ".join(dataset.cat_names[colors_label - 1] for colors_label, (_, nv) in colors.items() if nv)
    fig.suptitle(f"predictions (score >= {score_thresh}, iteration {iteration}); "
                 f"* dashed = novel, trained from boxes only: {novel}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None):
    p = trained_model_parser(__doc__, "predictions.png")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--start", type=int, default=0, help="first validation image")
    p.add_argument("--score", type=float, default=0.5, help="minimum score drawn")
    args = p.parse_args(argv)
    cfg = trained_model_config(args, "visualize")
    path = visualize(cfg, args.checkpoint, args.out, args.num_images, args.score, args.device, args.start)
    print(path)


if __name__ == "__main__":
    main()
