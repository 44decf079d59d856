"""The image protocols of `clora-continual` (`--dataset mnist5k | cifar100 | imagenet-r | folder`):
a pretrained timm backbone, class-incremental tasks from a real image dataset, every method of
the digits run on the same task loop (`continual.train_sequence`), runs that save after every task
and resume.

- mnist5k: the paper's setting in miniature, runs offline on a CPU. A small timm ViT (patch 4 on
  28×28, 4 blocks, width 64) is pre-trained on Animal-MNIST (10,000 animal silhouettes, 10 classes;
  cached with its provenance, re-trained when missing), frozen, then adapted on MNIST-5k (5,000
  real MNIST digits) in 5 tasks of 2 digits, fixed 400/100 train/test split per class. Both sets
  ship in clora_kernels/data (sources and licences in clora_kernels/data/README.md).
- cifar100: torchvision's CIFAR-100 at --data-dir (fetched only with --download), its own
  train/test split; --tasks 10 gives the field's 10 tasks of 10 classes.
- imagenet-r: an ImageFolder tree of ImageNet-R at --data-dir (200 class folders); a fixed split,
  per class the files sorted by name, permuted by torch.Generator(0), the first 80 % train.
- folder: any ImageFolder tree; `train/` and `test/` (or `val/`) subfolders are the split when
  present, else the 80/20 split above.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from ._io import cache_dir, provenance, write_json_atomic, write_safetensors_atomic

IMAGE_DATASETS = ("mnist5k", "cifar100", "imagenet-r", "folder")
DEFAULT_MODEL = "vit_base_patch16_224.augreg_in21k"
DEFAULT_TASKS = {"mnist5k": 5, "cifar100": 10, "imagenet-r": 10, "folder": None, "wiki-topics": 5}
_DATA = os.path.join(os.path.dirname(__file__), "data")
TEST_FRACTION = 0.2


class DataError(ValueError):
    """A dataset or model that is missing or unusable: the CLI's one-line refusal (exit code 2)."""


# ---- data ----------------------------------------------------------------------------------
class ArrayImages(Dataset):
    """uint8 images (N, H, W) held in memory as (1, H, W) float tensors scaled to [-1, 1]."""

    def __init__(self, images, labels):
        self.images = torch.as_tensor(images).unsqueeze(1)
        self.labels = torch.as_tensor(labels).long()

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i].float().div_(127.5).sub_(1.0), int(self.labels[i])


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")     # PIL modes wider than 8 bits per pixel
_SPLIT_NAMES = ("train", "test", "val", "valid", "validation")     # a split's folder, not a class's


class _Transformed(Dataset):
    """A dataset of PIL images with a transform applied (the split's indices are kept outside)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            img, label = self.base[i]
            return self.transform(img.convert("RGB")), label
        except Exception as exc:        # (PIL: a file that is no image, a truncated one, a decompression bomb)
            path = self.base.samples[i][0] if hasattr(self.base, "samples") else f"sample {i}"
            raise DataError(f"--data-dir: {path!r} cannot be read as an image ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); remove or replace it") from None


def data_error_line(exc: DataError) -> str:
    """A DataError's message; one raised in a DataLoader worker comes back wrapped in the worker's
    traceback (torch re-raises DataError(that text)), whose last line is the message."""
    last = str(exc).rstrip().splitlines()[-1] if str(exc).strip() else ""
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _load_array(name: str):
    import numpy as np
    with np.load(os.path.join(_DATA, f"{name}.npz")) as d:
        return d["images"], d["labels"].astype("int64")


def split_per_class(labels: torch.Tensor, test_fraction: float = TEST_FRACTION, seed: int = 0):
    """(train indices, test indices): per class, a permutation by torch.Generator(seed), the first
    round(test_fraction · n) samples to test."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _load_image(path):
    """torchvision's pil_loader, less its silent clipping of wide pixels (module level: a DataLoader worker
    started by spawn unpickles the dataset, and this with it)."""
    from PIL import Image
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode in _WIDE_MODES:     # (the RGB conversion clips them: 99.6 % of a 16-bit PNG's pixels white)
            raise ValueError(f"its pixels are of mode {img.mode} (16 or 32 bits, or float), which the RGB "
                             f"conversion clips to 8 bits; convert the images to 8-bit first")
        return img.convert("RGB")


