"""BEiT — Bao, Dong, Piao, Wei. "BEiT: BERT Pre-Training of Image Transformers". ICLR 2022, arXiv:2106.08254.
Catalog id: ``beit``. Official code: https://github.com/microsoft/unilm/tree/master/beit
(``modeling_pretrain.py``, ``masking_generator.py``, ``engine_for_pretraining.py``, ``run_beit_pretraining.py``,
``run_linear_eval.py``, the README's ImageNet-1k pre-training command).

Masked image modeling with discrete targets (Sec. 2). Each image has two views: its grid of L patches, the
Transformer's input, and a grid of L visual tokens z_i in a vocabulary V from a frozen tokenizer, the targets
(Sec. 2.1). About 40% of the patches M are chosen block by block (Algorithm 1, ``blockwise_masking``); their
patch embeddings are replaced by one learned embedding e_[M] inside the encoder, before the position
embeddings are added and the Transformer runs (Sec. 2.3; official ``forward_features``). A linear layer over
the vocabulary (``lm_head``) on the final hidden vectors h_i^L of the masked positions classifies each one's
visual token (Sec. 2.3):

    p_MIM(z' | x^M) = softmax_{z'}(W_c h_i^L + b_c),
    L = - 1/|M| sum_{i in M} log p_MIM(z_i | x^M),     z_i = argmin_k || x~_i - c_k ||^2

with M the masked patches of the batch (the official cross-entropy on ``x[bool_masked_pos]``), x~_i patch i
of the unmasked image normalised by its own mean and (unbiased) variance, and c_k the tokenizer's codebook.

Collapse: none to prevent. The targets come from a fixed tokenizer that does not depend on the encoder, so a
constant representation cannot predict them; the blockwise masking keeps the task from being solved by
copying neighbouring pixels (Sec. 2.3, Table 4).

The tokenizer (deviation, see below): the paper's tokenizer is the discrete VAE released with DALL-E (|V| = 8192,
Sec. 2.1.2), which cannot be downloaded here. This file builds an offline stand-in: before the first epoch,
``on_epoch_start`` reads patches of the training images (the evaluation transform, index order, a seeded
sample of ``tokenizer_patches``) through the harness's ``features(encode)`` and fits a k-means codebook of
``vocab_size`` per-patch-normalised pixel patches (``kmeans``, as deepcluster.py's). The codebook is a registered
buffer, fitted once (a resumed run finds it in the checkpoint and keeps it) and never trained, as the paper's
tokenizer is frozen. The visual token of a patch is its nearest code. Every rank fits the same codebook: the
patches and the seed are the same, so there is no collective.

Backbone: a ViT with patch tokens (selfsup's ``vit_tiny``: ``--backbone vit_tiny``): ``patch_embed`` a strided
conv (kernel = stride = p), ``pos_embed`` (L, D), ``cls_token``, ``blocks`` of pre-norm blocks taking (N, T, D),
``norm``. ``masked_encoder`` walks these parts so that the mask token enters before the blocks. Other
backbones get a one-line ValueError.

Features for evaluation (``embed``): the official linear probe's (``run_linear_eval.py``,
``--avgpool_patchtokens`` on): the output of one intermediate block (``probe_layer``), its CLS token
concatenated with the mean of its patch tokens, (N, 2D). The official script trains a probe on every block
and reports the best; which block the paper's linear-probe figure uses could not be checked here, so
``probe_layer = -4`` (block 9 of ViT-B's 12) is this file's choice. The paper's main results fine-tune.

Distributed: no cross-sample term. Each masked patch is scored against its own image's token from the fixed
codebook; the masks come from each rank's RNG, and the mean over masked patches is per rank, as the official
per-GPU loss.

Deviations:
- the tokenizer is a k-means codebook of normalised pixel patches fitted on the training set (above), not
  DALL-E's dVAE: each token depends on its own patch only, where the dVAE's encoder sees the whole 112-px
  image. The default vocabulary keeps the paper's 8192; the tokenizer reads the same crop as the encoder at
  the encoder's resolution (officially a second, 112-px lanczos resize of the same crop, one dVAE token per
  16-px patch: the same grid);
- blockwise masking follows Algorithm 1 with the official code's reading of its random draws: the aspect
  ratio is log-uniform in [0.3, 1/0.3] (official ``log_aspect_ratio``), block sides are rounded, a block's top
  and left are uniform integers, a candidate that does not fit in the grid is skipped. As in Algorithm 1 the
  loop stops once more than 40% is masked (the official generator stops at exactly 75 of 196, 38%);
- the backbone is the harness's ViT: fixed 2-D sin-cos absolute position embeddings where the official model
  learns a shared relative position bias (``--rel_pos_bias``), no LayerScale (``--layer_scale_init_value 0.1``),
  no stochastic depth (``--drop_path 0.1``), PyTorch's default initialisation (officially truncated normal
  0.02 with a depth rescaling). The mask token and ``lm_head`` are initialised as officially (truncated normal
  0.02, zero bias);
- the harness has no gradient clipping (official ``--clip_grad 3.0``); its cosine schedule decays the lr to 0
  (official ``min_lr 1e-5``) from a warm-up starting at 0 (official ``warmup_lr 1e-6``); its weight decay skips
  biases and norms; the official one also skips the CLS token;
- the crop is resized bilinearly, not bicubically (official ``--train_interpolation bicubic``), so that it runs
  batched on the device; the masks are drawn in ``forward`` (officially per image in the data loader).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2


@dataclass(frozen=True)
class Config:
    vocab_size: int = 8192
    """|V|, visual tokens in the vocabulary: the codebook's size and ``lm_head``'s outputs (Sec. 2.1.2: the
    DALL-E tokenizer's 8192; official ``beit_base_patch16_224_8k_vocab``)."""
    mask_ratio: float = 0.4
    """Masking stops once more than this share of patches is masked (Algorithm 1: "until |M| > 0.4N"; Sec. 2.5;
    official ``--num_mask_patches 75`` of 196)."""
    min_block_patches: int = 16
    """Smallest block area s (Algorithm 1: s <- Rand(16, 0.4N - |M|); official ``--min_mask_patches_per_block``)."""
    min_aspect: float = 0.3
    """Block aspect ratios lie in [0.3, 1/0.3] (Algorithm 1; official ``MaskingGenerator(min_aspect=0.3)``)."""
    tokenizer_patches: int = 262144
    """Patches sampled from the training set for the codebook's k-means (a deviation: the paper's tokenizer
    is DALL-E's pre-trained dVAE); at least one per image, at most all of them."""
    tokenizer_iterations: int = 10
    """Lloyd iterations of the codebook's k-means (this file's choice)."""
    tokenizer_norm_pix: bool = True
    """Normalise each patch by its own mean and variance before k-means and tokenisation, so that the codes
    describe local structure rather than brightness (this file's choice, as MAE's normalised pixels)."""
    tokenizer_seed: int = 0
    """Seed of the codebook's patch sample and k-means initialisation: the same codebook on every rank."""
    probe_layer: int = -4
    """Block whose output ``embed`` pools, counted from the end (-4: block 9 of ViT-B's 12; the official
    ``run_linear_eval.py`` probes every block; the paper's choice could not be verified here)."""
    color_jitter: float = 0.4
    """Brightness, contrast and saturation jitter (Sec. 2.5 and App.: "random resized cropping, horizontal
    flipping, color jittering"; 0.4 is the BEiT-derived official code's ``--color_jitter`` default, not
    verified for this paper's release, whose ``DataAugmentationForBEiT`` we read has no jitter)."""
    min_scale: float = 0.08
    """Smallest area fraction of the random resized crop (official ``RandomResizedCropAndInterpolationWithTwoPic``
    default scale (0.08, 1.0))."""
    optimizer: str = "adamw"
    """Adam with decoupled weight decay (App., pre-training hyperparameters; official ``--opt adamw``)."""
    base_lr: float = 1.5e-3 * 256 / 2048
    """The harness's rate per 256 images: 1.5e-3 at batch 2048 (App.; official README ``--lr 1.5e-3``, not
    scaled with the batch there), cosine decay."""
    weight_decay: float = 0.05
    """App.; official ``--weight_decay 0.05``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """The paper's Adam betas (App., as we recall it: beta_2 = 0.999; the official ``--opt_betas`` default
    is (0.9, 0.98) and the README command does not set it)."""
    warmup_epochs: int = 10
    """Linear warm-up (App.; official README ImageNet-1k command ``--warmup_epochs 10``)."""
    epochs: int = 800
    """ImageNet-1k pre-training (Sec. 2.5: about 500k steps, i.e. 800 epochs; README ``--epochs 800``)."""
    batch_size: int = 2048
    """Sec. 2.5 ("2k batch size"); README: 16 GPUs x ``--batch_size 128``."""


# Small-scale preset for CPU runs on the embedded digits (1,437 training images, 330 steps at batch 64,
# ``--backbone vit_tiny``: 32 px, 4 px patches, an 8x8 grid of 64 patches, 6 blocks):
# - vocab_size 512, tokenizer_patches 32768: 8192 codes would exceed the digits' distinct patches (the
#   images are 8x8 upscaled), and k-means over 33k patches takes seconds on the CPU;
# - min_block_patches 5: a block of 16 would be a quarter of the 64-patch grid; 5 of 64 is the paper's
#   share (16 of 196);
# - probe_layer -2: block 5 of 6, about the paper's depth fraction (block 9 of 12);
# - base_lr 1.5e-3, warm-up 2 epochs: 330 steps at the paper's rate (4.7e-5 at batch 64) hardly move the
#   encoder (as MAE's preset);
# - min_scale 0.4: 8% crops of an 8x8 digit upscaled to 32 px leave a blob (as the other small presets).
PRESETS = {"small": dict(vocab_size=512, tokenizer_patches=32768, min_block_patches=5, probe_layer=-2,
                         base_lr=1.5e-3, warmup_epochs=2, min_scale=0.4)}


# --- augmentations (Sec. 2.5; official datasets.py, DataAugmentationForBEiT) ---------------------------


def augmentations(cfg: Config, image_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[v2.Compose]:
    """One view: colour jitter, horizontal flip, random resized crop (scale 0.08-1), in the official order.
    The tokenizer reads this same crop (at the encoder's resolution); the mask is drawn inside ``forward``.
    One v2 pipeline; it takes a PIL image or a uint8 tensor."""
    j = cfg.color_jitter
    return [v2.Compose([
        v2.ToImage(),
        v2.ColorJitter(brightness=j, contrast=j, saturation=j),
        v2.RandomHorizontalFlip(),
        v2.RandomResizedCrop(image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])]


# --- patches and blockwise masks (Algorithm 1) ----------------------------------------------------------


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order of the grid (the order of a strided conv's
    flattened output), each patch's values ordered (row, column, channel)."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"images of {h}x{w} px do not split into {patch} px patches")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)  # (N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def blockwise_masking(n: int, h: int, w: int, ratio: float = 0.4, min_patches: float = 16, min_aspect: float = 0.3,
                      generator: torch.Generator | None = None, max_rounds: int = 10000) -> torch.Tensor:
    """Algorithm 1 for N images at once. Returns ``mask`` (N, h*w) bool, True where a patch is masked, in the
    row-major order of the h x w grid. Each image repeats, until more than ``ratio * h * w`` of its patches
    are masked: block area s = Rand(min_patches, ratio*h*w - |M|), aspect r log-uniform in [min_aspect,
    1/min_aspect], sides a = round(sqrt(s r)) rows and b = round(sqrt(s / r)) columns, top t uniform in
    {0..h-a} and left l in {0..w-b}; a block that does not fit in the grid is skipped; M <- M u block. Each
    round draws 4 uniforms per image, (4, N) in float64 on the CPU, for every image (finished ones ignore
    theirs): the k-th block of image i uses column i of round k. The same generator gives the same masks."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio {ratio}: must be in (0, 1)")
    goal = ratio * h * w  # stop once |M| > goal
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    active = torch.ones(n, dtype=torch.bool)  # (N,) images still adding blocks
    for _ in range(max_rounds):
        if not active.any():
            return mask.view(n, h * w)
        u = torch.rand(4, n, dtype=torch.float64, generator=generator)  # (4, N) one candidate per image
        count = mask.sum(dim=(1, 2)).double()  # (N,) |M|
        s = min_patches + (goal - count - min_patches) * u[0]  # Rand(16, 0.4N - |M|)
        r = torch.exp(log_lo + (log_hi - log_lo) * u[1])  # Rand(0.3, 1/0.3), log-uniform
        a = torch.round(torch.sqrt(s * r)).long()  # (N,) rows, half to even as Python's round
        b = torch.round(torch.sqrt(s / r)).long()  # (N,) columns
        fits = (a <= h) & (b <= w)
        t = (u[2] * (h - a + 1)).floor().long()  # Rand(0, h - a), an integer
        left = (u[3] * (w - b + 1)).floor().long()  # Rand(0, w - b)
        block = ((rows >= t.view(n, 1, 1)) & (rows < (t + a).view(n, 1, 1))
                 & (cols >= left.view(n, 1, 1)) & (cols < (left + b).view(n, 1, 1)))  # (N, h, w)
        mask |= block & (active & fits).view(n, 1, 1)  # M <- M u block
        active = mask.sum(dim=(1, 2)) <= goal  # until |M| > 0.4N
    raise RuntimeError(f"blockwise masking of a {h}x{w} grid did not reach {ratio:.0%} in {max_rounds} rounds")


