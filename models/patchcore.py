"""PatchCore: a memory bank of locally aware patch features, subsampled by a greedy coreset.

Roth, Pemula, Zepeda, Schoelkopf, Brox, Gehler. "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv 2106.08265).

No network is trained. One pass over the normal training images fills a memory
bank with locally aware patch features of a frozen ImageNet backbone (mid-level
feature maps, each averaged over a 3 x 3 neighbourhood, brought to one grid and
reduced in channels), subsampled by greedy k-center coreset selection after a
random projection. A test patch is as anomalous as it is far from its nearest
neighbour in that bank: the patch distances, upsampled and Gaussian-smoothed
(sigma 4), are the anomaly map; the largest one, reweighted by how isolated its
nearest bank feature is among its neighbours, is the image score.

Readings, open choices and ablations: docs/methods/patchcore.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .losses import gaussian_blur
from .patch_features import locally_aware_patches
from .registry import register_model

#: ``coreset_method`` values: exact greedy k-center (the paper's), or greedy within random partitions.
CORESET_METHODS = ("greedy", "partitioned")
#: ``collection_dtype`` values: how the training patches wait for the coreset (float16 halves that memory).
COLLECTION_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: Distance-matrix entries computed at once in the nearest-neighbour search (~64 MiB).
_NN_CHUNK_ELEMENTS = 1 << 24
#: Bytes of augmented points the partitioned coreset holds at once: its parts go through the
#: selection in groups of this size (each group projects the stored features again, ~1 s per
#: million patches), so that the fit's memory is the stored features plus a constant.
_PARTS_GROUP_BYTES = 128 << 20


def random_projection(dim_in: int, dim_out: int, seed: int, device: torch.device) -> Tensor:
    """A (dim_in, dim_out) Johnson-Lindenstrauss projection: Gaussian entries / sqrt(dim_out)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim_in, dim_out, generator=generator) / math.sqrt(dim_out)
    return matrix.to(device)


