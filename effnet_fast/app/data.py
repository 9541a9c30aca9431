"""Data for `effnet-fast train`: an ImageFolder directory, CIFAR-10 from a local folder in
its python-pickle format (no download), or scikit-learn's digits (shipped with
scikit-learn, so no download either; the default).

`load_data(...)` returns a `Data` with the training and validation datasets, the class
names and a short description; `make_loader` wraps a dataset in a DataLoader whose
order is a function of (seed, epoch) only (`EpochSampler`), so a resumed run sees
the batches an uninterrupted one would. Errors name the option at fault (`DataError`)."""
import math
import os
import pickle
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("auto", "digits", "imagefolder", "cifar10")
VAL_FOLDERS = ("val", "validation", "test")
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(ValueError):
    """A data option that cannot be used; the message names the option."""


class UnreadableImage(ValueError):
    """An image file PIL cannot open or decode; the message names the file."""


# PIL's errors on a file that is not an image it can decode: OSError (UnidentifiedImageError,
# truncated data), SyntaxError and ValueError from some decoders, and DecompressionBombError
# (more than twice Image.MAX_IMAGE_PIXELS).
def _image_errors():
    from PIL import Image
    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


# Greyscale modes wider than 8 bits: convert("RGB") clips them (every value over 255 turns
# white). PNG's 16-bit greyscale opens as I;16 (or I in older Pillow).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(im):
    """A PIL image as 8-bit RGB; 16-bit greyscale scaled (65535 -> 255) rather than clipped."""
    from PIL import Image
    if im.mode in WIDE_GREY_MODES:
        import numpy as np
        grey = np.clip(np.round(np.asarray(im, dtype=np.float64) / 257), 0, 255).astype(np.uint8)
        im = Image.fromarray(grey, "L")
    return im.convert("RGB")


def read_image(path):
    """The image file at `path`, decoded, as 8-bit RGB (see to_rgb8): the one reader of
    training's ImageFolder and predict. Raises UnreadableImage naming the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except _image_errors() as exc:
        detail = f": {exc}" if str(path) not in str(exc) else ""  # PIL's messages often repeat the path
        raise UnreadableImage(f"{path}: not an image PIL can read ({type(exc).__name__}{detail})") from None


def unreadable_images(paths):
    """Messages for the files among `paths` whose header PIL cannot read (the header only:
    fast enough to check a data set when it is loaded)."""
    from PIL import Image
    bad = []
    for path in paths:
        try:
            with Image.open(path):
                pass
        except _image_errors() as exc:
            bad.append(f"{path} ({type(exc).__name__})")
    return bad


@dataclass
class Data:
    train: Dataset
    val: Dataset
    classes: list
    name: str
    description: str
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------- transforms

def train_transform(size, scale=0.08, hflip=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD, tensor_input=False):
    """Random resized crop, horizontal flip (probability `hflip`), normalisation."""
    from torchvision.transforms import v2
    steps = [] if tensor_input else [v2.ToImage()]
    steps += [v2.RandomResizedCrop(size, scale=(scale, 1.0), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_fraction=0.875, tensor_input=False,
                   interpolation="bilinear"):
    """Resize the shorter side to size / crop_fraction (antialiased, with `interpolation`:
    "bilinear", or "bicubic" as most pretrained weights name), centre crop `size`,
    normalisation."""
    from torchvision.transforms import v2
    steps = [] if tensor_input else [v2.ToImage()]
    steps += [v2.Resize(int(math.floor(size / crop_fraction)), interpolation=v2.InterpolationMode(interpolation),
                        antialias=True), v2.CenterCrop(size),
              v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


# ---------------------------------------------------------------- datasets

class TensorImages(Dataset):
    """Images held in memory (N, C, H, W uint8 or float in [0, 1]) with integer labels."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.long), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]


class Transformed(Dataset):
    """`dataset` (a Subset of an untransformed dataset) with `transform` on its images."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return self.transform(x), y


def split_indices(n, val_fraction, seed):
    """A seeded split of range(n): (train indices, val indices), both non-empty."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _limit(indices, limit):
    return indices if not limit else indices[:limit]


DIGITS_MEAN, DIGITS_STD = (0.5,) * 3, (0.5,) * 3


