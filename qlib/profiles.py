"""The two run profiles, in one place.

``quick`` runs the whole book on two CPU cores inside the CI budget; ``paper`` uses the
papers' settings and is meant for a GPU. Chapters read their numbers from here and say
in their text which ones they used::

    p = profiles.get("quick")
    qmodel = quant.quantize(model, calib, w_bits=4, **p.quant.kwargs(seed=1))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Train:
    """Training of the float models (SGD, Nesterov momentum, one-cycle learning rate)."""
    epochs: int = 3                 # passes over the 60k training images
    batch_size: int = 128
    lr: float = 0.1                 # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False           # random flips and ±2-pixel shifts
    seed: int = 0                   # initialisation, batch order and augmentation
    # a fixed random subset of the training images (seed 0; None: all 55,000): only a
    # scaled profile (:func:`scaled`) uses it, to prove a code path in seconds
    train_images: int | None = None

    def as_dict(self) -> dict:
        """The training settings (also the float models' cache key); ``train_images`` only
        when set, so the keys of the profiles that train on every image stay as they were."""
        d = dataclasses.asdict(self)
        if d["train_images"] is None:
            del d["train_images"]
        return d


@dataclass(frozen=True)
class Quant:
    """Post-training quantization: what every chapter's quantize() calls share."""
    calib_images: int = 1024        # drawn once from the training split, seed 0
    iters: int = 2000               # Adam steps per reconstructed unit
    batch_size: int = 64
    lr: float = 4e-4                # the paper's Adam lr: the default where nothing is tuned
    act_lr: float = 4e-5            # Adam's lr for activation step sizes, the same for every method
    seeds: tuple[int, ...] = (0, 1, 2)          # quantization seeds (α draw, mini-batches)
    # Fair comparisons (experiments.select): each learned method's lr is the best of this
    # log grid (half-decade steps) on the validation split, per model, at W{tune_w_bits}A32.
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    tune_w_bits: int = 2            # the hardest weight-only setting: where the lr matters most
    tune_seeds: tuple[int, ...] = (0,)          # seeds averaged per grid point
    # chapter 3's Tables 1 and 2: the paper's rows
    table1_w_bits: tuple[int, ...] = (6, 5, 4, 3, 2)
    table2_settings: tuple[tuple[int, int], ...] = ((6, 6), (5, 5), (4, 4), (3, 4))
    tau_grid: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))  # chapter 3
    tau_seeds: tuple[int, ...] = (0, 1, 2)      # seeds per τ in the sweep

    def kwargs(self, **overrides) -> dict:
        """quantize()'s keyword arguments for this profile: iters, batch_size, lr, act_lr
        and the first seed, then ``overrides`` (e.g. ``seed=1``, ``lr=1e-2``)."""
        return {"iters": self.iters, "batch_size": self.batch_size, "lr": self.lr,
                "act_lr": self.act_lr, "seed": self.seeds[0], **overrides}