@torch.no_grad()
def greedy_coreset(
    features: Tensor | list[Tensor],
    size: int,
    seed: int = 0,
    cpu_threads: int | None = 1,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Indices (``size``,) of a greedy k-center coreset of ``features`` (N, D), in selection order.

    Exact greedy farthest-point selection: every step adds the point farthest from the
    selected set and lowers every point's squared distance to the set. A step is one
    vector-matrix product over all points (``||x||^2 - 2 x.c + ||c||^2`` folded into
    augmented coordinates), one in-place minimum and one argmax. The points are stored
    transposed, (D + 2, N): the product then streams the matrix once in memory order,
    which is what bounds a step on a CPU. The chosen index stays on the device (no
    host synchronisation per step on a GPU).

    ``features`` may be a list of row blocks (N is their total), read in order and kept;
    ``transform`` (e.g. a random projection) maps each block to the coordinates compared,
    one block at a time, so that no transformed copy of the whole set is ever held.

    On a CPU the loop runs on ``cpu_threads`` threads (``None``: torch's setting). A
    step is memory-bound and short (~5 ms for 190k x 130 floats): on the shared 2-core
    machine two threads made no product faster and made every step ~3x slower, as
    each small parallel region waited for a core busy with other work.
    """
    blocks = features if isinstance(features, list) else [features]
    n = sum(block.shape[0] for block in blocks)
    if not 0 < size <= n:
        raise ValueError(f"coreset size must be in [1, {n}], got {size}")
    start = torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed))
    points_t = _augmented_parts(blocks, torch.zeros(n, dtype=torch.long), torch.arange(n), 1, n, transform)
    picks = _batched_farthest_points(points_t, torch.tensor([size]), start[None], cpu_threads)
    return picks[0]


@torch.no_grad()
def partitioned_coreset(
    features: Tensor | list[Tensor],
    size: int,
    partition_size: int = 50_000,
    seed: int = 0,
    cpu_threads: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Indices (``size``,) of an approximate greedy coreset: exact greedy within random partitions.

    The bank is shuffled (seeded) into ``P = ceil(N / partition_size)`` near-equal parts
    and each part gets its share of ``size`` (largest remainder), picked by exact greedy
    farthest-point selection within the part; the union is the coreset. This is the
    first round of the composable k-center coresets of distributed clustering (each part's
    greedy set is a 2-approximation for that part). It costs ``size * N / P`` distance
    evaluations instead of ``size * N``, i.e. ``P`` times less, and all parts advance
    together: a step is one batched product over the parts, which torch spreads over every
    core (``cpu_threads``: None = torch's setting). Its covering radius is larger than the
    exact one's; ``benchmark/experiments/bench_patchcore.py`` measures what that costs in metrics.
    Indices are returned part by part, each part in its selection order. ``features`` and
    ``transform``: as in ``greedy_coreset``. The parts are selected in groups of at most
    :data:`_PARTS_GROUP_BYTES` of working points (the same picks as all at once), so that the
    memory does not grow with the bank beyond the stored features.
    """
    blocks = features if isinstance(features, list) else [features]
    n = sum(block.shape[0] for block in blocks)
    if not 0 < size <= n:
        raise ValueError(f"coreset size must be in [1, {n}], got {size}")
    if partition_size < 1:
        raise ValueError(f"partition_size must be positive, got {partition_size}")
    parts = math.ceil(n / partition_size)
    if parts == 1:
        return greedy_coreset(blocks, size, seed, cpu_threads, transform)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    lengths = torch.full((parts,), n // parts)
    lengths[: n % parts] += 1
    # Each part's share of the picks, by largest remainder, so that the shares add up to `size`.
    exact = lengths.double() * size / n
    shares = exact.floor().long()
    shares[torch.argsort(exact - shares, descending=True)[: size - int(shares.sum())]] += 1
    shares = torch.minimum(torch.maximum(shares, torch.ones_like(shares)), lengths)
    longest = int(lengths.max())
    padded = order.new_full((parts, longest), -1)  # -1: padding, never picked
    for p, chunk in enumerate(order.split(lengths.tolist())):
        padded[p, : chunk.numel()] = chunk
    starts = torch.stack([torch.randint(int(length), (1,), generator=generator) for length in lengths])
    # Where each patch goes: part p, column j, for the patch at position offsets[p] + j of the shuffle.
    position = torch.empty_like(order)
    position[order] = torch.arange(n)
    offsets = lengths.cumsum(0) - lengths
    part = torch.searchsorted(lengths.cumsum(0), position, right=True)
    column = position - offsets[part]
    width = _transformed(blocks[0][:1], transform).shape[1] + 2
    group = max(1, _PARTS_GROUP_BYTES // (width * longest * 4))
    picks = []
    for first in range(0, parts, group):
        last = min(parts, first + group)
        points_t = _augmented_parts(blocks, part - first, column, last - first, longest, transform)
        valid = padded[first:last] >= 0
        local = _batched_farthest_points(points_t, shares[first:last], starts[first:last], cpu_threads, valid)
        del points_t
        local = local.cpu()
        picks += [padded[first + p, local[p, : int(k)]] for p, k in enumerate(shares[first:last])]
    return torch.cat(picks).to(blocks[0].device)


def _transformed(block: Tensor, transform: Callable[[Tensor], Tensor] | None) -> Tensor:
    with torch.autocast(device_type=block.device.type, enabled=False):
        return (transform(block) if transform is not None else block).float()


def _augmented_parts(
    blocks: list[Tensor],
    part: Tensor,
    column: Tensor,
    parts: int,
    columns: int,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(parts, D + 2, columns) float32: the blocks' row r, transformed, as ``[x, ||x||^2, 1]`` at
    (``part[r]``, :, ``column[r]``); rows whose ``part`` is outside ``[0, parts)`` are left out.

    The augmented coordinates make a squared distance one dot product (``_batched_farthest_points``).
    Columns no row fills stay zero. One block is transformed at a time.
    """
    device = blocks[0].device
    d = _transformed(blocks[0][:1], transform).shape[1]
    with torch.autocast(device_type=device.type, enabled=False):
        points_t = torch.zeros(parts, d + 2, columns, device=device)
        row = 0
        for block in blocks:
            p, c = part[row : row + len(block)].to(device), column[row : row + len(block)].to(device)
            row += len(block)
            kept = (p >= 0) & (p < parts)
            if not bool(kept.any()):
                continue
            x = _transformed(block[kept] if not bool(kept.all()) else block, transform)
            p, c = p[kept], c[kept]
            points_t[p, :d, c] = x
            points_t[p, d, c] = x.pow(2).sum(dim=1)
            points_t[p, d + 1, c] = 1.0
            del x
    return points_t


def _batched_farthest_points(
    points_t: Tensor, sizes: Tensor, starts: Tensor, cpu_threads: int | None, valid: Tensor | None = None
) -> Tensor:
    """Greedy farthest-point selection in each of ``B`` point sets at once.

    ``points_t`` (B, D + 2, N): each set's points in augmented coordinates ``x' = [x, ||x||^2, 1]``
    (``_augmented_parts``); with ``c' = [-2c, 1, ||c||^2]``, ``x'.c' = ||x - c||^2``, so a step's
    distances are a single (batched) product. ``c'`` is made from the picked column at each
    step, so no second (B, D + 2, N) matrix is held. ``sizes`` (B,) picks per set; ``starts``
    (B, 1) first picks; ``valid`` (B, N) marks real points (padding is never picked). Returns
    (B, max(sizes)) indices into each set (entries past a set's size are to be ignored).
    """
    b, d2, n = points_t.shape
    d = d2 - 2
    device = points_t.device
    steps = int(sizes.max())
    with torch.autocast(device_type=device.type, enabled=False):
        index = starts.to(device).view(b, 1)
        selected = torch.empty(b, steps, dtype=torch.long, device=device)
        min_sq_dist = torch.full((b, 1, n), math.inf, device=device)
        if valid is not None:
            min_sq_dist[~valid.to(device)[:, None, :]] = -math.inf
        gather = torch.arange(b, device=device)
        threads = torch.get_num_threads()
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        try:
            # A large bank takes minutes: a bar with the ETA (updated at most every 2 s, no per-step cost).
            bar = tqdm(range(steps), desc="PatchCore coreset", unit="pick", mininterval=2.0, leave=False,
                       disable=steps < 1000)
            for step in bar:
                selected[:, step] = index[:, 0]
                picked = points_t[gather, :, index[:, 0]]  # (B, D + 2): [c, ||c||^2, 1]
                center = torch.cat([picked[:, :d] * -2.0, picked[:, d + 1 :], picked[:, d : d + 1]], dim=1)
                torch.minimum(min_sq_dist, torch.bmm(center[:, None, :], points_t), out=min_sq_dist)
                index = min_sq_dist[:, 0].argmax(dim=1, keepdim=True)
        finally:
            torch.set_num_threads(threads)
    return selected


def take_rows(blocks: Sequence[Tensor], indices: Tensor) -> Tensor:
    """Rows ``indices`` of the blocks' concatenation (in that order), without concatenating the blocks."""
    lengths = torch.tensor([block.shape[0] for block in blocks])
    ends = lengths.cumsum(0)
    indices = indices.cpu()
    owner = torch.searchsorted(ends, indices, right=True)
    if len(indices) and int(owner.max()) >= len(blocks):
        raise IndexError(f"row index {int(indices.max())} out of range for {int(ends[-1])} rows")
    rows = blocks[0].new_empty(len(indices), *blocks[0].shape[1:])
    for i in owner.unique().tolist():
        mine = (owner == i).nonzero().squeeze(1)
        rows[mine.to(rows.device)] = blocks[i][(indices[mine] - (ends[i] - lengths[i])).to(rows.device)]
    return rows


@torch.no_grad()
def nearest_neighbors(queries: Tensor, bank: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Exact L2 distances (Q, k) and indices (Q, k) of the ``k`` nearest ``bank`` rows of each query.

    Chunked matrix products (``||q||^2 - 2 q.m + ||m||^2``) in float32 with autocast
    off, so the memory stays bounded and bf16-mixed runs score exactly.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        bank_sq = bank.pow(2).sum(dim=1)
        rows = max(1, _NN_CHUNK_ELEMENTS // max(1, bank.shape[0]))
        distances, indices = [], []
        # One (rows, N) buffer for every chunk, filled in place: a fresh ~64 MiB block per chunk
        # (two, with the broadcast sum) is what made a CPU validation's RSS grow to 6 GB with
        # ~1 GB live (memray), as glibc kept the freed blocks (results/patchcore_scale.md).
        buffer = queries.new_empty(min(rows, queries.shape[0]), bank.shape[0])
        for chunk in queries.split(rows):
            sq = buffer[: chunk.shape[0]]
            torch.add(chunk.pow(2).sum(dim=1, keepdim=True), bank_sq, out=sq)
            sq.addmm_(chunk, bank.t(), alpha=-2.0)
            values, index = sq.topk(k, dim=1, largest=False)
            distances.append(values.clamp_(min=0.0).sqrt_())
            indices.append(index)
    return torch.cat(distances), torch.cat(indices)


@register_model("patchcore")
class PatchCore(AnomalyModule):
    # PatchCore-10 % (our default coreset ratio), WRN50, the paper's 15-category means (per category:
    # benchmark/reports/published/mvtec_ad.csv). 99.2 / 94.4 were the official repository's re-run figures.
    paper_results = {"image_auroc": 0.990, "pixel_auroc": 0.981, "pro": 0.935}
    drop_incomplete_batches = False  # every training image belongs in the memory bank

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        coreset_ratio: float = 0.1,
        coreset_method: str = "greedy",
        coreset_partition_size: int = 50_000,
        collection_dtype: str = "float16",
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        reweight: bool = True,
        sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if coreset_method not in CORESET_METHODS:
            raise ValueError(f"coreset_method must be one of {sorted(CORESET_METHODS)}, got {coreset_method!r}")
        if collection_dtype not in COLLECTION_DTYPES:
            raise ValueError(f"collection_dtype must be one of {sorted(COLLECTION_DTYPES)}, got {collection_dtype!r}")
        if reweight and num_neighbors < 2:
            raise ValueError(f"reweighting needs num_neighbors >= 2, got {num_neighbors}")
        if min(pretrain_embed_dimension, target_embed_dimension) < 1:
            raise ValueError("embedding dimensions must be positive")
        self.save_hyperparameters()
        self.automatic_optimization = False  # nothing is trained
        self.backbone = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        # A buffer, so that the bank travels with the checkpoint and with .to(device).
        self.register_buffer("memory_bank", torch.empty(0, target_embed_dimension))
        # A parameter with no elements that takes part in no computation. DDP refuses to
        # wrap a module without a trainable parameter, and Lightning counts training steps
        # (ModelCheckpoint saves nothing at step 0, max_steps bounds a run) by optimiser
        # steps: a no-op optimiser over this parameter steps once per batch.
        self._step_anchor = nn.Parameter(torch.empty(0))
        self._collected: list[Tensor] = []  # the epoch's patch features, one block per batch
        self._projection: Tensor | None = None
        self._bank_is_current = True  # no features collected since the bank was built
        self.coreset_seconds = math.nan

    # ------------------------------------------------------------------ features

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Locally aware patch features (B, h * w, target_dim) at the first layer's grid (h, w)."""
        hp = self.hparams
        with torch.no_grad():
            backbone_maps = self.backbone(images)  # under autocast when training mixed-precision
            return locally_aware_patches(backbone_maps, hp.pretrain_embed_dimension, hp.target_embed_dimension)

    # ------------------------------------------------------------------ memory bank

    def project(self, features: Tensor) -> Tensor:
        """What the coreset compares: ``features`` (N, D) in float32, randomly projected to
        ``projection_dim`` dimensions when D is larger (the same matrix for every block)."""
        hp = self.hparams
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if not hp.projection_dim or features.shape[1] <= hp.projection_dim:
                return features
            if self._projection is None or self._projection.device != features.device:
                self._projection = random_projection(features.shape[1], hp.projection_dim, hp.seed, features.device)
            return features @ self._projection

    def build_memory_bank(self, features: Tensor | list[Tensor]) -> None:
        """The greedy-coreset subsample of ``features`` (N, target_dim) becomes the memory bank (float32).

        ``features`` may be a list of row blocks (the training batches, never concatenated:
        never held twice). The selection compares their ``project``ions, made one block at a
        time from the stored features (in ``collection_dtype``), so that no projected copy of
        the bank is held beside it.
        """
        hp = self.hparams
        blocks = features if isinstance(features, list) else [features]
        n = sum(block.shape[0] for block in blocks)
        size = max(1, int(round(hp.coreset_ratio * n)))
        start = time.perf_counter()
        if size < n:
            if hp.coreset_method == "partitioned":
                selected = partitioned_coreset(blocks, size, hp.coreset_partition_size, hp.seed, transform=self.project)
            else:
                selected = greedy_coreset(blocks, size, hp.seed, transform=self.project)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(selected, src=0)  # identical banks on every process, by construction
            bank = take_rows(blocks, selected)
        else:
            bank = torch.cat(blocks)
        if not torch.isfinite(bank).all():
            raise ValueError(
                f"PatchCore: the memory bank has non-finite features (collection_dtype={hp.collection_dtype}; "
                "float16 overflows above 65504: set model.init_args.collection_dtype=float32)"
            )
        self.coreset_seconds = time.perf_counter() - start
        self.memory_bank = bank.float().contiguous()
        rank_zero_info(
            f"PatchCore: memory bank of {n} patches -> {hp.coreset_method} coreset of "
            f"{bank.shape[0]} ({hp.coreset_ratio:.1%}) in {self.coreset_seconds:.1f} s"
        )

    def _finish_memory_bank(self) -> None:
        """Build the bank from this epoch's features if any arrived since the last build."""
        if self._bank_is_current or not self._collected:
            return
        self.build_memory_bank(_gather_blocks(self._collected))
        self._bank_is_current = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The bank's shape depends on the data: take the checkpoint's before the copy.
        saved = state_dict.get(prefix + "memory_bank")
        if saved is not None:
            self.memory_bank = torch.empty_like(saved, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ scoring

    def forward(self, images: Tensor) -> AnomalyOutput:
        if self.memory_bank.shape[0] == 0:
            if self._trainer is not None and self.trainer.sanity_checking:
                zeros = images.new_zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.float32)
                return AnomalyOutput(zeros, zeros.new_zeros(images.shape[0]))
            raise RuntimeError("PatchCore has no memory bank: fit it (one epoch) or load a checkpoint")
        features, (h, w) = self.embed(images)
        batch = features.shape[0]
        distances, indices = nearest_neighbors(features.flatten(0, 1), self.memory_bank)
        patch_scores = distances.view(batch, h * w)
        nn_index = indices.view(batch, h * w)

        anomaly_map = F.interpolate(
            patch_scores.view(batch, 1, h, w), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        anomaly_map = gaussian_blur(anomaly_map, self.hparams.sigma)

        worst = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1): the most anomalous patch
        image_score = patch_scores.gather(1, worst).squeeze(1)  # s*
        if self.hparams.reweight:
            m_test = features.gather(1, worst[..., None].expand(-1, -1, features.shape[-1])).squeeze(1)
            m_star = nn_index.gather(1, worst).squeeze(1)
            image_score = image_score * self._reweighting(m_test, m_star, image_score)
        return AnomalyOutput(anomaly_map, image_score)

    def _reweighting(self, test_features: Tensor, nearest: Tensor, scores: Tensor) -> Tensor:
        """The paper's weight ``1 - softmax(distances to N_b(m*))[m*]`` for each image (B,)."""
        with torch.autocast(device_type=test_features.device.type, enabled=False):
            bank = self.memory_bank.float()
            m_star = bank[nearest]  # (B, D)
            # N_b(m*) = m* and its b - 1 nearest other coreset features (m* itself excluded
            # by index, not by a distance of 0 that rounding may not give exactly).
            sq = torch.addmm(m_star.pow(2).sum(1, keepdim=True) + bank.pow(2).sum(1), m_star, bank.t(), alpha=-2.0)
            sq.scatter_(1, nearest[:, None], math.inf)
            others = sq.topk(min(self.hparams.num_neighbors, bank.shape[0]) - 1, dim=1, largest=False).indices
            to_others = (test_features.float()[:, None, :] - bank[others]).norm(dim=-1)  # (B, b - 1)
            logits = torch.cat([scores.float()[:, None], to_others], dim=1)  # s* = ||m_test* - m*|| first
            return 1.0 - torch.softmax(logits, dim=1)[:, 0]

    # ------------------------------------------------------------------ training = collection
    # One epoch of collection; the coreset is built once the epoch's features are complete:
    # before its validation (so the metrics and the selected checkpoint see it), or at the
    # epoch's end without validation; under DDP from every process's features.

    def on_train_epoch_start(self) -> None:
        self._collected = []  # the bank is built from one pass (the latest epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        features = self.embed(batch["image"])[0].flatten(0, 1)
        self._collected.append(features.to(COLLECTION_DTYPES[self.hparams.collection_dtype]))
        self._bank_is_current = False
        self.optimizers().step()  # no-op (see _step_anchor): counts the step
        return None

    def on_train_epoch_end(self) -> None:
        self._finish_memory_bank()
        self._collected = []  # free the full bank; the coreset is what is kept

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_memory_bank()
            if self.trainer.is_last_batch:  # the epoch's collection is complete and in the bank: free it
                self._collected = []  # before the validation pass, not after (0.47 GB at 1,000 images)

    def on_test_epoch_start(self) -> None:
        self._finish_memory_bank()

    def on_predict_epoch_start(self) -> None:
        self._finish_memory_bank()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Nothing learns: lr 0 over an empty parameter; it exists to count steps.
        return torch.optim.SGD([self._step_anchor], lr=0.0)


def _gather_blocks(blocks: list[Tensor]) -> list[Tensor]:
    """``blocks`` alone (the same list); under DDP every process's rows in rank order, as one block."""
    if not blocks or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return blocks
    return [_gather_rows(torch.cat(blocks))]


def _gather_rows(rows: Tensor) -> Tensor:
    """Concatenate (N_r, D) from every DDP process (N_r may differ), in rank order; identity alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = rows.new_zeros(largest, rows.shape[1])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])