def load_digits(size, val_fraction=0.2, seed=0, limit=None, scale=0.5, hflip=0.0):
    """scikit-learn's 1,797 8x8 digits, upsampled once to size x size (3 channels)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataError("--dataset digits needs scikit-learn (pip install scikit-learn, or "
                        "pip install 'effnet_fast[train]')") from exc
    import torch.nn.functional as F
    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1)
    y = torch.tensor(digits.target)
    train_idx, val_idx = split_indices(len(y), val_fraction, seed)
    train_idx, val_idx = _limit(train_idx, limit), _limit(val_idx, limit)
    from torchvision.transforms import v2
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(scale, 1.0), ratio=(0.8, 1.25), antialias=True),
                          *([v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []),
                          v2.Normalize(DIGITS_MEAN, DIGITS_STD)])
    plain = v2.Normalize(DIGITS_MEAN, DIGITS_STD)
    train = TensorImages(x[train_idx], y[train_idx], augment)
    val = TensorImages(x[val_idx], y[val_idx], plain)
    return Data(train, val, [str(i) for i in range(10)], "digits",
                f"scikit-learn digits, {len(train)} train / {len(val)} val images, upsampled 8x8 -> {size}x{size}",
                DIGITS_MEAN, DIGITS_STD)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch files (dicts of numpy arrays, lists, strings and
    bytes) and nothing that could run other code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _read_cifar_batch(path):
    import numpy as np
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"--data: cannot read CIFAR-10 batch {path}: {exc}") from None
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"--data: {path} is not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"--data: {path}: expected N x 3072 uint8 images, got shape {data.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(batch["labels"], dtype=torch.long)


def cifar10_folder(root):
    """The folder holding CIFAR-10's batch files: `root` or root/cifar-10-batches-py."""
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, CIFAR10_TRAIN[0])):
            return candidate
    return None


def load_cifar10(root, size, val_fraction=0.2, seed=0, limit=None, scale=0.08, hflip=0.5):
    """CIFAR-10 in its python-pickle format from a local folder (data_batch_1..5, test_batch)."""
    folder = cifar10_folder(root)
    if folder is None:
        raise DataError(f"--data {root}: no CIFAR-10 batch files (data_batch_1 ...) there or in "
                        f"{os.path.join(root, 'cifar-10-batches-py')}; download and unpack cifar-10-python.tar.gz")
    parts = [_read_cifar_batch(os.path.join(folder, name)) for name in CIFAR10_TRAIN
             if os.path.isfile(os.path.join(folder, name))]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if os.path.isfile(os.path.join(folder, CIFAR10_TEST)):
        x_val, y_val = _read_cifar_batch(os.path.join(folder, CIFAR10_TEST))
        train_idx, val_idx, split = list(range(len(y))), None, "test_batch"
    else:
        train_idx, val_idx = split_indices(len(y), val_fraction, seed)
        x_val, y_val, split = x[val_idx], y[val_idx], f"--val-fraction {val_fraction}"
    train_idx = _limit(train_idx, limit)
    x, y = x[train_idx], y[train_idx]
    if limit:
        x_val, y_val = x_val[:limit], y_val[:limit]
    classes = list(CIFAR10_CLASSES)
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                names = _NumpyOnlyUnpickler(f, encoding="latin1").load().get("label_names")
            if names:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            pass
    n_classes = max(len(classes), int(y.max()) + 1)
    classes += [str(i) for i in range(len(classes), n_classes)]
    train = TensorImages(x, y, train_transform(size, scale, hflip, tensor_input=True))
    val = TensorImages(x_val, y_val, eval_transform(size, crop_fraction=1.0, tensor_input=True))
    return Data(train, val, classes, "cifar10",
                f"CIFAR-10 from {folder}, {len(train)} train / {len(val)} val images ({split}), 32x32 -> {size}x{size}")


def _has_images(folder):
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