@dataclass(frozen=True)
class Predictor:
    """Chapter 5: the population of quantized models and the accuracy predictor."""
    configs: int = 1000             # sampled configurations per architecture (plus the
                                    # one-layer-at-2-bits sensitivity configs)
    learned_share: float = 0.15     # share calibrated with Attention Round or AdaRound
    # read from the record shipped in populations/<profile>/ (qlib.record) instead of labelled
    # live: labelling 3,000 configurations takes hours on two cores
    shipped: bool = False
    probe_images: int = 256         # fixed test images whose histograms the predictor reads
    bins: int = 32                  # histogram bins per branch (a token has 2 × bins values)
    full_stride: int = 31           # full-test histograms read every 31st value (prime: no aliasing)
    split: tuple[float, float, float] = (0.5, 0.25, 0.25)  # train / validation / test configs
    # configurations sharing a per-layer bit list stay on one side of the split (a held-out
    # model never has a training twin that differs only in rounding or activation bits)
    group: str = "bits"
    # chapter 5's protocol: every headline number over these splits × these fitting seeds
    split_seeds: tuple[int, ...] = (0, 1, 2)
    fit_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    d_model: int = 64               # encoder width
    heads: int = 4
    layers: int = 2
    epochs: int = 400               # at most; early stopping on the validation configs
    patience: int = 60
    batch_size: int = 64
    weight_decay: float = 1e-2
    # per target of study.TARGETS, the width, heads, depth and weight decay that replace the
    # four above, chosen on the first split's validation configurations by
    # benchmarks/encoder_tuning.py (its record: populations/<profile>/encoder_tuning.json;
    # a test holds this to it). Empty: the four above for both targets
    target_sizes: dict = field(default_factory=dict)
    # the encoder's learning rate and loss, each target's own, chosen on the first split's
    # validation configurations (study.encoder_settings)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    loss_grid: tuple[str, ...] = ("mse", "huber")
    # predictor.predict's encoder: a correction to the paired probe estimate (True) or the
    # preprint's direct regression of top-1 (False); chapter 5 measures both
    residual: bool = True
    seed: int = 0                   # the split and fitting seed of the one trained predictor

    def size(self, target: str) -> dict:
        """The encoder's ``d_model``, ``heads``, ``layers`` and ``weight_decay`` for ``target``
        (a key of study.TARGETS: "top-1" or "residual")."""
        if target not in ("top-1", "residual"):
            raise ValueError(f"unknown target {target!r}; choose 'top-1' or 'residual'")
        return {"d_model": self.d_model, "heads": self.heads, "layers": self.layers,
                "weight_decay": self.weight_decay, **self.target_sizes.get(target, {})}

    def fit_kwargs(self, target: str, **overrides) -> dict:
        """predictor.fit()'s keyword arguments for this profile's encoder of ``target``, then
        ``overrides`` (e.g. ``seed=1``, ``lr=3e-3``, ``position_encoding=False``)."""
        return {**self.size(target), "epochs": self.epochs, "patience": self.patience, "lr": self.lr_grid[0],
                "batch_size": self.batch_size, "loss": self.loss_grid[0], "seed": self.seed, **overrides}


@dataclass(frozen=True)
class OneImage:
    """Chapter 6: the one-image generator, stage 2 and its baselines."""
    d_model: int = 64               # encoder and decoder width
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    patch: int = 4                  # pixels per patch side (28 and 32 are multiples of 4)
    steps: int = 2000               # stage-2 Adam steps at most (early stopping on validation)
    batch: int = 16                 # training models per step
    eval_every: int = 20            # steps between validation measurements
    patience: int = 10              # validation measurements without improvement before stopping
    softness: float = 1.0           # soft-histogram ramp in bin widths (linear binning)
    # learning rates tried on the validation configurations, each method its own
    lr_grid_generator: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    lr_grid_image: tuple[float, ...] = (0.01, 0.03, 0.1)
    # a pool of real test images (none a probe image): the judge's image subsets and the
    # real-image baselines (each pool image is one draw of "a random real image")
    pool: int = 64
    judge_draws: int = 4            # random subsets per size (1, 2, 4, … pool) and training model
    judge_val_draws: int = 8        # single pool images per validation model for the judge's stopping
    # stage-2 seeds at the chosen learning rates; seed s also trains judge s, so every spread
    # over seeds counts both the judge's and stage 2's
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # what the single image costs: generators of K images, at the one-image run's learning
    # rates and budget, with these seeds (None: every seed)
    n_images: tuple[int, ...] = (4, 16)
    n_images_seeds: tuple[int, ...] | None = None
    # top-1 and the paired estimate on k random test images, no predictor
    k_images: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    k_draws: int = 200              # draws per k
    bn_steps: int = 500             # the BN-statistics (ZeroQ) image: Adam steps, as ZeroQ
    # stage 2 runs the quantized models themselves: at most this many fixed-rounding records
    # per architecture and part of chapter 5's first split (None: every record of the part)
    population: dict | None = None
    seed: int = 0


