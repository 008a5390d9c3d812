"""Reading, writing and listing images: one place that decides how odd files become RGB float arrays.

Every dataset goes through :func:`read_image`, so grayscale, alpha, 16-bit and broken files are handled
the same way for training and for evaluation (see ``data/README.md``, "Odd inputs").

Decoding uses ``cv2.imdecode(..., IMREAD_UNCHANGED)`` on the raw bytes because it keeps the full
16-bit precision of RGB PNG/TIFF files (PIL rounds them to 8 bits) and works with non-ASCII paths.
EXIF orientation is ignored, as in BasicSR/Real-ESRGAN, so that pixels match the reference pipelines.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from restore.atomic_write import atomic_write_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "image_size",
    "is_image_file",
    "list_images",
    "os_error_reason",
    "read_image",
    "to_numpy",
    "to_tensor",
    "walk_files",
    "write_image",
]

log = logging.getLogger(__name__)

#: Lower-case suffixes recognised as images (matching is case-insensitive).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

_DATA_README = "data/README.md"
_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(OSError):
    """An image file could not be turned into pixels; the message names the file and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str) -> None:
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"Cannot read image '{self.path}': {reason}. Fix: {fix}")

    def __reduce__(self):  # keep the exception picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason, self.fix))


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the suffix is one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) from the file header without decoding, or None when the header cannot be read
    (the real read, :func:`read_image`, then raises a proper :class:`ImageReadError`). For checking a
    whole set of files cheaply before any work."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - any failure just defers the check to read_image
        return None
    return height, width


def _truncation_reason(data: bytes) -> str | None:
    """Structural end-of-file check, independent of the decoder's leniency.

    Some libjpeg/libpng builds return a partially decoded (grey-filled) image for a file cut short;
    the end markers tell us reliably. Trailing bytes after the end marker (camera metadata) are allowed.
    """
    if data.startswith(_PNG_SIGNATURE):
        pos = len(_PNG_SIGNATURE)
        while pos + 8 <= len(data):  # walk the chunk list: length (4) + type (4) + data + crc (4)
            if data[pos + 4 : pos + 8] == b"IEND":
                return None
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
        return "the PNG ends before its IEND chunk (file is truncated)"
    if data.startswith(_JPEG_SOI):
        last_scan = data.rfind(_JPEG_SOS)
        if last_scan != -1 and data.find(_JPEG_EOI, last_scan) == -1:
            return "the JPEG has no end-of-image marker after its last scan (file is truncated)"
    return None


def _to_unit_float(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.0)
    if img.dtype == np.uint16:
        # float64 division then float32: exact to float32 rounding for every 16-bit code.
        return (img.astype(np.float64) / 65535.0).astype(np.float32)
    if img.dtype in (np.float32, np.float64):
        return np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0)
    raise ImageReadError(path, f"unsupported pixel type {img.dtype}", "convert it to an 8- or 16-bit PNG")