def _class_folders(root: str) -> list:
    """The class folders of an ImageFolder tree: its subfolders, less hidden ones (a .ipynb_checkpoints/
    became a class)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _folder_class():
    """`_Folder`, made once, on first use: ImageFolder with `_class_folders` (torchvision is imported only by
    the image protocols). A module attribute, so that a DataLoader worker started by spawn unpickles it;
    one class, so that every dataset made pickles (a second one made anew left the first unpicklable)."""
    cls = globals().get("_Folder")
    if cls is None:
        from torchvision.datasets import ImageFolder

        class _Folder(ImageFolder):
            def find_classes(self, directory):
                names = _class_folders(directory)
                return names, {c: i for i, c in enumerate(names)}
        _Folder.__module__, _Folder.__qualname__ = __name__, "_Folder"
        cls = globals()["_Folder"] = _Folder
    return cls


def __getattr__(name):      # (pickle's lookup of `_Folder` in a fresh process)
    if name == "_Folder":
        return _folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_folder(root: str, what: str):
    """torchvision's ImageFolder of `root`, with every failure as a one-line DataError."""
    if not os.path.isdir(root):
        raise DataError(f"{what}: {root!r} is not a folder (an ImageFolder tree: one subfolder of images per class)")
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"{what}: {root!r} has no class subfolders (an ImageFolder tree: one subfolder per class)")
    split = sorted(set(classes) & set(_SPLIT_NAMES))
    if "train" in split and len(split) > 1:     # (train/ beside valid/ ran as two classes named so, silently;
        # a class named train alone is one: CIFAR-100 has it)
        raise DataError(f"{what}: {root!r} has folders {split}, a tree split in advance, not classes: give train/ "
                        f"and test/ (or val/), or class folders")
    try:
        return _folder_class()(root, loader=_load_image, allow_empty=False)
    except (FileNotFoundError, RuntimeError) as exc:      # an empty class folder, no images at all
        raise DataError(f"{what}: {root!r}: {str(exc).splitlines()[0]} (every class needs at least one image)") \
            from None


def _fixed_split(args, what: str) -> None:
    if getattr(args, "data_seed", 0):
        raise DataError(f"--data-seed {args.data_seed}: {what} comes with its own train/test split (only 0 here)")


def load_dataset(args, transform):
    """(train Dataset, test Dataset, train labels, test labels, class names) of the chosen dataset."""
    name, root = args.dataset, args.data_dir
    if name == "mnist5k":
        images, labels = _load_array("mnist5k")
        full = ArrayImages(images, labels)
        tr, te = split_per_class(full.labels, seed=args.data_seed)
        return Subset(full, tr.tolist()), Subset(full, te.tolist()), full.labels[tr], full.labels[te], \
            [str(c) for c in range(10)]
    if root is None:
        raise DataError(f"--dataset {name} needs --data-dir (where the dataset is"
                        + (", or goes with --download)" if name == "cifar100" else ")"))
    if name == "cifar100":
        _fixed_split(args, "CIFAR-100")
        from torchvision.datasets import CIFAR100
        if not os.path.isdir(os.path.join(root, "cifar-100-python")) and not args.download:
            raise DataError(f"--data-dir {root!r} holds no CIFAR-100 (cifar-100-python/); pass --download to fetch it "
                            f"there (169 MB, needs internet)")
        try:
            train = CIFAR100(root, train=True, download=args.download, transform=transform)
            test = CIFAR100(root, train=False, download=args.download, transform=transform)
        except Exception as exc:     # a failed download, a corrupt archive
            raise DataError(f"CIFAR-100 at {root!r} cannot be read or fetched ({type(exc).__name__}: {exc})") from None
        return train, test, torch.tensor(train.targets), torch.tensor(test.targets), list(train.classes)
    if args.download:
        raise DataError(f"--download fetches only cifar100; put the {name} ImageFolder tree at --data-dir")
    sub = {e.name: e.path for e in os.scandir(root) if e.is_dir()} if os.path.isdir(root) else {}
    if name == "folder" and "train" in sub and ("test" in sub or "val" in sub):
        _fixed_split(args, "a --data-dir with train/ and test/")
        train = _image_folder(sub["train"], "--data-dir train/")
        test = _image_folder(sub.get("test", sub.get("val")), "--data-dir test/")
        if train.classes != test.classes:
            only = [f"{sorted(set(a) - set(b))[:5]} in {name}/ alone"
                    for a, b, name in ((train.classes, test.classes, "train"), (test.classes, train.classes, "test"))
                    if set(a) - set(b)]
            raise DataError(f"--data-dir: train/ and test/ have different classes ({'; '.join(only)})")
        return _Transformed(train, transform), _Transformed(test, transform), torch.tensor(train.targets), \
            torch.tensor(test.targets), train.classes
    full = _image_folder(root, "--data-dir")
    labels = torch.tensor(full.targets)
    tr, te = split_per_class(labels, seed=args.data_seed)
    small = [full.classes[c] for c in labels.unique().tolist() if int((labels[te] == c).sum()) == 0]
    if small:
        raise DataError(f"--data-dir: class(es) {small[:5]} have too few images for a test split (at least 3 each)")
    data = _Transformed(full, transform)
    return Subset(data, tr.tolist()), Subset(data, te.tolist()), labels[tr], labels[te], full.classes