# --- the tokenizer: a k-means codebook of patches (deepcluster.py's kmeans) -------------------------------


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """(..., P) -> (..., P): each patch minus its mean, over the square root of its unbiased variance + 1e-6."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


@torch.no_grad()
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N,) index of the nearest centroid (k, D) of each row of x (N, D) in squared l2 distance, in chunks
    of rows so that the (chunk, k) score matrix stays bounded."""
    c_sq = (centroids * centroids).sum(dim=1)  # (k,)
    out = [(2 * x[i : i + chunk] @ centroids.T - c_sq).argmax(dim=1) for i in range(0, len(x), chunk)]
    return torch.cat(out)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of x (N, D) into k clusters: (labels (N,), centroids (k, D)). Initial centroids are
    k distinct data points drawn with ``generator`` (faiss's initialisation). After each update, every
    empty cluster takes the centroid of a non-empty one picked with probability proportional to its size
    (faiss), and the two are pushed apart along a random direction by 1/1024 of the points' mean norm
    (Sec. 3.3: "a small random perturbation"), so that the next assignment divides that cluster."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} points into {k} clusters: k must be between 1 and the number of points")
    pick = torch.randperm(n, generator=generator)[:k].to(x.device)
    centroids = x[pick].clone()  # (k, D)
    scale = float(x.norm(dim=1).mean()) / 1024  # the split's perturbation: small beside the data's spread
    for _ in range(iterations):
        labels = nearest_centroid(x, centroids)
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
        full = counts > 0
        centroids[full] = sums[full] / counts[full, None].to(x.dtype)
        sizes = counts.double().cpu()
        for j in (~full).nonzero().flatten().tolist():  # a loop over empty clusters, rarely more than a few
            m = int(torch.multinomial(sizes / sizes.sum(), 1, generator=generator))
            delta = F.normalize(torch.randn(x.shape[1], generator=generator, dtype=torch.float64), dim=0) * scale
            delta = delta.to(x.device, x.dtype)
            centroids[j] = centroids[m] + delta
            centroids[m] = centroids[m] - delta
            sizes[j] = sizes[m] / 2  # each takes half of it for the next pick (faiss)
            sizes[m] -= sizes[j]
    return nearest_centroid(x, centroids), centroids