def read_image(path: str | os.PathLike, alpha_background: float = 1.0) -> np.ndarray:
    """Read any supported image as float32 RGB, shape (H, W, 3), values in [0, 1].

    - 8-bit is divided by 255, 16-bit by 65535 (full precision kept).
    - Grayscale is replicated to 3 channels.
    - Gray+alpha and RGBA are alpha-composited over a uniform background of value ``alpha_background``
      (default 1.0 = white, the usual look of transparent images): ``rgb * a + bg * (1 - a)``.
      Keeping the raw colour under transparent pixels would feed arbitrary (often black) pixels.
    - Missing, truncated, corrupt or non-image files raise :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    if not 0.0 <= alpha_background <= 1.0:
        raise ValueError(f"alpha_background must be in [0, 1], got {alpha_background}")
    if not path.exists():
        raise ImageReadError(
            path,
            "the file does not exist",
            f"check the path and `paths.data_root` (see {_DATA_README} for the expected layout)",
        )
    if path.is_dir():
        raise ImageReadError(path, "it is a directory, not a file", "point at an image file")
    try:
        data = path.read_bytes()
    except OSError as err:  # permission denied, a dangling network mount, an I/O error of the disk
        raise ImageReadError(path, os_error_reason(err), _os_error_fix(err, path)) from err
    redownload = f"re-download or re-export the file, or drop it from the file list ({_DATA_README})"
    if not data:
        raise ImageReadError(path, "the file is empty", redownload)
    truncated = _truncation_reason(data)
    if truncated is not None:
        raise ImageReadError(path, truncated, redownload)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise ImageReadError(path, f"the decoder failed ({err})", redownload) from err
    if img is None:
        raise ImageReadError(
            path, "it is not a decodable image (corrupt, or not an image despite its name)", redownload
        )

    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.repeat(_to_unit_float(img, path)[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (2, 3, 4):
        raise ImageReadError(
            path,
            f"unsupported layout {img.shape} (expected gray, gray+alpha, RGB or RGBA)",
            "convert it to an RGB PNG",
        )
    img = _to_unit_float(img, path)
    channels = img.shape[2]
    if channels == 2:  # gray + alpha (cv2 usually expands it to BGRA already)
        color, alpha = np.repeat(img[:, :, :1], 3, axis=2), img[:, :, 1:2]
    elif channels == 4:
        color, alpha = img[:, :, 2::-1], img[:, :, 3:4]  # BGRA -> RGB
    else:
        return np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB
    out = color * alpha + np.float32(alpha_background) * (np.float32(1.0) - alpha)
    return np.ascontiguousarray(out, dtype=np.float32)


def _as_hwc_numpy(img: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        if img.ndim != 3:
            raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(img.shape)}")
        return to_numpy(img)
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {img.shape}")
    return img


def write_image(path: str | os.PathLike, img: np.ndarray | torch.Tensor, overwrite: bool = False) -> Path:
    """Write a float [0, 1] image (HWC numpy or CHW tensor, RGB or gray) as an 8-bit PNG.

    Values are clipped then rounded (``round(clip(x, 0, 1) * 255)``). Parent directories are created.
    An existing file is never replaced silently (results from earlier runs are precious): pass
    ``overwrite=True`` to replace it. The write goes through a temporary file + rename, so a crash never
    leaves a half-written PNG that a resumed evaluation would mistake for a finished result.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_image writes PNG only; use a '.png' file name, got '{path}'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    arr = _as_hwc_numpy(img).astype(np.float32, copy=False)
    channels = arr.shape[2]
    if channels not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {channels} (shape {arr.shape})")
    u8 = np.rint(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).astype(np.uint8)
    if channels == 3:
        u8 = np.ascontiguousarray(u8[:, :, ::-1])  # RGB -> BGR for OpenCV
    ok, encoded = cv2.imencode(".png", u8)
    if not ok:
        raise OSError(f"OpenCV failed to encode '{path}' as PNG")
    return atomic_write_bytes(path, encoded.tobytes())


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, C) float array -> contiguous (C, H, W) float32 tensor (copies, so flips/views are safe)."""
    img = np.asarray(img)
    if img.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) float32 numpy array (detached, on CPU); inverse of :func:`to_tensor`."""
    if t.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(t.shape)}")
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy().transpose(1, 2, 0))


def os_error_reason(err: OSError) -> str:
    """``"permission denied (errno 13)"``: an OSError in the words of a skip reason."""
    text = (err.strerror or type(err).__name__).lower()
    return f"{text} (errno {err.errno})" if err.errno else text


def _os_error_fix(err: OSError, path: Path) -> str:
    if isinstance(err, PermissionError):
        return f"make it readable by this user (e.g. `chmod a+r '{path}'`), or remove it from the folder"
    return "check the disk or mount it lives on, or remove it from the folder"


