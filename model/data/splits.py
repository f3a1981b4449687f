"""Base/novel category splits. Base categories keep their masks; novel ones are trained from boxes."""
from . import shapes

# The 20 PASCAL VOC classes under their COCO names (the paper's "voc" subset).
VOC_CLASSES = [
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch", "train", "tv",
]


def resolve_base_names(base, category_names):
    """Names of the base categories among category_names.

    base: "voc" (the 20 VOC classes are base: voc -> nonvoc), "nonvoc" (the other 60: nonvoc -> voc),
    "shapes" (the shapes dataset's built-in split), "all" (fully supervised), "none", or a list of names.
    """
    names = list(category_names)
    if isinstance(base, str):
        if base == "voc":
            chosen = [n for n in names if n in VOC_CLASSES]
        elif base == "nonvoc":
            chosen = [n for n in names if n not in VOC_CLASSES]
        elif base == "shapes":
            chosen = list(shapes.BASE_CATEGORIES)
        elif base == "all":
            chosen = names
        elif base == "none":
            chosen = []
        else:
            raise ValueError(f"unknown split {base!r}: use voc, nonvoc, shapes, all, none or a list of names")
    else:
        chosen = list(base)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"base categories not in the dataset: {unknown}")
    return [n for n in names if n in set(chosen)]