def _set_transform(data, transform) -> None:
    while isinstance(data, Subset):
        data = data.dataset
    data.transform = transform


def class_order(num_classes: int, seed) -> list:
    """The classes in task order: 0..C-1 for seed None, else a permutation by torch.Generator(seed)."""
    if seed is None:
        return list(range(num_classes))
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def make_tasks(train, test, train_labels, test_labels, order: list, tasks: int, workers: int):
    """`tasks` DataTasks of len(order) / tasks classes each, in `order`."""
    from .continual import DataTask
    if not (isinstance(tasks, int) and not isinstance(tasks, bool) and 0 < tasks <= len(order)
            and len(order) % tasks == 0):
        # (0 divided by zero; 4 classes in 3 tasks left class 3 out, silently. The CLI's prepare refuses both)
        raise ValueError(f"make_tasks: tasks must divide the {len(order)} classes of the order, got {tasks!r}")
    per = len(order) // tasks
    out = []
    for t in range(tasks):
        classes = tuple(order[t * per:(t + 1) * per])
        tr = torch.isin(train_labels, torch.tensor(classes)).nonzero().flatten()
        te = torch.isin(test_labels, torch.tensor(classes)).nonzero().flatten()
        out.append(DataTask(classes, _subset(train, tr), _subset(test, te), train_labels[tr], test_labels[te],
                            workers))
    return out


def _subset(data, idx):
    if isinstance(data, Subset):     # flatten: one level of indices
        return Subset(data.dataset, [data.indices[i] for i in idx.tolist()])
    return Subset(data, idx.tolist())


# ---- backbones -----------------------------------------------------------------------------
def _small_vit(num_classes: int = 10):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=2.0)


# AdamW with a one-cycle schedule: 0.910 held-out accuracy in 20 epochs (104 s on the 2-core CPU
# machine), where Adam at a fixed 1e-3 reached 0.759 in 8 epochs
ANIMAL_PRETRAIN = {"epochs": 20, "lr": 2e-3, "weight_decay": 0.05, "batch_size": 128, "seed": 0}


def animal_mnist_backbone(progress: bool = True, log=print, seed: int = 0):
    """The small ViT pre-trained on Animal-MNIST (all 10 classes, 90 %; accuracy on the other 10 %
    recorded) from `seed` (ANIMAL_PRETRAIN's, 0, unless given: --pretrain-seed), cached under the
    cache dir with its provenance, one file per seed; trained here when missing."""
    from safetensors.torch import load_file
    images, labels = _load_array("animal_mnist")
    cfg = dict(ANIMAL_PRETRAIN, seed=seed)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode() + images.tobytes()
                            + labels.tobytes() + b"vit-28-4-64-4-4-2").hexdigest()[:12]
    path = cache_dir("pretrained", f"animal_mnist_vit_{digest}.safetensors")
    model = _small_vit()
    if os.path.isfile(path) and os.path.isfile(path + ".json"):
        model.load_state_dict(load_file(path))
        return model, json.load(open(path + ".json"))
    data = ArrayImages(images, labels)
    tr, te = split_per_class(data.labels, 0.1)
    torch.manual_seed(cfg["seed"])
    model = _small_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = -(-len(tr) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=cfg["epochs"] * steps)
    x_all = torch.stack([data[i][0] for i in range(len(data))])
    start = time.perf_counter()
    from tqdm import tqdm
    for epoch in tqdm(range(cfg["epochs"]), desc="pre-training the ViT on Animal-MNIST", leave=False,
                      disable=None if progress else True):
        for idx in tr[torch.randperm(len(tr))].split(cfg["batch_size"]):
            loss = F.cross_entropy(model(x_all[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_all[te]).argmax(-1) == data.labels[te]).float().mean())
    info = {"data": "Animal-MNIST (animal-mnist 0.4, MIT), 9,000 train / 1,000 held out", "held_out_acc": acc,
            "seconds": time.perf_counter() - start, "config": cfg,
            "architecture": "timm VisionTransformer img 28, patch 4, in_chans 1, width 64, depth 4, heads 4, mlp 2",
            **provenance("clora-continual")}
    write_safetensors_atomic(path, model.state_dict())   # (two runs pre-training at once: one file)
    write_json_atomic(path + ".json", info)
    if log:
        log(f"pre-trained the ViT on Animal-MNIST in {info['seconds']:.0f} s: held-out accuracy {acc:.3f} "
            f"(cached at {path})")
    return model, info