@torch.no_grad()
def visual_tokens(images: torch.Tensor, codebook: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """(N, C, H, W) unmasked images -> (N, L) token ids: each patch's nearest code in ``codebook`` (K, p*p*C),
    after ``normalize_patches`` when ``norm_pix``."""
    x = patchify(images, patch).float()  # (N, L, P)
    if norm_pix:
        x = normalize_patches(x)
    n, length, values = x.shape
    return nearest_centroid(x.reshape(n * length, values), codebook.float()).view(n, length)


# --- the encoder with mask tokens inside, and the loss --------------------------------------------------

VIT_PARTS = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm", "num_patches")


def patch_size(backbone: nn.Module) -> int:
    """The ViT's patch side, from its strided patch embedding; a one-line error for another backbone."""
    missing = [a for a in VIT_PARTS if getattr(backbone, a, None) is None]
    stride = getattr(getattr(backbone, "patch_embed", None), "stride", None)
    if missing or stride is None:
        raise ValueError(f"BEiT needs a ViT with patch tokens (--backbone vit_tiny); {type(backbone).__name__} "
                         f"has no {', '.join(missing or ['strided patch_embed'])}")
    return int(stride[0])


def masked_encoder(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                   mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the ViT on x (N, C, H, W) part by part. ``mask`` (N, L) bool replaces those patch embeddings by
    ``mask_token`` (1, D) before the position embeddings are added (official ``forward_features``). Returns
    the final tokens (N, 1 + L, D) after ``backbone.norm``, CLS first, and every block's output (N, 1 + L, D)."""
    t = backbone.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
    if t.shape[1] != backbone.pos_embed.shape[0]:
        raise ValueError(f"BEiT: images of {tuple(x.shape[-2:])} px give {t.shape[1]} patches; the ViT has "
                         f"position embeddings for {backbone.pos_embed.shape[0]}")
    if mask is not None:
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)  # (N, L, D) e_[M] at masked patches
    t = t + backbone.pos_embed.to(t.dtype)
    t = torch.cat([backbone.cls_token.expand(len(t), -1, -1).to(t.dtype), t], dim=1)  # (N, 1 + L, D)
    outputs = []
    for blk in backbone.blocks:
        t = blk(t)
        outputs.append(t)
    return backbone.norm(t), outputs


def beit_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MIM cross-entropy (Sec. 2.3): the mean over masked patches of -log p_MIM(z_i | x^M). logits (|M|, K):
    the head's scores at the masked positions, in the row-major order of ``mask`` (as ``h[mask]``); tokens
    (N, L) the visual tokens of the unmasked image; mask (N, L) bool, True where masked."""
    return F.cross_entropy(logits.float(), tokens[mask])  # mean over the batch's masked patches


# --- model ------------------------------------------------------------------------------------------


class BEiT(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.patch = patch_size(backbone)
        self.backbone = backbone
        values = self.patch**2 * backbone.patch_embed.in_channels
        self.mask_token = nn.Parameter(torch.zeros(1, feature_dim))  # e_[M]
        self.lm_head = nn.Linear(feature_dim, cfg.vocab_size)  # W_c, b_c
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # official trunc_normal_(std=0.02)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.register_buffer("codebook", torch.zeros(cfg.vocab_size, values))  # (K, p*p*C), the frozen tokenizer
        self.register_buffer("codebook_ready", torch.zeros((), dtype=torch.bool))
        self.num_samples: int | None = None
        depth = len(backbone.blocks)
        if not -depth <= cfg.probe_layer < depth:
            raise ValueError(f"BEiT: probe_layer {cfg.probe_layer} is not a block of a {depth}-block ViT")

    def setup(self, num_samples: int, num_classes: int) -> None:
        self.num_samples = num_samples  # sizes the codebook's patch sample per image

    @torch.no_grad()
    def fit_tokenizer(self, patches: torch.Tensor) -> None:
        """Fit the codebook on pixel patches (M, p*p*C) by k-means (seeded by ``tokenizer_seed``)."""
        x = patches.to(self.codebook.device, torch.float32)
        if self.cfg.tokenizer_norm_pix:
            x = normalize_patches(x)
        g = torch.Generator().manual_seed(self.cfg.tokenizer_seed)
        _, centroids = kmeans(x, self.cfg.vocab_size, self.cfg.tokenizer_iterations, g)
        self.codebook.copy_(centroids)
        self.codebook_ready.fill_(True)

    def on_epoch_start(self, epoch: int, total_epochs: int, features) -> None:
        """Before the first epoch: sample patches of every training image (evaluation transform) and fit the
        codebook; afterwards (and after a resume) the codebook stays as it is."""
        if bool(self.codebook_ready):
            return
        length = self.backbone.num_patches
        per_image = length if self.num_samples is None else min(length, max(1, -(-self.cfg.tokenizer_patches // self.num_samples)))
        g = torch.Generator().manual_seed(self.cfg.tokenizer_seed)  # images arrive in index order: a fixed sample

        def encode(images: torch.Tensor) -> torch.Tensor:
            p = patchify(images, self.patch)  # (n, L, P)
            pick = torch.rand(len(p), length, generator=g).argsort(dim=1)[:, :per_image].to(p.device)  # (n, m)
            return p.gather(1, pick.unsqueeze(-1).expand(-1, -1, p.shape[-1])).flatten(1)  # (n, m*P)

        self.fit_tokenizer(features(encode).view(-1, self.codebook.shape[1]))

    def forward(self, batch: dict) -> dict:
        if not bool(self.codebook_ready):
            raise RuntimeError("BEiT: the visual tokenizer has no codebook yet; on_epoch_start (the harness calls it) "
                               "or fit_tokenizer builds it")
        x = batch["views"][0]  # (N, C, H, W)
        n, _, height, width = x.shape
        grid_h, grid_w = height // self.patch, width // self.patch
        cfg = self.cfg
        mask = blockwise_masking(n, grid_h, grid_w, cfg.mask_ratio, cfg.min_block_patches, cfg.min_aspect)
        mask = mask.to(x.device)  # (N, L)
        tokens = visual_tokens(x, self.codebook, self.patch, cfg.tokenizer_norm_pix)  # (N, L) of the unmasked image
        h, _ = masked_encoder(self.backbone, x, mask, self.mask_token)  # (N, 1 + L, D)
        logits = self.lm_head(h[:, 1:][mask])  # (|M|, K) masked positions only
        loss = beit_loss(logits, tokens, mask)
        accuracy = (logits.detach().argmax(dim=1) == tokens[mask]).float().mean()
        return {"loss": loss, "token_accuracy": accuracy, "masked_fraction": mask.float().mean()}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The official linear probe's features: block ``probe_layer``'s CLS token and mean patch token, (N, 2D)."""
        _, outputs = masked_encoder(self.backbone, x)
        t = outputs[self.cfg.probe_layer]  # (N, 1 + L, D)
        return torch.cat([t[:, 0], t[:, 1:].mean(dim=1)], dim=1)


MODEL = BEiT


if __name__ == "__main__":
    m = blockwise_masking(2, 14, 14, generator=torch.Generator().manual_seed(0))
    print("masked per image:", m.sum(1).tolist(), "of 196")
    print(m[0].view(14, 14).int())