@dataclass(frozen=True)
class AblationSetting:
    """One setting at which chapter 7 runs the recipe's switches on every model."""
    w_bits: int
    a_bits: int | None               # None: float activations
    seeds: tuple[int, ...]
    # the switches run here, by key (qlib.ablations.SWITCHES); None: every switch
    switches: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Ablation:
    """Chapter 7: what each choice in the recipe and in the predictor is worth."""
    # the recipe's switches (qlib.ablations.SWITCHES), run on every model at these settings;
    # a setting naming a switch that does not exist is refused by qlib.ablations.switch_jobs
    settings: tuple[AblationSetting, ...] = (AblationSetting(3, None, (0, 1, 2)), AblationSetting(4, 4, (0, 1, 2)))
    # the cost/benefit grid: calibration images × Adam steps per unit, at W{budget_w_bits}A32, seed 0
    calib_grid: tuple[int, ...] = (32, 128, 256, 1024)
    iters_grid: tuple[int, ...] = (0, 500, 1000, 2000)
    budget_w_bits: int = 3
    # the predictor (chapter 5's population and split)
    train_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)   # of each architecture's training configs
    bins_grid: tuple[int, ...] = (8, 16, 32, 64, 128)    # each divides the last: one pass, bins merged
    probe_grid: tuple[int, ...] = (16, 64, 256)          # prefixes of the probe set; the last is the profile's
    fit_seeds: tuple[int, ...] = (0, 1, 2)               # the main predictor refitted: its own spread
    # the predictor half rebuilds every model it re-histograms: at most this many
    # fixed-rounding records per architecture and part of chapter 5's first split (None: all)
    population: dict | None = None


@dataclass(frozen=True)
class OwnModel:
    """The "your own model" page: torchvision's resnet18 on random 224×224 inputs."""
    calib_images: int = 1024
    eval_images: int = 256          # held-out random inputs the quantized outputs are compared on
    iters: int = 2000
    batch_size: int = 64
    lr: float = 4e-4                # the paper's: random inputs have no labels to select it on
    w_bits: int = 4
    a_bits: int = 8
    bitlist: tuple[int, ...] = (3, 4, 5, 6)
    seed: int = 0
    latency_repeats: int = 20       # onnxruntime runs per latency median