class ImageFiles(Dataset):
    """The ImageFolder layout (root/<class>/**/<image>) as (image, class index) pairs,
    each image file once, unlike torchvision's ImageFolder: directory links inside a
    class folder are not followed (a link back into the tree would list its files again
    and again), and a file reached twice (a file link, a class folder linked into
    another) is kept once, by its real path. Images are read with read_image."""

    def __init__(self, root):
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.samples, seen = [], set()
        for index, cls in enumerate(self.classes):
            for folder, dirs, files in os.walk(os.path.join(root, cls)):  # followlinks=False
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    real = os.path.realpath(path)
                    if name.lower().endswith(IMAGE_EXTENSIONS) and real not in seen and os.path.isfile(real):
                        seen.add(real)
                        self.samples.append((path, index))
        found = {index for _, index in self.samples}
        empty = [cls for index, cls in enumerate(self.classes) if index not in found]
        if not self.classes or empty:
            raise FileNotFoundError(f"no class folders in {root}" if not self.classes else
                                    f"no image files (that no other class holds) in the class folders {empty}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return read_image(path), target

    def drop(self, real_paths):
        """Leave out the files whose real path is in `real_paths`; returns how many."""
        kept = [s for s in self.samples if os.path.realpath(s[0]) not in real_paths]
        dropped, self.samples = len(self.samples) - len(kept), kept
        return dropped


def _check_images(root, datasets_and_indices):
    """DataError naming the files (of those used) that are not images, before training."""
    bad = []
    for dataset, indices in datasets_and_indices:
        bad += unreadable_images(dataset.samples[i][0] for i in indices)
    if bad:
        raise DataError(f"--data {root}: {len(bad)} files are not images PIL can read (remove them): "
                        + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


def load_imagefolder(root, size, val_fraction=0.2, seed=0, limit=None, scale=0.08, hflip=0.5):
    """root/train/<class>/*.jpg (+ root/val/<class>/...), or root/<class>/... split by
    val_fraction. Each image file is read once (see ImageFiles); a file both in train/ and
    val/ is kept for validation only. Files that are not images are refused here."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        train_dir = root
    val_dir = next((os.path.join(root, v) for v in VAL_FOLDERS if os.path.isdir(os.path.join(root, v))), None)
    if train_dir == root:
        val_dir = None  # class folders directly under root: split them
    if not _has_images(train_dir):
        raise DataError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under "
                        f"{train_dir}; expected DIR/train/<class>/*.jpg (and DIR/val/<class>/...)")
    try:
        full = ImageFiles(train_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"--data {root}: {exc}") from None
    classes = list(full.classes)
    t_train, t_eval = train_transform(size, scale, hflip), eval_transform(size)
    shared = ""
    if val_dir is not None:
        try:
            val_full = ImageFiles(val_dir)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"--data {root}: {val_dir}: {exc}") from None
        if val_full.classes != classes:
            raise DataError(f"--data {root}: the class folders of {val_dir} ({len(val_full.classes)}) differ from "
                            f"those of {train_dir} ({len(classes)})")
        dropped = full.drop({os.path.realpath(path) for path, _ in val_full.samples})
        shared = f"; {dropped} files of both left out of training" if dropped else ""
        train_idx = _limit(list(range(len(full))), limit)
        val_idx = _limit(list(range(len(val_full))), limit)
        split = os.path.basename(val_dir) + "/"
    else:
        val_full = full
        train_idx, val_idx = split_indices(len(full), val_fraction, seed)
        train_idx, val_idx = _limit(train_idx, limit), _limit(val_idx, limit)
        split = f"--val-fraction {val_fraction}"
    _check_images(root, [(full, train_idx), (val_full, val_idx)])
    train = Transformed(Subset(full, train_idx), t_train)
    val = Transformed(Subset(val_full, val_idx), t_eval)
    return Data(train, val, classes, "imagefolder",
                f"ImageFolder {root}: {len(classes)} classes, {len(train)} train / {len(val)} val images ({split}"
                f"{shared}), {size}x{size}")


def resolve_dataset(data_dir, dataset):
    """The data set a (--data, --dataset) pair means."""
    if dataset != "auto":
        return dataset
    if data_dir is None:
        return "digits"
    return "cifar10" if cifar10_folder(data_dir) else "imagefolder"


def load_data(data_dir=None, dataset="auto", size=32, val_fraction=0.2, seed=0, limit=None, scale=None,
              hflip=None):
    """The training and validation sets; `scale` (random-resized-crop minimum area)
    and `hflip` default per data set (digits are not flipped)."""
    dataset = resolve_dataset(data_dir, dataset)
    if dataset != "digits":
        if data_dir is None:
            raise DataError(f"--dataset {dataset} needs --data DIR")
        if not os.path.isdir(data_dir):
            raise DataError(f"--data {data_dir}: not a directory")
    if dataset == "digits":
        if data_dir is not None:
            raise DataError("--dataset digits is built in; leave out --data (or pick --dataset imagefolder|cifar10)")
        return load_digits(size, val_fraction, seed, limit, 0.5 if scale is None else scale,
                           0.0 if hflip is None else hflip)
    kwargs = dict(scale=0.08 if scale is None else scale, hflip=0.5 if hflip is None else hflip)
    if dataset == "cifar10":
        return load_cifar10(data_dir, size, val_fraction, seed, limit, **kwargs)
    return load_imagefolder(data_dir, size, val_fraction, seed, limit, **kwargs)


# ---------------------------------------------------------------- loading

class EpochSampler(Sampler):
    """This rank's share of a permutation that depends on (seed, epoch) only.

    Every rank draws the same permutation, keeps its first len // world * world
    indices and takes every world-th from `rank`; `set_epoch(epoch, skip)` picks the
    epoch and skips the first `skip` indices of this rank (a resumed epoch).
    shuffle=False keeps the order and does not drop the tail: rank r gets r, r + world, ..."""

    def __init__(self, n, seed=0, rank=0, world=1, shuffle=True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.n // self.world * self.world]
        return perm[self.rank::self.world].tolist()

    def __iter__(self):
        return iter(self.indices()[self.skip:])

    def __len__(self):
        return max(0, len(self.indices()) - self.skip) if not self.shuffle else self.n // self.world - self.skip


def make_loader(dataset, batch_size, sampler, workers=0, pin_memory=False, drop_last=True):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=workers > 0)