def walk_files(root: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file under ``root`` (hidden files and folders left out), sorted by relative path, and the folders
    that were not listed, each with its reason.

    Symlinked folders are followed (datasets are often linked into data/), each real folder once: a link back to
    a folder already on the way down (a loop) or already listed is reported instead of being listed again, so a
    loop cannot multiply the images. A folder that cannot be opened (permission denied) is reported, not
    silently dropped.
    """
    root = Path(root)
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    listed: dict[tuple[int, int], Path] = {}

    def unreadable(err: OSError) -> None:
        problems.append((Path(err.filename), f"the folder cannot be listed: {os_error_reason(err)}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        here = Path(dirpath)
        st = os.stat(here)
        seen = listed.get((st.st_dev, st.st_ino))
        if seen is not None:
            problems.append((here, f"a symlink to the folder '{seen}', which is already listed (a loop?)"))
            dirnames[:] = []
            continue
        listed[(st.st_dev, st.st_ino)] = here
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(here / name for name in filenames if not name.startswith("."))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files, problems


def _walk_images(root: Path) -> list[Path]:
    # Hidden files include macOS '._x.png' resource forks, which are not images.
    files, problems = walk_files(root)
    for folder, reason in problems:
        log.warning(f"skipped '{folder}': {reason}")
    return [f for f in files if is_image_file(f)]


def _read_file_list(file_list: Path, key: str | None) -> list[str]:
    text = file_list.read_text(encoding="utf-8")
    if file_list.suffix.lower() != ".json":
        return [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"file list '{file_list}' is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"file list '{file_list}' must hold a JSON list, got {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            keys = [key] if key is not None else ["path_gt", "path"]
            found = next((entry[k] for k in keys if k in entry), None)
            if not isinstance(found, str):
                raise ValueError(
                    f"file list '{file_list}', entry {i}: no string field {' or '.join(map(repr, keys))} "
                    f"in {entry!r}; set `file_list_key` to the field holding the image path"
                )
            out.append(found)
        else:
            raise ValueError(
                f"file list '{file_list}', entry {i}: expected a string or an object, got {entry!r}"
            )
    return out


def list_images(
    root: str | os.PathLike,
    file_list: str | os.PathLike | None = None,
    file_list_key: str | None = None,
) -> list[Path]:
    """Image files of a dataset folder, sorted by their path relative to ``root``.

    Without ``file_list``: recursive listing of files with an image suffix (hidden files and folders
    are skipped; symlinked folders are followed). With ``file_list``: exactly the files it names, in
    its order, relative to ``root``. Accepted formats:

    - plain text (any suffix but ``.json``): one relative path per line; blank lines and ``#`` comments
      are skipped;
    - ``.json``: a list of strings, or a list of objects whose ``file_list_key`` field holds the path.
      With ``file_list_key=None`` the field ``"path_gt"`` is used, else ``"path"`` (LSDIR's
      ``train.json`` uses ``"path"``, its ``train_X4.json`` uses ``"path_gt"``).

    Listed files that do not exist raise ``FileNotFoundError`` naming the first few, so a partial
    download is caught before training rather than hours into it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder '{root}' does not exist; download it as described in {_DATA_README} "
            "or set `paths.data_root`"
        )
    if file_list is None:
        files = _walk_images(root)
        if not files:
            raise FileNotFoundError(
                f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under '{root}'; "
                f"see {_DATA_README} for how to download and lay out this dataset"
            )
        return files

    file_list = Path(file_list)
    if not file_list.is_file():
        raise FileNotFoundError(f"file list '{file_list}' does not exist (see {_DATA_README})")
    rel_paths = _read_file_list(file_list, file_list_key)
    if not rel_paths:
        raise ValueError(f"file list '{file_list}' names no files")
    files = [root / rel for rel in rel_paths]
    missing = [rel for rel, f in zip(rel_paths, files) if not f.is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(missing, root, file_list))
    return files


def _missing_message(missing: Sequence[str], root: Path, file_list: Path, shown: int = 5) -> str:
    head = ", ".join(repr(m) for m in missing[:shown])
    more = f" (and {len(missing) - shown} more)" if len(missing) > shown else ""
    return (
        f"{len(missing)} file(s) named in '{file_list}' are missing under '{root}': {head}{more}; "
        f"the download is incomplete or the root is wrong (see {_DATA_README})"
    )