@dataclass(frozen=True)
class Profile:
    name: str
    train: Train = field(default_factory=Train)
    quant: Quant = field(default_factory=Quant)
    predictor: Predictor = field(default_factory=Predictor)
    one_image: OneImage = field(default_factory=OneImage)
    ablation: Ablation = field(default_factory=Ablation)
    own_model: OwnModel = field(default_factory=OwnModel)
    test_subset: int | None = None  # None: the full 10k test set
    val_subset: int | None = None   # None: the full 5k validation split
    # seconds one chapter cell may run before qlib.book counts the run as hung and runs the
    # chapter again; None: no limit (the paper profile's cells may take hours on a GPU)
    cell_timeout: float | None = None


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        # the full 60k training set, few epochs, no augmentation
        train=Train(epochs=3, augment=False),
        # 20× fewer steps than the paper's 2,000. The untuned default lr and the activation
        # steps' lr are raised 20× so that lr·iters, the farthest Adam can move a variable,
        # stays the paper's; the lr grid moves up by the same factor (its ends 2e-3 and 2
        # bracket the paper's 4e-4 scaled, 8e-3, and AdaRound's reference 1e-3 at 20k steps
        # scaled, 0.2). Two seeds, chapter 3's τ sweep at 5 values with 1 seed, and its
        # tables without the 6- and 5-bit rows (every method at float there) keep the whole
        # book inside its CI budget.
        quant=Quant(calib_images=256, iters=100, batch_size=32, lr=8e-3, act_lr=8e-4, seeds=(0, 1),
                    lr_grid=(2e-3, 6e-3, 2e-2, 6e-2, 2e-1, 6e-1, 2.0),
                    tau_grid=(0.0, 0.25, 0.5, 0.75, 1.0), tau_seeds=(0,),
                    # rows where every method sits at float on our models are left out
                    table1_w_bits=(4, 3, 2), table2_settings=((4, 4), (3, 4))),
        # labelling costs a pass over the 10k test images per configuration (3–5 s on two
        # cores, 8–16 s with a learned rounding): this many fit chapter 5 in its share of
        # the CI budget
        # the population is shipped (populations/quick/: labelling its 3,000 configurations
        # takes hours on two cores). Chapter 5 fits the encoder some 20 times (three splits ×
        # three fitting seeds per target: nine runs per method, its verdicts from their
        # spread; the paper profile five fitting seeds), one per core at once
        # (qlib.parallel: 2.2× faster on two cores, benchmarks/encoder_fits.py): at most 100
        # epochs, one learning rate; width, depth and weight decay per target from
        # benchmarks/encoder_tuning.py (3 widths × 2 depths × 3 decays, validation MAE of the
        # first split, two seeds; the cheapest point within one standard error of the best:
        # width 16 for both, two blocks for the top-1 target, one for the residual)
        predictor=Predictor(configs=1000, learned_share=0.1, shipped=True, d_model=16, heads=2, layers=2,
                            epochs=100, patience=20, lr_grid=(3e-3,), fit_seeds=(0, 1, 2),
                            target_sizes={"top-1": {"weight_decay": 1e-3}, "residual": {"layers": 1, "weight_decay": 1e-3}}),
        # a stage-2 step runs 8 quantized models on one image with gradients (~0.2 s on one
        # core; ~0.4 s with 4 images and ~1.1 s with 16): 120 steps and two learning rates
        # per method fit chapter 6's share, the K-image generators with one seed. Held-out
        # configurations are cheap (one pass each), so the test part is the larger
        one_image=OneImage(steps=120, batch=8, eval_every=15, patience=4, lr_grid_generator=(1e-3, 3e-3),
                           lr_grid_image=(0.02, 0.05), k_draws=100, n_images_seeds=(0,),
                           population={"train": 30, "val": 10, "test": 40}),
        # a W3A32 run costs ~4 s and a W4A4 run ~6.5 s on two cores (quantize + 10k test
        # images): every switch at W3A32 with two seeds (weight rounding decides there); at
        # W4A4 one seed and only the switches that touch activations or the reconstruction
        # unit; the cost/benefit grid up to this profile's 100 steps
        ablation=Ablation(settings=(AblationSetting(3, None, (0, 1)),
                                    AblationSetting(4, 4, (0,), ("block", "first_last", "act_fixed"))),
                          iters_grid=(0, 25, 100), fit_seeds=(0, 1),
                          population={"train": 80, "val": 30, "test": 30}),
        # one resnet18 step on 8 images at 224×224 costs ~0.85 s on two cores: 20 steps per
        # unit, lr raised so that lr·iters stays the paper's (as in `quant` above)
        own_model=OwnModel(calib_images=32, eval_images=32, iters=20, batch_size=8, lr=4e-2),
        # the longest quick cell (chapter 5's labelling) takes under 8 minutes on two cores;
        # a hung cell (seen in chapter 2's widget cell) then costs 20 minutes, not all of CI's 90
        cell_timeout=1200,
    ),
    "paper": Profile(
        name="paper",
        train=Train(epochs=30, augment=True),
        quant=Quant(),  # the papers' settings are the defaults above
    ),
}