def timm_backbone(args, num_classes: int):
    """timm.create_model(--model, pretrained=--pretrained, num_classes, img_size=--image-size),
    with a failure (unknown name, weights that cannot be fetched offline) as a DataError."""
    import timm
    kwargs = {"img_size": args.image_size} if args.image_size else {}
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise DataError(f"--model {args.model!r} is not a timm model ({exc})") from None
        raise DataError(f"--model {args.model}: {str(exc).splitlines()[0]}") from None
    except TypeError as exc:      # img_size on a model that has none
        raise DataError(f"--image-size: {args.model} does not take an image size ({exc})") from None
    except Exception as exc:      # the hub is unreachable: offline
        raise DataError(f"--pretrained: the weights of {args.model} cannot be fetched ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0].split('. ')[0][:200]}); connect once to cache them, or pass "
                        f"--no-pretrained") \
            from None
    why = patch_misfit(model, args.image_size)
    if why:
        raise DataError(f"--image-size {args.image_size}: {args.model} {why}")
    return model


def patch_misfit(model, size) -> str:
    """Why an input of `size` pixels square does not fit the patch grid of a timm `model` ('' where it does,
    or `size` is None): a grid cuts the rest off (at 30 with patches of 16 the model saw the top-left 16x16
    pixels; ConvNeXt's 4x4 stem, silently too), or the model refuses it at its first forward. The grid is
    that of the first convolution without padding, the patch embedding's where there is one (PiT's
    patches of 16 overlap, 8 apart: 232 fits), else the model's stem; a padded one drops no pixel."""
    if not size:
        return ""
    embed = getattr(model, "patch_embed", None)
    if getattr(embed, "dynamic_img_pad", False):        # (timm pads the image to the grid)
        return ""
    convs = [m for m in (embed or model).modules() if isinstance(m, nn.Conv2d)]
    if convs:
        conv = convs[0]
        if isinstance(conv.padding, str) or any(conv.padding):
            return ""
        kernel, stride = conv.kernel_size, conv.stride
    else:
        step = getattr(embed, "patch_size", None)
        step = tuple(step) if isinstance(step, (tuple, list)) else (step, step)
        if not all(isinstance(p, int) and p > 0 for p in step):
            return ""
        kernel = stride = step
    cut = max((size - k) % s if size >= k else size for k, s in zip(kernel, stride))
    if not cut:
        return ""
    if tuple(kernel) == tuple(stride):
        return (f"cuts images into patches {stride[0]}x{stride[1]} apart, and the last {cut} rows or columns would "
                f"be dropped; give a multiple of {max(stride)}")
    return (f"cuts images into patches {kernel[0]}x{kernel[1]}, {stride[0]} apart, and the last {cut} rows or "
            f"columns would be dropped; give {max(kernel)} plus a multiple of {max(stride)}")


def _transform(model, args):
    """timm's eval transform for the model (resize, crop, normalisation), at --image-size."""
    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    if args.image_size:
        cfg["input_size"] = (3, args.image_size, args.image_size)
    return create_transform(**cfg, is_training=False)


