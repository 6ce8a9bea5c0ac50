"""Views at compute speed: a method's per-view torchvision v2 pipelines, run batched where the model runs.

A method file declares its views as torchvision v2 pipelines, one ``v2.Compose`` per view
(``augmentations(cfg, image_size, mean, std)``). :func:`plan_views` decides where each part runs:

- ``device``: every transform of every view has a batched counterpart (:func:`translate`): the loader
  only stacks the decoded uint8 images, and the views are made on the training device (CPU or CUDA)
  with per-sample random parameters (kornia's crop sampling and blur filter; the
  per-sample gates are ``torch.where`` on parameters drawn on the CPU, never a data-dependent subset,
  so that no step waits for the device).
  Images decoded per access (large ImageFolders) keep the geometric crop and flip in the loader
  workers, per image, and only the photometric rest is batched.
- ``loader``: the pipelines run per image in the loader workers, as written. A recipe with a transform
  that has no batched counterpart (a method's own pretext transform) goes here, with a one-line notice:
  the views are never silently different from what the file declares.

Semantics kept by the batched ops (and checked against torchvision in ``tests/test_views.py``): crop
scale and ratio ranges with torchvision's sampling (10 tries, then the centre crop), bilinear resize
with antialiasing, flip, grayscale and apply probabilities per sample, colour-jitter factors and their
random order per sample, blur sigma range, kernel size and reflect padding, solarize threshold. The
batched ops work in float on [0, 1]; torchvision's PIL/uint8 ops round to 8 bits after each op, which is
the only difference (about 1/255 per op).

Randomness comes from the global torch RNG, which the training loop reseeds from (seed, step, rank)
before every step, so a resumed run makes exactly the views an uninterrupted run would have made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kornia.filters as KF
import torch
from kornia.augmentation import random_generator as rg
from torchvision.transforms import v2

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


class Untranslatable(Exception):
    """A transform without a batched counterpart; its message names it."""


# --- batched ops: (N, C, H, W) float on [0, 1] -> same ---------------------------------------------


def _bernoulli(n: int, p: float, device: torch.device) -> torch.Tensor:
    """(N,) bool, each True with probability p; drawn on the CPU so that no step waits for the device."""
    return (torch.rand(n) < p).to(device, non_blocking=True)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, antialias: bool) -> torch.Tensor:
    """(N, out_size, in_size) separable weights that resize rows [start, start + length) of each sample to
    out_size, as ``F.interpolate(mode="bilinear", align_corners=False, antialias=...)`` does on the crop."""
    length = length.float()[:, None, None]  # (N, 1, 1)
    scale = length / out_size  # input pixels per output pixel
    centre = scale * (torch.arange(out_size, dtype=torch.float32)[None, :, None] + 0.5)  # (N, S, 1), crop coordinates
    a = torch.arange(in_size, dtype=torch.float32)[None, None, :] - start.float()[:, None, None]  # (N, 1, H)
    if antialias:  # PyTorch's anti-aliased kernel: a triangle filter stretched by the downscaling factor
        support = scale.clamp(min=1.0)
        xmin = (centre - support + 0.5).trunc().clamp_(min=0)
        xmax = torch.minimum((centre + support + 0.5).trunc(), length)
        w = (1 - ((a - centre + 0.5) / support).abs()).clamp_(min=0) * ((a >= xmin) & (a < xmax))
    else:  # plain bilinear: the source coordinate clamped into the crop, two taps
        src = torch.minimum((centre - 0.5).clamp(min=0), length - 1)
        w = (1 - (a - src).abs()).clamp_(min=0) * ((a >= 0) & (a < length))
    return w / w.sum(dim=2, keepdim=True).clamp_(min=1e-12)


class ResizedCrop:
    """torchvision's RandomResizedCrop: kornia's generator draws the boxes with torchvision's sampling
    (area and log-ratio uniform, 10 tries, then the centre crop); each box is cut and resized exactly like
    ``F.resized_crop`` (bilinear, align_corners=False, antialias), as two batched matrix products with
    per-sample separable resampling weights instead of one interpolate call per sample."""

    geometric = True

    def __init__(self, t: v2.RandomResizedCrop):
        if t.interpolation not in ("bilinear", v2.InterpolationMode.BILINEAR):
            raise Untranslatable(f"RandomResizedCrop with {t.interpolation} interpolation")
        self.size, self.antialias = tuple(t.size), bool(t.antialias)
        self.generator = rg.ResizedCropGenerator(self.size, tuple(t.scale), tuple(t.ratio))
        self.generator.set_rng_device_and_dtype(torch.device("cpu"), torch.float32)

    def boxes(self, shape: torch.Size) -> torch.Tensor:
        """(N, 4) integer boxes (top, left, height, width), drawn on the CPU."""
        src = self.generator(shape)["src"].long()  # (N, 4, 2) corners (x, y)
        top, left = src[:, 0, 1], src[:, 0, 0]
        return torch.stack([top, left, src[:, 2, 1] + 1 - top, src[:, 2, 0] + 1 - left], dim=1)

    def apply(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        (h_out, w_out), (_, _, h_in, w_in) = self.size, x.shape
        rows = _resize_weights(boxes[:, 0], boxes[:, 2], h_out, h_in, self.antialias).to(x.device, non_blocking=True)
        cols = _resize_weights(boxes[:, 1], boxes[:, 3], w_out, w_in, self.antialias).to(x.device, non_blocking=True)
        rows, cols = rows.to(x.dtype), cols.to(x.dtype)
        n, c = x.shape[:2]
        # two batched products over the N samples: rows (N, S, H) x (N, H, C*W), then (N, S*C, W) x cols^T
        y = torch.bmm(rows, x.permute(0, 2, 1, 3).reshape(n, h_in, c * w_in))  # (N, S_h, C*W)
        y = torch.bmm(y.view(n, h_out * c, w_in), cols.transpose(1, 2))  # (N, S_h*C, S_w)
        return y.view(n, h_out, c, w_out).permute(0, 2, 1, 3).contiguous()  # (N, C, S_h, S_w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.boxes(x.shape))


class HorizontalFlip:
    geometric = True

    def __init__(self, t: v2.RandomHorizontalFlip):
        self.p = t.p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(_bernoulli(x.shape[0], self.p, x.device)[:, None, None, None], x.flip(-1), x)


class ColorJitter:
    """torchvision's ColorJitter, applied with probability p: factors drawn per sample, and the four
    adjustments applied in a random order per sample (torchvision draws ``randperm(4)`` per image).

    The orders are drawn on the CPU; samples are grouped by order (24 permutations, plus the samples it
    is not applied to) so that every adjustment runs once per sample on contiguous slices, and no step
    waits for the device. The blends are torchvision's formulas (brightness scales, contrast blends with
    the grayscale mean, saturation with the grayscale image, hue rotates the HSV hue): a few elementwise
    ops each, where kornia's general-purpose colour conversions cost about five times as much here."""

    geometric = False

    def __init__(self, t: v2.ColorJitter, p: float = 1.0):
        self.ranges = [t.brightness, t.contrast, t.saturation, t.hue]
        self.p = p

    @staticmethod
    def adjust(j: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Adjustment j (brightness, contrast, saturation, hue) of x (n, 3, H, W) by factors f (n,)."""
        f = f[:, None, None, None]
        if j == 3:
            return _hue_shift(x, f)
        if j == 0:
            return (x * f).clamp_(0, 1)
        gray = _gray(x)
        target = gray.mean(dim=(1, 2, 3), keepdim=True) if j == 1 else gray
        return (f * x + (1 - f) * target).clamp_(0, 1)

    def params(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(applied (n,) bool, order (n, 4), factors (n, 4)), all on the CPU."""
        applied = torch.rand(n) < self.p
        order = torch.rand(n, 4).argsort(dim=1)
        factors = torch.zeros(n, 4)
        for j, r in enumerate(self.ranges):
            if r is not None:
                factors[:, j] = torch.rand(n) * (r[1] - r[0]) + r[0]
        return applied, order, factors

    def apply(self, x: torch.Tensor, applied: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        active = [j for j, r in enumerate(self.ranges) if r is not None]
        # group id: the rank of the sample's permutation (base-4 code); -1 where not applied
        code = torch.where(applied, (order * torch.tensor([64, 16, 4, 1])).sum(1), torch.full_like(applied, -1, dtype=torch.long))
        perm = torch.argsort(code, stable=True)
        codes, counts = torch.unique_consecutive(code[perm], return_counts=True)
        y = x[perm.to(x.device, non_blocking=True)]
        f_dev = factors[perm].to(x.device, non_blocking=True)
        start = 0
        for c, k in zip(codes.tolist(), counts.tolist()):
            if c >= 0:
                sl = slice(start, start + k)
                for j in order[perm[start]].tolist():
                    if j in active:
                        y[sl] = self.adjust(j, y[sl], f_dev[sl, j])
            start += k
        out = torch.empty_like(y)
        out[perm.to(x.device, non_blocking=True)] = y
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, *self.params(x.shape[0]))


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` with a per-sample shift (n, 1, 1, 1) in turns: the hue of every pixel,
    computed as ``rgb_to_hsv`` does, moves by the shift; value and saturation stay (so do max and min)."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h6 = torch.remainder(h + 6.0 * shift[:, 0], 6.0)  # hue in sixths of a turn, shifted
    # HSV -> RGB as the hexcone: channel = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    out = [maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0, 1) for k in
           (torch.remainder(n + h6, 6.0) for n in (5.0, 3.0, 1.0))]
    return torch.stack(out, dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) with torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


class Grayscale:
    geometric = False

    def __init__(self, t: v2.RandomGrayscale):
        self.p = t.p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = _bernoulli(x.shape[0], self.p, x.device)[:, None, None, None]
        return torch.where(mask, _gray(x).expand_as(x), x)


class GaussianBlur:
    """torchvision's GaussianBlur with probability p: sigma ~ U(sigma range) per sample, both axes,
    a fixed kernel size, reflect padding (kornia's separable filter with a kernel per sample)."""

    geometric = False

    def __init__(self, t: v2.GaussianBlur, p: float = 1.0):
        self.kernel, self.sigma, self.p = tuple(t.kernel_size), tuple(t.sigma), p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sigma = (torch.rand(n) * (self.sigma[1] - self.sigma[0]) + self.sigma[0]).to(x.device, non_blocking=True)
        blurred = KF.gaussian_blur2d(x, self.kernel, sigma[:, None].expand(n, 2), border_type="reflect")
        return torch.where(_bernoulli(n, self.p, x.device)[:, None, None, None], blurred, x)


class Solarize:
    """Pixels at or above the threshold are inverted, with probability p per sample."""

    geometric = False

    def __init__(self, t: v2.RandomSolarize, scale: float):
        self.threshold, self.p = float(t.threshold) / scale, t.p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = _bernoulli(x.shape[0], self.p, x.device)[:, None, None, None]
        return torch.where(mask & (x >= self.threshold), 1.0 - x, x)


class Normalize:
    geometric = False

    def __init__(self, t: v2.Normalize):
        self.mean, self.std = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


# --- translation ------------------------------------------------------------------------------------


def _translate_op(t, uint8: bool) -> Callable | None:
    """The batched counterpart of one v2 transform; None for dtype/format steps (the batched views are
    float on [0, 1] throughout). ``uint8``: the pipeline is still in 8-bit values at this point."""
    if isinstance(t, (v2.ToImage, v2.ToPureTensor)):
        return None
    if isinstance(t, v2.ToDtype):
        if t.dtype not in (torch.float32, {torch.Tensor: torch.float32}) or not t.scale:
            raise Untranslatable(f"ToDtype({t.dtype}, scale={t.scale}) (only float32 with scale=True is translated)")
        return None
    if isinstance(t, v2.RandomApply):
        if len(t.transforms) != 1:
            raise Untranslatable("RandomApply over several transforms")
        (inner,) = t.transforms
        if isinstance(inner, v2.ColorJitter):
            return ColorJitter(inner, t.p)
        if isinstance(inner, v2.GaussianBlur):
            return GaussianBlur(inner, t.p)
        raise Untranslatable(f"RandomApply([{type(inner).__name__}])")
    simple = {
        v2.RandomResizedCrop: ResizedCrop, v2.RandomHorizontalFlip: HorizontalFlip, v2.ColorJitter: ColorJitter,
        v2.RandomGrayscale: Grayscale, v2.GaussianBlur: GaussianBlur, v2.Normalize: Normalize,
    }
    if type(t) in simple:
        return simple[type(t)](t)
    if type(t) is v2.RandomSolarize:
        return Solarize(t, 255.0 if uint8 else 1.0)
    raise Untranslatable(type(t).__name__)


def translate(pipeline: v2.Compose) -> list[tuple[object, Callable]]:
    """(v2 transform, batched op) for every step of a view's pipeline that does something.
    Raises :class:`Untranslatable` naming the first transform without a counterpart."""
    if not isinstance(pipeline, v2.Compose):
        raise Untranslatable(f"a view is a {type(pipeline).__name__}, not a v2.Compose")
    ops, uint8 = [], True
    for t in pipeline.transforms:
        op = _translate_op(t, uint8)
        if isinstance(t, v2.ToDtype):
            uint8 = False
        if op is not None:
            ops.append((t, op))
    return ops


class DeviceView:
    """A view's batched ops: uint8 (N, 3, H, W) on the device -> float views."""

    def __init__(self, ops: Sequence[Callable]):
        self.ops = list(ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_float(x)
        for op in self.ops:  # each op returns a new tensor: x may be shared with the other views
            x = op(x)
        return x


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


@dataclass
class ViewPlan:
    """Where each view's transforms run. ``host[v]`` runs per image in the loader (None: the decoded
    uint8 image as it is); ``device[v]`` runs batched on the training device (None: nothing left)."""

    mode: str  # "device" or "loader"
    host: list[Callable | None]
    device: list[DeviceView | None]
    notice: str | None = None

    @property
    def shared_input(self) -> bool:
        """The loader yields each image once; every view is made from it on the device."""
        return all(h is None for h in self.host)

    def make_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the loader yielded (on the device) -> the method's V views."""
        if self.shared_input:
            x = _to_float(views[0])  # once for all views
            return [d(x) for d in self.device]
        return [v if d is None else d(v) for v, d in zip(views, self.device)]


def _loader_plan(pipelines: Sequence[Callable], notice: str | None = None) -> ViewPlan:
    return ViewPlan("loader", list(pipelines), [None] * len(pipelines), notice)


def plan_views(pipelines: Sequence[Callable], in_memory: bool, mode: str = "device") -> ViewPlan:
    """Decide where each view's transforms run (see the module docstring). ``mode``: ``device`` (batched
    where the recipe translates, else the loader with a notice) or ``loader`` (per image, as written)."""
    if mode not in ("device", "loader"):
        raise ValueError(f"--augment must be device or loader, got {mode!r}")
    pipelines = list(pipelines)
    if mode == "loader":
        return _loader_plan(pipelines)
    try:
        translated = [translate(p) for p in pipelines]
    except Untranslatable as e:
        return _loader_plan(pipelines, f"views run per image in the loader: {e} has no batched counterpart")
    if in_memory:
        return ViewPlan("device", [None] * len(pipelines), [DeviceView(op for _, op in ops) for ops in translated])
    # decoded per access: the leading geometric ops run per image (fixed-size uint8 crops), the rest batched
    host, device = [], []
    for ops in translated:
        k = next((i for i, (_, op) in enumerate(ops) if not op.geometric), len(ops))
        if any(op.geometric for _, op in ops[k:]):
            return _loader_plan(pipelines, "views run per image in the loader: a crop or flip follows a colour op")
        host.append(v2.Compose([t for t, _ in ops[:k]]))
        device.append(DeviceView(op for _, op in ops[k:]))
    return ViewPlan("device", host, device)