#: The fields :func:`scaled` may change, per section: how much work a run does (images,
#: steps, epochs, population sizes, repeats), never what it runs (rows, settings, seeds,
#: switches, learning-rate and τ grids, model sizes). A tuple-valued count (a grid of image
#: or step counts) keeps its length: the same grid points, shrunk. Four are not counts but
#: follow them: the batch sizes (a batch larger than the shrunk image set is refused), early
#: stopping's patience and evaluation interval (in steps and epochs that shrank) and the
#: cell timeout.
COUNTS: dict[str, tuple[str, ...]] = {
    "train": ("epochs", "train_images"),
    "quant": ("calib_images", "iters", "batch_size"),
    "predictor": ("configs", "probe_images", "epochs", "patience"),
    "one_image": ("steps", "eval_every", "patience", "pool", "judge_draws", "judge_val_draws",
                  "k_draws", "bn_steps", "population"),
    "ablation": ("calib_grid", "iters_grid", "probe_grid", "population"),
    "own_model": ("calib_images", "eval_images", "iters", "batch_size", "latency_repeats"),
    "profile": ("test_subset", "val_subset", "cell_timeout"),
}


def settings(p: Profile) -> dict:
    """Every setting of ``p`` as ``{"section.field": value}``, the top-level ones (name,
    test_subset, …) under ``"profile."``: what the book's profile page tabulates and the
    test comparing ``paper-small`` with ``paper`` walks."""
    out = {}
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if dataclasses.is_dataclass(v):
            out.update({f"{f.name}.{k}": getattr(v, k) for k in (g.name for g in dataclasses.fields(v))})
        else:
            out[f"profile.{f.name}"] = v
    return out


def scaled(base: Profile, name: str, counts: dict[str, dict]) -> Profile:
    """``base`` with only its counts changed: ``counts`` maps a section of :data:`COUNTS`
    (``"quant"``, …; ``"profile"`` for the top-level fields) to ``{field: value}``. Every
    row, setting, seed list, switch and grid stays ``base``'s, so a run of the result takes
    every branch ``base`` takes, in a fraction of the time::

        small = scaled(PROFILES["paper"], "paper-small", {"quant": {"iters": 2}})
    """
    sections = {}
    for section, changes in counts.items():
        if section not in COUNTS:
            raise ValueError(f"unknown section {section!r}; choose one of {sorted(COUNTS)}")
        bad = sorted(set(changes) - set(COUNTS[section]))
        if bad:
            raise ValueError(f"{section}: {', '.join(bad)} are not counts a scaled profile may change "
                             f"(those are: {', '.join(COUNTS[section])})")
        current = base if section == "profile" else getattr(base, section)
        for k, v in changes.items():
            old = getattr(current, k)
            if isinstance(old, tuple) and (not isinstance(v, tuple) or len(v) != len(old)):
                raise ValueError(f"{section}.{k}: a grid keeps its {len(old)} points, got {v!r}")
        if section != "profile":
            sections[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(base, name=name, **sections, **counts.get("profile", {}))


PROFILES["paper-small"] = scaled(PROFILES["paper"], "paper-small", {
    # the paper profile's every row, seed, τ, switch and grid, with each count shrunk so all
    # ten chapters run in minutes on two CPU cores (CI: tests/test_paper_small.py). Its
    # numbers mean nothing (float models trained one epoch on 2,048 images, four Adam steps
    # per unit): it proves the code path that `PROFILE=paper make book` takes on a GPU
    "train": {"epochs": 1, "train_images": 2048},
    "quant": {"calib_images": 16, "iters": 4, "batch_size": 8},
    "predictor": {"configs": 6, "probe_images": 32, "epochs": 2, "patience": 1},
    "one_image": {"steps": 2, "eval_every": 1, "patience": 1, "pool": 4, "judge_draws": 1,
                  "judge_val_draws": 1, "k_draws": 2, "bn_steps": 2},
    "ablation": {"calib_grid": (2, 4, 8, 16), "iters_grid": (0, 1, 2, 4), "probe_grid": (8, 16, 32)},
    "own_model": {"calib_images": 4, "eval_images": 4, "iters": 1, "batch_size": 2, "latency_repeats": 1},
    "profile": {"test_subset": 320, "val_subset": 128, "cell_timeout": 300},
})


def get(profile: str) -> Profile:
    """One profile's settings (immutable); a clear error for an unknown name."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[profile]
