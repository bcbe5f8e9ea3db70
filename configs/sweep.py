"""The sweep on the bundled model: every method x stage x budget x testbed family.

  python -m experiments.sweep                                    # default (see below)
  python -m experiments.sweep --config configs/sweep.py:full     # every family and stage
  python -m experiments.sweep --config configs/sweep.py:modalities  # image, video, audio
  python -m experiments.sweep --config.per_family=64 --config.methods=pool,fastv
  python -m experiments.sweep --config configs/sweep.py:adaptive   # adaptive vs fixed budgets

Fields:
  methods, stages: "all" or comma-separated names (`tcjax.compress.METHODS` plus the decoder
    schedules "pyramiddrop" / "sparsevlm"; stages vit, post_vit, post_proj, llm); a method runs
    at every chosen stage where it applies; stages "primary": each method once, at the first of
    post_vit, post_proj, llm, vit where it applies. Unknown names are refused.
  budgets: image tokens per example reaching the decoder (at the llm stage: kept from decoder
    layer llm_layer on); the uncompressed model ("full") always runs too.
  families, per_family, split, seed: the testbed examples (`tcjax.data.testbed.example`).
  vit_layer: ViT layer after which vit-stage selections act (ToMe merges from it on);
    signal_layer: ViT layer whose attention / keys every post-ViT method reads (default unset:
    each method's own, -2 as VisionZip / FasterVLM, -1 for PruMerge); llm_layer: decoder layer
    K of the llm stage.
  options: a Python literal {method: {option: value}} added to that method's plan entries,
    e.g. '{"fastv": {"query": "mean"}}'.
  adaptive: a Python literal {policy: {option: values}} of adaptive budgets
    (`tcjax.compress.adaptive`), one more setting per value at each of adaptive_stages where
    the policy acts, with adaptive_capacity as its budget (the most tokens it may keep), e.g.
    '{"adaptive_mass": {"mass": (0.2, 0.4)}}'; "{}" runs none. Their rows report the tokens
    each example kept, and the report sets them beside `topk` (the same scores at a fixed
    budget) at equal mean tokens per family: run topk at the same stages, with budgets around
    the tokens the policies keep (as `:adaptive` does).
  batch_size, max_len (prompt tokens), max_new_tokens: decoding.
  workers: settings run at once in threads (their compilation overlaps; 1 = one at a time).
  latency: also measure each setting's prefill latency, per-token decode latency (medians of
    latency_reps calls after a warm-up call, on one batch per input shape, one setting at a
    time outside the accuracy loop) and peak memory (`compiled.memory_analysis()`); off in
    :tiny (tests), on otherwise.
  mesh, axis_types: the device mesh (batch on "data"; -1 = every device).
  pictures: images per image family on which every vit / post_vit / post_proj setting's
    retained patches are drawn (retained_<budget>.png; 0: none).
  checkpoint: a big_vision `.npz` of the bundled model's architecture whose parameters replace
    the bundled ones (a fine-tuned copy: M3, compression-aware fine-tuning); "" none.
  learned: comma-separated files of trained compressors (a learned run's `compressors.npz`,
    `tcjax.nn.learned.save_trained`); each compressor is one more setting, at its stage and
    budget with the options it was trained with. "" none.
  out: directory for sweep.json, sweep.md and the plots; progress: show the progress bar.

Time: the default is sized for about 5 minutes on a 2-core CPU (experiments/RESULTS.md has the
measured time): the five image families at 200 examples each. The clip families cost far more
per example (a `video` clip is 2048 ViT tokens, an `audio` spectrogram 1024, against 256 for an
image; on this CPU the clips alone took over 10 minutes at 200 each), so they run in `:full` and
`:modalities`. The cost is mostly compilation (each setting's compression once per input shape),
then ~N examples x settings decoder passes.
"""

import ml_collections

IMAGE_FAMILIES = ("count", "binding", "digit", "number", "locate")
FAMILIES = IMAGE_FAMILIES + ("video", "audio")


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  # Default: every method once (its primary stage), three budgets, the image families; `full`:
  # every family, every method at every stage where it applies, budget 128 too.
  c.methods = "all"
  c.stages = "primary"
  c.budgets = (64, 32, 16)
  c.families = IMAGE_FAMILIES
  c.per_family = 200
  c.split = "test"
  c.seed = 0
  c.vit_layer = 1
  c.signal_layer = ml_collections.config_dict.placeholder(int)
  c.llm_layer = 1
  # MustDrop's official 3 x 3 merge windows do not divide PaliGemma's 16 x 16 grid; 2 x 2 gives
  # the official number of windows (8 x 8, as 3 x 3 on CLIP's 24 x 24).
  c.options = '{"mustdrop_merge": {"window": 2}}'
  c.adaptive = "{}"
  c.adaptive_stages = "post_vit,llm"
  c.adaptive_capacity = 64
  c.batch_size = 64
  c.max_len = 16
  c.max_new_tokens = 10
  c.workers = 2
  c.latency = True
  c.latency_reps = 3
  c.pictures = 1
  c.mesh = (("data", -1),)
  c.axis_types = "auto"
  c.checkpoint = ""
  c.learned = ""
  c.out = "experiments/out/sweep"
  c.progress = True
  if arg == "full":
    c.families = FAMILIES
    c.stages = "all"
    c.budgets = (128, 64, 32, 16)
  elif arg == "modalities":
    # The same methods on images, clips and spectrograms side by side (the survey's third open
    # question): every family, each method at its primary stage, two budgets, 64 examples each.
    c.families = FAMILIES
    c.budgets = (64, 16)
    c.per_family = 64
    c.latency = False
    c.out = "experiments/out/sweep_modalities"
  elif arg == "adaptive":
    # Adaptive budgets against fixed ones: the two policies after the ViT and in the decoder,
    # capacity 64, thresholds giving ~4-64 tokens on the bundled model; their fixed twin topk at
    # the same stages on a dense grid of budgets (the equal-tokens comparison interpolates
    # between neighbouring budgets). The image families only (one input shape, so every
    # setting compiles once), 48 examples each.
    c.methods = "topk"
    c.stages = "post_vit,llm"
    c.budgets = (64, 48, 32, 24, 16, 12, 8, 4)
    c.families = ("count", "binding", "digit", "number", "locate")
    c.per_family = 48
    c.adaptive = ('{"adaptive_mass": {"mass": (0.1, 0.2, 0.3, 0.4)}, '
                  '"adaptive_entropy": {"scale": (0.05, 0.1, 0.2)}}')
    c.out = "experiments/out/sweep_adaptive"
  elif arg == "tiny":  # tests: two methods, two budgets, two image families, 4 examples each
    c.methods = "pool,random"
    c.stages = "post_vit"
    c.budgets = (64, 16)
    c.families = ("count", "locate")
    c.per_family = 4
    c.batch_size = 8
    c.progress = False
    c.latency = False
  elif arg:
    raise ValueError(f"configs/sweep.py takes '', 'full', 'modalities', 'adaptive' or 'tiny', "
                     f"got {arg!r}")
  return c
