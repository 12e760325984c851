"""R3 measured: what changes when the same seed is sampled with the paper's "early" or "latter"
time steps instead of uniform ones.

The paper answers R3 ("what visual concept does time step t imply?") with pictures of the three
schedules; here the comparison is a number. For each schedule's final image against the
reference schedule's (uniform), at the same seed:

* **low / high frequency energy** of the difference image: its 2-D power spectrum split at
  ``cutoff`` (a fraction of the Nyquist frequency, radially; default 0.25); ``high_share`` =
  high / (low + high). A schedule that changes the *layout* moves energy at low frequencies (a
  low ``high_share``); one that changes *detail* moves it at high frequencies;
* **layout overlap**: the IoU of the object masks (when the caller gives them, e.g. from the
  shapes-world checker) and the correlation of the heavily blurred grey images (always);
* **difference RMS**: how much changed at all.

`compare_schedules` takes the images (any front end can make them: the diffusers adapter's
``generate(..., schedule=...)``, ComfyUI's exponential-sigmas node) and returns a
`ScheduleComparison` whose ``to_json`` a report section can show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _as_float(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [H, W, 3] (or [H, W, 1]), got shape {a.shape}")
    a = a.astype(np.float64)
    return a / 255.0 if np.asarray(image).dtype == np.uint8 or a.max() > 1.5 else a


def band_energy(diff: np.ndarray, cutoff: float = 0.25) -> tuple[float, float]:
    """(low, high) spectral energy of an image ``[H, W, C]`` (channels summed), split at radial
    frequency ``cutoff`` × Nyquist."""
    if not 0 < cutoff < 1:
        raise ValueError(f"cutoff must be a fraction of the Nyquist frequency in (0, 1), got {cutoff}")
    h, w = diff.shape[:2]
    power = (np.abs(np.fft.fft2(diff, axes=(0, 1))) ** 2).sum(-1)
    fy = np.fft.fftfreq(h)[:, None] / 0.5
    fx = np.fft.fftfreq(w)[None, :] / 0.5
    radius = np.sqrt(fy**2 + fx**2)
    low = float(power[radius <= cutoff].sum())
    high = float(power[radius > cutoff].sum())
    return low, high


def _blurred_grey(image: np.ndarray, sigma_fraction: float = 0.08) -> np.ndarray:
    from scipy import ndimage

    grey = image.mean(-1)
    return ndimage.gaussian_filter(grey, sigma=max(1.0, sigma_fraction * max(grey.shape)), mode="reflect")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@dataclass
class ScheduleDifference:
    schedule: str
    rms: float
    low_energy: float
    high_energy: float
    high_share: float
    layout_correlation: float
    mask_iou: float | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ScheduleComparison:
    reference: str
    cutoff: float
    differences: dict[str, ScheduleDifference] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "cutoff": self.cutoff,
            "differences": {k: v.to_json() for k, v in self.differences.items()},
            "definitions": {
                "rms": "root mean square of the difference to the reference schedule's image (0..1 pixels)",
                "low_energy / high_energy": f"spectral energy of the difference below / above {self.cutoff} x Nyquist",
                "high_share": "high / (low + high): near 0 the schedule moved the layout, near 1 only detail",
                "layout_correlation": "Pearson correlation of the blurred grey images (1 = same layout)",
                "mask_iou": "IoU of the object masks (when given)",
            },
        }


def compare_schedules(images: dict, reference: str = "uniform", masks: dict | None = None, cutoff: float = 0.25) -> ScheduleComparison:
    """Compare each schedule's final image ``images[name]`` (``[H, W, 3]``, uint8 or 0..1) with
    ``images[reference]``; ``masks[name]`` (optional, boolean ``[H, W]``: the objects' union)
    gives the layout IoU."""
    if reference not in images:
        raise ValueError(f"the reference schedule {reference!r} has no image; got {', '.join(images)}")
    ref = _as_float(images[reference])
    ref_blur = _blurred_grey(ref)
    out = ScheduleComparison(reference, cutoff)
    for name, image in images.items():
        if name == reference:
            continue
        img = _as_float(image)
        if img.shape != ref.shape:
            raise ValueError(f"image {name!r} is {img.shape}, the reference {ref.shape}: compare images of one size")
        diff = img - ref
        low, high = band_energy(diff, cutoff)
        blur = _blurred_grey(img)
        a, b = blur - blur.mean(), ref_blur - ref_blur.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        corr = float((a * b).sum() / denom) if denom > 0 else 1.0
        iou = _iou(masks[name], masks[reference]) if masks and name in masks and reference in masks else None
        total = low + high
        out.differences[name] = ScheduleDifference(name, float(np.sqrt((diff**2).mean())), low, high, high / total if total > 0 else 0.0, corr, iou)
    return out
