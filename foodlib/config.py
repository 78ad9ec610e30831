"""One configuration tree for every run: dataclasses, YAML load/save and validation.

Every leaf name is unique across the tree, so the same names serve as notebook parameters, CLI
flags (``image_size`` <-> ``--image-size``) and flat overrides:

>>> cfg = Config.from_flat(data="dishes", loss="center", lam=0.01, epochs=3)
>>> cfg.loss.lam, cfg.train.epochs
(0.01, 3)
>>> Config.from_yaml(cfg.to_yaml()) == cfg
True
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from foodlib.errors import ConfigError
from foodlib.files import atomic_write_text


# Field metadata, declared once on the fields below (read by runtime_fields() / resume_free_fields()):
#: the field never changes a result: how a run executes, not what it computes (the suite and
#: ``foodlib tune`` ignore it when deciding whether a finished run still matches).
RUNTIME = {"runtime": True}
#: the field may change a run's results (how long it trains, how images are read, what is evaluated
#: after training) but not the training already done, so a resumed run may change it (``epochs``
#: may only grow; the lr schedule then stretches from the resumed step on).
RESUME_FREE = {"resume_free": True}


@dataclass
class DataConfig:
    data: str = "dishes"  # ImageFolder root | "food101:ROOT" | "dishes" | "digits"
    image_size: int = 64  # side of the square crop the network sees, px (ResNets: 64-224)
    val_fraction: float = 0.1  # stratified val split carved from train when the data has no val/
    split_seed: int = 0  # seed of that split; independent of the training seed
    limit_per_class: int | None = None  # use at most this many train images per class (quick runs)
    cache: bool = field(default=True, metadata=RESUME_FREE)  # decode + resize each image once into a memory-mapped uint8 cache
    cache_dir: str | None = field(default=None, metadata=RUNTIME)  # None: cache_folder(): $FOODLIB_CACHE, else ~/.cache/foodlib
    bad_files: str = field(default="skip", metadata=RESUME_FREE)  # skip (and list in the run folder) | fail
    trunk_cache: bool = True  # trainable=head | last:N: compute the frozen part's outputs once, reuse them in every run
    trunk_views: int = 8  # trunk cache: augmented views per training image (each epoch picks one per image)
    dishes_classes: int = 10  # embedded dishes: number of classes
    dishes_per_class: int = 300  # embedded dishes: train images per class (test gets a third)
    intra: float | None = None  # embedded dishes: intra-class variation 0..1 (None: generator default)
    inter: float | None = None  # embedded dishes: how different the recipes are 0..1 (None: default)
    novel_classes: int | list | None = None  # hold out classes for open-set tests: a count (drawn with split_seed) or names


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # see foodlib.list_models(): resnet18/34/50, smallcnn, timm/<name>
    embedding_dim: int | None = None  # None: the backbone's own width (512 for resnet18); 2 for paper plots
    pretrained: str | bool = False  # False | True (efficientnet_liteN: installed weights; others: download) | a weights file
    trainable: str = "all"  # all | head (frozen trunk: neck + loss head only) | last:N (the trunk's last N stages too)


@dataclass
class LossConfig:
    """The loss and its options.

    Each loss class declares its options once, as the keyword arguments of its constructor, which
    sets their defaults and checks their values (``foodlib.losses``). The fields below name those
    keywords so that a config, the CLI flags and the notebook parameters exist without importing
    torch; ``Config.validate`` builds the loss on a tiny head to check them, and ``fit()`` passes
    each field the loss's constructor takes (``foodlib.losses.loss_options``). None means "the
    loss's default"; a field set for a loss that does not take it is an error.
    tests/test_config.py fails when a loss takes a keyword missing here, or a field here is taken
    by no loss, or a non-None default below differs from the loss's own.
    """

    loss: str = "softmax"  # softmax | center | lgm | island | contrastive_center | cosface | arcface | pml:<LossName>[?k=v&...]
    lam: float | None = None  # weight of the center / likelihood / contrastive-center term (None: the loss's default)
    alpha: float | None = None  # center update rate (center, island) or L-GM margin (None: default)
    update: str = "paper"  # center, island: center update, paper (Algorithm 1, rate alpha) | sgd (learning rate center_lr)
    covariance: str = "identity"  # L-GM covariance: identity | diagonal
    lam_island: float | None = None  # island loss: weight of the center-separation term
    alpha_warmup_epochs: int | None = None  # L-GM: ramp the margin from alpha/3 to alpha over this many epochs (None: first third of the run, 0: fixed)
    lam_warmup_epochs: int = 0  # ramp lam linearly from 0 over this many epochs (0: no warm-up)
    margin: float | None = None  # cosface / arcface margin m (None: the papers' 0.35 / 0.5 rad)
    scale: float | None = None  # cosface / arcface scale s of the cosines (None: the papers' 64)
    delta: float | None = None  # contrastive_center: constant in the ratio's denominator (None: 1, the paper's)
    label_smoothing: float | None = None  # softmax: target mass spread over all classes, [0, 1) (None: 0, off)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # sgd | adamw | adagrad (the user's earlier ResNet-18 study: adagrad, lr 1e-3)
    lr: float = 2e-3  # peak learning rate of the network (typical: sgd 0.1, adamw 1e-3..3e-3)
    weight_decay: float = 5e-4  # L2 / decoupled weight decay of the network parameters
    momentum: float = 0.9  # SGD momentum
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0  # linear LR warm-up, in epochs (fractions allowed)
    center_lr: float = 0.5  # learning rate of the class centers when the loss learns them by SGD (update="sgd", contrastive_center)


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata=RESUME_FREE)  # passes over the training split
    batch_size: int = 64  # images per optimizer step (global, across all processes)
    seed: int = 0  # seeds weights, shuffling and augmentation; the same seed gives the same run
    device: str = field(default="auto", metadata=RUNTIME)  # auto (cuda if present) | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on GPUs and AMX CPUs, fp16 on older GPUs, else off) | bf16 | fp16 | off
    channels_last: bool = True  # NHWC memory layout: faster convolutions on GPU and recent CPUs
    compile: bool = False  # torch.compile the model (slow start, faster steps on long GPU runs)
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    augment: str = "standard"  # none | flip | standard (random resized crop + flip) | strong (+ colour)
    workers: int | None = field(default=None, metadata=RUNTIME)  # loader processes (None: 0 on a CPU with the cache, else min(4, cores))
    threads: int | None = field(default=None, metadata=RUNTIME)  # CPU threads of torch (None: torch's default, one per core; 1 wins on a busy machine)
    out: str = field(default="runs/default", metadata=RUNTIME)  # run folder
    resume: bool = field(default=False, metadata=RUNTIME)  # continue the run in `out` from last.pt
    overwrite: bool = field(default=False, metadata=RUNTIME)  # allow training over a finished run in `out` (its results are replaced)
    quiet: bool = field(default=False, metadata=RUNTIME)  # no progress bars (batch runs)
    eval_test: bool = field(default=True, metadata=RESUME_FREE)  # evaluate the test split from the best checkpoint at the end
    features: bool = field(default=True, metadata=RESUME_FREE)  # extract embeddings + logits for every split into features.npz
    figures: bool = field(default=True, metadata=RUNTIME)  # write figures (UMAP, curves, confusion) to the run's figures/
    samples_per_class: int | None = None  # class-balanced batches of m images per class (None: what the loss asks; 0: off)
    tensorboard: bool = field(default=True, metadata=RUNTIME)  # TensorBoard events in the run's tensorboard/ (scalars, hparams, projector)


def runtime_fields() -> frozenset[str]:
    """Leaf names marked ``RUNTIME``: they never change a result (run folder, device, workers, ...).

    >>> sorted(runtime_fields())[:3]
    ['cache_dir', 'device', 'figures']
    """
    return frozenset(name for name, (_, leaf) in Config.field_index().items() if leaf.metadata.get("runtime"))


def resume_free_fields() -> frozenset[str]:
    """Leaf names a resumed run may change: the ``RUNTIME`` fields and those marked ``RESUME_FREE``.

    >>> sorted(resume_free_fields() - runtime_fields())
    ['bad_files', 'cache', 'epochs', 'eval_test', 'features']
    """
    marked = {name for name, (_, leaf) in Config.field_index().items() if leaf.metadata.get("resume_free")}
    return runtime_fields() | marked


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ----- flat view: every leaf by its unique name -------------------------------------------
    @classmethod
    def field_index(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Map each leaf name to (section name, dataclass field)."""
        index = {}
        for section in dataclasses.fields(cls):
            for leaf in dataclasses.fields(_section_types()[section.name]):
                index[leaf.name] = (section.name, leaf)
        return index

    @classmethod
    def from_flat(cls, **values: Any) -> "Config":
        """Build a validated config from leaf names (notebook parameters, CLI flags)."""
        return cls().with_overrides(**values)

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]) -> "Config":
        """Build a config from the Config fields found in ``namespace`` (other names are ignored).

        A notebook passes its globals: its parameters cell and anything papermill injects.

        >>> Config.from_namespace({"loss": "center", "epochs": 3, "np": object()}).train.epochs
        3
        """
        return cls.from_flat(**{name: namespace[name] for name in cls.field_index() if name in namespace})

    def with_overrides(self, **values: Any) -> "Config":
        """A copy with the given leaves replaced (unknown names raise a ConfigError), validated."""
        index = self.field_index()
        sections = {s.name: dataclasses.asdict(getattr(self, s.name)) for s in dataclasses.fields(self)}
        for name, value in values.items():
            if name not in index:
                raise ConfigError(_unknown("config field", name, index))
            section, leaf = index[name]
            sections[section][name] = _coerce(name, value, leaf)
        cfg = Config(**{name: _section_types()[name](**vals) for name, vals in sections.items()})
        cfg.validate()
        return cfg

    def to_flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    # ----- YAML ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Accept the nested form (as saved) or a flat mapping of leaf names."""
        data = dict(data or {})
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in _section_types() and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return cls.from_flat(**flat)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "Config":
        """Load from a YAML file path or a YAML string."""
        text = str(text_or_path)
        source = "the config text"
        if "\n" not in text and (Path(text).suffix in {".yaml", ".yml"} or isinstance(text_or_path, Path)
                                 or _is_file(text)):
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"config file {path} cannot be read as text ({type(error).__name__}); "
                                  "pass a YAML file such as a run's config.yaml") from None
            source = f"config file {path}"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ConfigError(f"{source} is not valid YAML{where}: {problem}; fix the YAML "
                              "(a mapping such as `lr: 0.001`)") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{source} holds a YAML {type(data).__name__}, not a mapping of field names to "
                              "values; write it as `field: value` lines (e.g. `lr: 0.001`)")
        return cls.from_dict(data or {})

    # ----- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the field, the value and the valid choices."""
        for name, allowed in _CHOICES.items():
            value = self.get(name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not valid; choose one of {sorted(allowed)}")
        for name, low, high in _RANGES:
            value = self.get(name)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number (in [{low}, {high}))")
            if not (low <= value <= high):
                raise ConfigError(f"{name}={value!r} is out of range; it must lie in [{low}, {high}]")
        if isinstance(self.data.novel_classes, int) and self.data.novel_classes < 2:
            raise ConfigError(f"novel_classes={self.data.novel_classes!r} must be >= 2 (a count) or a list of class names")
        if self.train.samples_per_class is not None and not (
                self.train.samples_per_class == 0 or 2 <= self.train.samples_per_class <= self.train.batch_size):
            raise ConfigError(f"samples_per_class={self.train.samples_per_class!r} must be 0 (plain shuffled batches) "
                              f"or between 2 and batch_size={self.train.batch_size}")
        if self.model.embedding_dim is not None and self.model.embedding_dim < 2:
            raise ConfigError(f"embedding_dim={self.model.embedding_dim!r} must be >= 2 (or None for the backbone's width)")
        from foodlib.trainable import parse_trainable  # lazy: torch (config stays light)

        try:
            parse_trainable(self.model.trainable)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._validate_registry_names()

    def _validate_registry_names(self) -> None:
        """Check ``loss`` and ``backbone`` against the registries, so a typo fails before any data loads.

        Imported here, not at module level: the registries pull in torch, and the config module
        stays light for code that only reads or writes YAML.
        """
        from foodlib.losses import check_loss_options, is_pml_name, list_losses  # lazy: torch (config stays light)
        from foodlib.models import list_models  # lazy: torch

        if self.loss.loss not in list_losses() and not is_pml_name(self.loss.loss):
            raise ConfigError(
                f"loss={self.loss.loss!r} is not a registered loss; choose one of {list_losses()} "
                "or pml:<LossName>[?option=value&...] for a pytorch-metric-learning loss"
            )
        try:  # the loss is the source of truth for its options: its constructor checks them
            check_loss_options(self.loss.loss, **self._given_loss_options())
        except ValueError as error:
            raise ConfigError(f"loss={self.loss.loss!r}: {error}") from None
        backbone = self.model.backbone
        if backbone not in list_models() and not (backbone.startswith("timm/") and len(backbone) > len("timm/")):
            raise ConfigError(
                f"backbone={backbone!r} is not a registered backbone; choose one of {list_models()} "
                "or timm/<name> for any timm model"
            )

    def _given_loss_options(self) -> dict[str, Any]:
        """The loss options this config sets: the LossConfig fields that are not None and not at their
        default (a default the loss does not take, e.g. ``update`` for softmax, is not "set")."""
        defaults = LossConfig()
        return {f.name: getattr(self.loss, f.name) for f in dataclasses.fields(LossConfig)
                if f.name != "loss" and getattr(self.loss, f.name) is not None
                and getattr(self.loss, f.name) != getattr(defaults, f.name)}

    def get(self, name: str) -> Any:
        section, _ = self.field_index()[name]
        return getattr(getattr(self, section), name)


_CHOICES = {
    "bad_files": {"skip", "fail"},
    "optimizer": {"sgd", "adamw", "adagrad"},
    "schedule": {"cosine", "step", "constant"},
    "amp": {"auto", "bf16", "fp16", "off"},
    "augment": {"none", "flip", "standard", "strong"},
}
_RANGES = [  # (field, low, high), inclusive
    ("image_size", 8, 4096),
    ("val_fraction", 0.0, 0.9),
    ("limit_per_class", 1, 10**9),
    ("dishes_classes", 2, 1000),
    ("dishes_per_class", 1, 10**6),
    ("intra", 0.0, 1.0),
    ("inter", 0.0, 1.0),
    ("center_lr", 0.0, float("inf")),
    ("lr", 0.0, float("inf")),
    ("weight_decay", 0.0, float("inf")),
    ("momentum", 0.0, 1.0),
    ("warmup_epochs", 0.0, 10**6),
    ("epochs", 1, 10**6),
    ("batch_size", 1, 10**6),
    ("trunk_views", 1, 1000),
    ("workers", 0, 256),
    ("threads", 1, 1024),
    ("samples_per_class", 0, 10**6),
]


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a long line of YAML is no file name
        return False


def _section_types() -> dict[str, type]:
    return {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "train": TrainConfig}


def _unknown(what: str, name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid names: {', '.join(sorted(valid))}"
    return f"unknown {what} {name!r}{hint}"


def _count_or_names(value: Any) -> int | list[str]:
    """``3`` / ``"3"`` -> 3; ``["a", "b"]`` / ``"a,b"`` -> ["a", "b"]; anything else raises ValueError."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        value = [part.strip() for part in text.strip("[]").split(",")]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return [str(v).strip() for v in value]
    raise ValueError


def _coerce(name: str, value: Any, leaf: dataclasses.Field) -> Any:
    """Convert strings from CLI / YAML / papermill to the field's type, with a clear error."""
    hint = leaf.type if isinstance(leaf.type, str) else getattr(leaf.type, "__name__", str(leaf.type))
    types = [t.strip() for t in hint.split("|")]
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and "None" in types):
        if "None" in types:
            return None
        raise ConfigError(f"{name} must not be None (type {hint})")
    try:
        if "list" in types:  # novel_classes: a count, or class names (a list, or "a,b" from the CLI)
            return _count_or_names(value)
        if "bool" in types and "str" in types:  # pretrained: a flag or a path
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            return {"true": True, "false": False}.get(lowered, str(value))
        if "bool" in types:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in {"true", "1", "yes", "on"}:
                return True
            if lowered in {"false", "0", "no", "off"}:
                return False
            raise ValueError
        if "int" in types:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "float" in types:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "str" in types:
            if not isinstance(value, (str, Path)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {hint}") from None
    return value