def head_name(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = [n for n, m in model.named_modules() if head is not None and m is head]
    if not names or not isinstance(head, nn.Linear):
        raise DataError(f"the model's classifier must be an nn.Linear (timm's get_classifier()), got "
                        f"{type(head).__name__}")
    return names[0]


# ---- the run -------------------------------------------------------------------------------
def _result_key(args) -> dict:
    """What a run's results depend on: a resumed run must have the same."""
    keys = ("dataset", "data_dir", "model", "pretrained", "image_size", "tasks", "class_order_seed", "data_seed",
            "setting", "classifier", "features", "epochs", "lr", "head_lr", "rank", "batch_size", "lambda_orth",
            "optimizer", "protect_energy", "project_energy", "grad_through_old_route", "targets", "device", "backend",
            "language", "per_class_train", "per_class_test", "max_tokens", "pretrain_seed")
    # (as run.json holds it: the default targets are a tuple, JSON's a list)
    return {k: list(v) if isinstance(v := getattr(args, k), tuple) else v for k in keys}


def _settings(key: dict) -> dict:
    """A result key with the head's learning rate as trained: --head-lr left out is --lr (a run
    resumed with it spelt out was refused as made with other settings)."""
    return {**key, "head_lr": key.get("lr") if key.get("head_lr") is None else key["head_lr"]}


def backbone_fingerprint(base: nn.Module, head: str) -> str:
    """A digest of the frozen backbone's weights and buffers (the classifier `head`, new for every
    seed, left out): a run resumed on another backbone (a rebuilt mnist5k cache, other timm weights)
    would mix its rows and prototypes with the new one's."""
    h = hashlib.sha256()
    for name, t in sorted(base.state_dict().items()):
        if torch.is_tensor(t) and not name.startswith(head + "."):
            h.update(name.encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(tasks) -> str:
    """A digest of what the tasks hold: their classes, labels and samples; for image files, each
    file's path under its folder and its size, not its pixels (a file replaced by one of another size,
    added or removed changes it; a copy of the folder elsewhere does not). A run resumed on a
    changed --data-dir would mix two datasets' rows and prototypes."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(repr(t.classes).encode())
        for split in ("train", "test"):
            h.update(t.labels(split).numpy().tobytes())
            data = t.train if split == "train" else t.test
            indices, data = (data.indices, data.dataset) if isinstance(data, Subset) else (range(len(data)), data)
            for x in getattr(data, "tensors", ()):      # (wiki-topics: the tokens)
                h.update(x.contiguous().numpy().tobytes())
            folder = getattr(data, "base", None)
            if hasattr(folder, "samples"):      # an ImageFolder
                for i in indices:
                    path = folder.samples[i][0]
                    h.update(f"{os.path.relpath(path, folder.root)}\0{os.path.getsize(path)}\0".encode())
    return h.hexdigest()[:16]


def check_fingerprints(args, backbone: str, data: str, log=print) -> None:
    """With --resume, refuse a backbone or data other than those the run in --out began on (run.json's
    `backbone` and `data`; a run from before a fingerprint cannot be checked, and says so)."""
    if not (args.out and args.resume):
        return
    run = read_run_json(args.out)
    why = {"backbone": "the backbone's weights differ from those the run in {out!r} began on (fingerprint {now}, "
                       "the run's {saved}: a rebuilt pre-training cache, or other weights)",
           "data": "the data differ from those the run in {out!r} began on (fingerprint {now}, the run's {saved}: an "
                   "image under --data-dir added, removed or replaced, or another dataset version)"}
    for key, now in (("backbone", backbone), ("data", data)):
        saved = run.get(key)
        if saved is None:
            log(f"clora-continual: the run in {args.out!r} predates {key} fingerprints; its {key} is not checked")
        elif saved != now:
            raise DataError("--resume: " + why[key].format(out=args.out, now=now, saved=saved) + "; start a new --out")


def read_run_json(out: str) -> dict:
    """--out's run.json, or a DataError naming it where it cannot be read (a truncated or hand-edited
    file was a JSONDecodeError traceback)."""
    path = os.path.join(out, "run.json")
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"--resume: {path} cannot be read ({exc}); start a new --out") from None
    if not isinstance(run, dict) or not isinstance(run.get("result_key", {}), dict):
        raise DataError(f"--resume: {path} holds no run's settings; start a new --out")
    return run


def check_run_dir(args) -> None:
    """Refuse an --out that holds another run (or any run without --resume: its run.json, or a
    checkpoint of one whose run.json is gone), before any work."""
    meta = os.path.join(args.out, "run.json")
    if not os.path.isfile(meta):
        if args.resume:
            raise DataError(f"--resume: {args.out!r} holds no run to resume (no run.json)")
        stale = next((os.path.join(d, "state.pt") for d, _, files in os.walk(args.out) if "state.pt" in files), None)
        if stale:
            raise DataError(f"--out {args.out!r} holds checkpoints of an earlier run ({stale}) but no run.json to "
                            f"check them against; pass another --out, or remove that run")
        return
    if not args.resume:
        raise DataError(f"--out {args.out!r} holds a run already; pass --resume to continue it, or another --out")
    # (runs older than --data-seed and --pretrain-seed)
    saved = _settings({"data_seed": 0, "pretrain_seed": 0 if args.dataset == "mnist5k" else None,
                       **read_run_json(args.out).get("result_key", {})})
    now = _settings(_result_key(args))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise DataError(f"--resume: the run in {args.out!r} was made with other settings ({', '.join(diff)}: "
                        f"{[saved.get(k) for k in diff]}); resume with the same command")


class _Checkpoint:
    """One (method, seed)'s state after each task: the adapter (save_adapter), the trainable
    parameters outside the adapter (the head; every parameter for full_ft), the prototypes, the
    random state and the accuracy rows. state.pt is replaced atomically last and names its
    adapter file, so a run killed anywhere resumes from the last complete task."""

    def __init__(self, folder: str):
        self.folder = folder
        self.state = os.path.join(folder, "state.pt")

    def load(self):
        return torch.load(self.state, map_location="cpu", weights_only=False) if os.path.isfile(self.state) else None

    def save(self, model, i, acc, prototypes, gen, seconds: float = 0.0):
        from .nn import clora_layers, save_adapter
        os.makedirs(self.folder, exist_ok=True)
        adapter = None
        if clora_layers(model):
            adapter = f"adapter-{i}.safetensors"
            save_adapter(model, os.path.join(self.folder, adapter))
        from .baselines import DualLoRALinear, per_task_layers
        dual = {n: m for n, m in model.named_modules() if isinstance(m, DualLoRALinear)}
        skip = {f"{n}.{p}" for n, _ in clora_layers(model) for p in ("lora_A", "lora_B", "routing_delta")}
        skip |= {f"{n}.{p}" for n, m in dual.items() for p, _ in m.named_parameters(recurse=False)}
        branches = {f"{n}.{kind}.{j}" for n, m in per_task_layers(model) for kind in ("lora_A", "lora_B")
                    for j in range(len(m.lora_A))}              # frozen ones too: they are the adapter
        state = {"task": i, "acc": acc, "adapter": adapter, "gen": gen.get_state(), "rng": torch.get_rng_state(),
                 # dropout on a GPU draws from its own generator (MiniLM's dropout 0.1)
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                 "prototypes": None if prototypes is None else {k: v.cpu() for k, v in prototypes.state_dict().items()},
                 "seconds": seconds,
                 "buffers": {n: b.detach().cpu().clone() for n, b in model.named_buffers()    # BatchNorm statistics
                             if n.rpartition(".")[0] not in {m for m, _ in clora_layers(model)} | set(dual)},
                 "dual_lora": {n: m.task_state() for n, m in dual.items()},
                 "branches": max((len(m.lora_A) for _, m in per_task_layers(model)), default=0),
                 "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                            if (p.requires_grad and n not in skip) or n in branches}}
        torch.save(state, self.state + ".tmp")
        os.replace(self.state + ".tmp", self.state)
        write_json_atomic(os.path.join(self.folder, "progress.json"), {"task": i, "acc": acc})   # readable
        for f in os.listdir(self.folder):     # older adapters, now that state.pt names the new one
            if f.startswith("adapter-") and f != adapter:
                os.remove(os.path.join(self.folder, f))

    def restore(self, model, state, prototypes, gen):
        from .nn import load_adapter
        from .baselines import per_task_layers
        if state["adapter"]:
            load_adapter(model, os.path.join(self.folder, state["adapter"]))
        for _, m in per_task_layers(model):       # as many branches as the run had opened
            while len(m.lora_A) < state.get("branches", 0):
                m.next_task()
        for n, layer_state in state.get("dual_lora", {}).items():
            model.get_submodule(n).load_task_state(layer_state)
        own = dict(model.named_parameters())
        bufs = dict(model.named_buffers())
        with torch.no_grad():
            for n, value in state["params"].items():
                own[n].copy_(value)
            for n, value in state.get("buffers", {}).items():
                bufs[n].copy_(value)
        if prototypes is not None and state["prototypes"] is not None:
            prototypes.load_state_dict(state["prototypes"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)


def prepare(args, progress: bool = True, log=print) -> dict:
    """Everything a run needs before training, each problem a DataError (the CLI's exit 2): the
    dataset (present, readable, classes that --tasks divides), the backbone (a timm name whose
    weights can be had; for mnist5k the Animal-MNIST ViT, pre-trained here when not cached), the
    tasks and the classifier's name."""
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise DataError(f"--dataset {args.dataset} needs timm and torchvision ({exc.name} is missing): "
                        f"pip install timm") from None
    if args.dataset == "mnist5k":
        if args.model is not None or args.image_size is not None or args.pretrained is not None:
            raise DataError("--dataset mnist5k uses its own backbone (a small ViT pre-trained on Animal-MNIST): drop "
                            "--model / --image-size / --pretrained")
    train, test, train_labels, test_labels, names = load_dataset(args, None)   # the data first: the likelier problem
    tasks = args.tasks or DEFAULT_TASKS[args.dataset]
    if tasks is None:
        raise DataError(f"--dataset {args.dataset} needs --tasks N (its {len(names)} classes split into N tasks)")
    if tasks * 2 > len(names) or len(names) % tasks:
        raise DataError(f"--tasks {tasks}: the {len(names)} classes of --dataset {args.dataset} do not split into "
                        f"{tasks} tasks of equal size and two classes at least (use a divisor of {len(names)} "
                        f"up to {len(names) // 2})")
    args.tasks = tasks
    if args.dataset == "mnist5k":
        base, info = animal_mnist_backbone(progress, log, args.pretrain_seed)
    else:
        torch.manual_seed(0)            # one backbone for every seed and run (random with --no-pretrained)
        base, info = timm_backbone(args, len(names)), None
        for data in (train, test):
            _set_transform(data, _transform(base, args))
    order = class_order(len(names), args.class_order_seed)
    base.reset_classifier(len(names))
    tasks = make_tasks(train, test, train_labels, test_labels, order, tasks, args.workers)
    head = head_name(base)
    _check_model(base, head, tasks[0], args)
    size = 28 if args.dataset == "mnist5k" else _input_size(base, args)
    return {"base": base, "pretraining": info, "names": names, "head": head, "tasks": tasks, "image_size": size}


def _check_model(base, head: str, task, args) -> None:
    """What would fail only after a method trained: targets that match nothing, a rank too large
    for a targeted layer, a forward that fails at this image size. One batch goes through."""
    from .nn import DEFAULT_TARGETS, select_targets, unmatched_targets
    try:
        chosen = select_targets(base, args.targets, rank=args.rank, warn=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"--targets: {exc}") from None
    if head in chosen:
        raise DataError(f"--targets {args.targets} names the classifier {head!r}, which every method trains in full "
                        f"(or replaces by prototypes); target the layers before it")
    if not chosen:
        from .nn import _candidates
        raise DataError(f"--targets {args.targets}: no nn.Linear of the model matches; its layers by type: "
                        f"{_candidates(base)[:300]}")
    missing = unmatched_targets(args.targets, chosen)
    if missing and getattr(args, "targets_given", False):
        raise DataError(f"--targets {missing}: match no layer of the model that is adapted (of {len(chosen)} that "
                        f"the others match, e.g. {chosen[:3]})")
    if missing and args.targets is not DEFAULT_TARGETS:     # (a default's: timm's are warned about by inject_clora)
        print(f"clora-continual: the default targets' names {missing} match no layer of this model; the {len(chosen)} "
              f"layers the others match are adapted (e.g. {chosen[:3]}; --targets chooses)", file=sys.stderr)
    small = min(min(base.get_submodule(n).in_features, base.get_submodule(n).out_features) for n in chosen)
    if args.rank > small:
        raise DataError(f"--rank {args.rank}: the targeted layers need rank <= {small} (their smallest side)")
    x, _ = next(iter(task.batches("test", 2)))
    try:
        with torch.no_grad():
            base.eval()(x)
    except Exception as exc:
        what = ("texts", "--max-tokens") if args.dataset == "wiki-topics" else ("images", "--image-size")
        raise DataError(f"the model cannot run on these {what[0]} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        f"check {what[1]} / --model") from None
    finally:
        base.train()


def _input_size(model, args) -> int:
    from timm.data import resolve_data_config
    return args.image_size or resolve_data_config({}, model=model)["input_size"][-1]


def run_image_experiment(args, prep: dict, progress: bool = True, log=print, on_method=None):
    """Every method × seed of an image (or the text) protocol on what `prepare` made; returns
    (methods, meta), the digits schema plus the protocol's fields."""
    from . import continual as cc
    device = torch.device(args.device)
    base, tasks, head, names = prep["base"], prep["tasks"], prep["head"], prep["names"]
    num_classes, pretrain_info = len(names), prep["pretraining"]
    meta = {"dataset": args.dataset, "model": "small ViT pre-trained on Animal-MNIST" if args.dataset == "mnist5k"
            else args.model, "pretrained": True if args.pretrained is None else args.pretrained,
            "pretraining": pretrain_info, "image_size": prep["image_size"], "data_dir": getattr(args, "data_dir", None),
            "workers": args.workers,
            "tasks": args.tasks, "class_order": [list(t.classes) for t in tasks], "classes": names,
            "test_sizes": cc.task_test_sizes(tasks),
            "targets": args.targets, "device": str(device), "backend": args.backend}
    methods = {}
    reference = cc.frozen_reference(base).to(device) if args.features == "concat" else None
    for method in args.methods:
        per_seed, seconds, extra = [], [], []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model, uses_clora = cc.build_method(base, method, args.rank, args.protect_energy,
                                                args.grad_through_old_route, args.project_energy,
                                                targets=args.targets, head=head, backend=args.backend)
            with torch.no_grad():       # a fresh head per seed
                torch.manual_seed(seed)
                model.get_submodule(head).reset_parameters()
            model.to(device)
            torch.manual_seed(seed + 1000)
            ckpt = _Checkpoint(os.path.join(args.out, method, f"seed{seed}")) if args.out else None
            gen = torch.Generator().manual_seed(seed)
            classifier = args.classifier
            protos = cc.PrototypeHead(num_classes, cc.feature_dim(model.get_submodule(head), reference)).to(device) \
                if classifier == "prototype" else None
            start, acc, before = 0, [], 0.0
            state = None
            if ckpt and getattr(args, "resume", False):
                try:
                    state = ckpt.load()
                    if state is not None:
                        ckpt.restore(model, state, protos, gen)
                        start, acc, before = state["task"] + 1, state["acc"], state.get("seconds", 0.0)
                except (RuntimeError, ValueError, KeyError, EOFError, FileNotFoundError, pickle.UnpicklingError) \
                        as exc:     # (truncated, a file of it removed, hand-edited: a torch or safetensors traceback
                    if isinstance(exc, torch.OutOfMemoryError):     # mid-run; not a failure of the machine's)
                        raise
                    first = (str(exc).strip().splitlines() or [""])[0]
                    raise DataError(f"--resume: the checkpoint of {method} seed {seed} in {ckpt.folder} cannot be "
                                    f"read ({type(exc).__name__}: {first}); remove that folder to train {method} "
                                    f"seed {seed} again, or start a new --out") from exc
                if state is not None:
                    log(f"{method} seed {seed}: resumed after task {state['task']}")
            began = time.perf_counter()
            if method == "joint":
                rows = cc.run_joint(model, tasks, args, seed, progress, head=head, prototypes=protos, device=device,
                                    reference=reference)
            else:
                epochs = 0 if method == "simple_cil" and classifier == "prototype" else args.epochs
                rows = cc.train_sequence(
                    model, tasks, head=head, clora=uses_clora, setting=args.setting, epochs=epochs, lr=args.lr, head_lr=args.head_lr,
                    lambda_orth=args.lambda_orth if uses_clora else 0.0, batch_size=args.batch_size,
                    optimizer=args.optimizer, classifier=classifier, prototypes=protos, seed=seed,
                    progress=progress, desc=f"{method} seed {seed}", device=device, amp=device.type == "cuda",
                    start=start, acc=acc, gen=gen, log=log, reference=reference,
                    **cc.method_hooks(method),
                    on_task=(lambda i, a, p, g, m=model, t0=began, b=before:
                             ckpt.save(m, i, a, p, g, b + time.perf_counter() - t0)) if ckpt else None)
            per_seed.append(rows)
            seconds.append(before + time.perf_counter() - began)      # a resumed run counts its earlier tasks
            extra.append(cc._extra_floats(model, classifier, head, reference))
        methods[method] = cc.summarize(method, per_seed, seconds, extra, len(tasks), meta["test_sizes"])
        if on_method:
            on_method(methods, meta)
    return methods, meta
