"""Configuration dataclasses, serialised into checkpoints and bundle manifests (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError
from .recipes import OPT_FIELDS, OPTIMIZERS, SCHEDULES, Recipe


def from_dict(cls, d: dict[str, Any]):
    """Build a dataclass from a dict, refusing unknown keys (a sign of a format mismatch)."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


MODELS = {"timecma": True, "timecma-no-llm": False, "dlinear": False}  # model -> uses the LLM branch


@dataclass
class ModelConfig:
    """TimeCMA hyper-parameters (names follow the public reference's flags), and which model:
    ``timecma`` (default), ``timecma-no-llm`` (the same network without the prompt branch) or
    ``dlinear`` (Zeng et al., AAAI 2023: moving-average decomposition + two linear layers)."""

    num_nodes: int
    seq_len: int = 96
    pred_len: int = 96
    d_llm: int = 768
    channel: int = 32
    e_layer: int = 2
    d_layer: int = 2
    head: int = 8
    d_ff: int = 32
    dropout: float = 0.2
    dim_feedforward: int = 2048
    model: str = "timecma"
    moving_avg: int = 25  # dlinear's trend kernel
    residual: str = "none"  # "seasonal-naive": the network predicts the residual over the value one period back
    # per variable (core.seasonality.primary_periods, None where it found none): checked below
    residual_periods: list[int | None] | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.residual not in ("none", "seasonal-naive"):
            raise ValueError(f"unknown residual {self.residual!r}; choose none or seasonal-naive")
        if self.residual != "none" and (not self.residual_periods or len(self.residual_periods) != self.num_nodes
                                        or not all(p is not None and 1 <= p <= self.seq_len
                                                   for p in self.residual_periods)):
            raise ValueError(f"the seasonal-naive residual needs one period in 1..{self.seq_len} per variable, "
                             f"got {self.residual_periods}")

    @property
    def uses_llm(self) -> bool:
        return MODELS[self.model]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DataContract:
    """What serving needs to know about the data the model was trained on."""

    time_col: str
    variables: list[str]
    frequency: str
    seq_len: int
    pred_len: int
    scaler_mean: list[float]
    scaler_std: list[float]
    split: str = "ett"
    source: str = ""  # path of the training file (export's parity check reads real windows from it)
    scaler_kind: str = "standard"  # or "log" (timecma.core.scaling); mean/std are then of the logged values
    scaler_offset: list[float] | None = None
    periods: list[list[int]] | None = None  # significant periods per variable, detected on training rows
    raw_std: list[float] | None = None  # training split's std per variable: the paper's units for backtest metrics

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """Optimisation settings. The field defaults are recipe ``timecma-reference`` (timecma.core.recipes): the
    public TimeCMA ETTh1-96 script's hyper-parameters, selected and early-stopped on validation where its
    ``train.py`` uses the test split (the recipe's docstring says how that changes patience).
    ``TrainConfig.from_recipe`` gives each model family's published setup at a horizon, with the user's flags on
    top (``overrides`` names them). Impossible values are refused here, before any prompt is embedded."""

    lr: float = 1e-4
    weight_decay: float = 1e-3
    batch_size: int = 16
    epochs: int = 100
    patience: int = 10
    seed: int = 2024
    clip: float | None = 5.0  # gradient-norm clipping (None: none)
    optimizer: str = "adamw"  # or "adam"
    schedule: str = "cosine"  # cosine (period ``cosine_period`` epochs) or halve (lr x 0.5 after each epoch)
    cosine_period: int = 50
    recipe: str = "timecma-reference"  # the named setup these values come from (timecma.core.recipes)
    overrides: list[str] = field(default_factory=list)  # fields a flag set away from the recipe
    llm_batch_size: int = 32
    device: str = "auto"
    shuffle: bool = False  # the reference does not shuffle
    train_stride: int = 1  # every k-th training window (1 = all, as the reference)
    eval_stride: int = 1  # every k-th validation and test window (1 = all; metrics say which)
    precompute_backend: str = "torch"  # engine that embeds the prompts (timecma.encoders): torch[:bf16], ort-cpu, openvino[:bf16|:int8], auto
    joint: str = "none"  # none: frozen LLM (the paper); lora / full: the LLM trains with the forecaster (timecma.joint)
    llm_init: str = "pretrained"  # or "xavier": the LLM starts from Xavier-initialised weights of its config
    joint_weight: float = 0.5  # w in w * forecast MSE + (1 - w) * next-token loss
    joint_text: str | None = None  # a text corpus (one document per line) for the next-token loss; None: the prompts
    lora_rank: int = 8

    def __post_init__(self) -> None:
        """Refuse a setting that could only fail (or silently misbehave) after hours of prompt precompute."""
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} (choose {', '.join(OPTIMIZERS)})"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r} (choose {', '.join(SCHEDULES)})"),
            (self.joint in JOINT_MODES, f"joint {self.joint!r} (choose {', '.join(JOINT_MODES)})"),
            (self.llm_init in LLM_INITS, f"llm_init {self.llm_init!r} (choose {', '.join(LLM_INITS)})"),
            (self.lr > 0, f"lr {self.lr} (must be > 0)"),
            (self.weight_decay >= 0, f"weight_decay {self.weight_decay} (must be >= 0)"),
            (self.clip is None or self.clip > 0, f"clip {self.clip} (must be > 0, or none)"),
            (0 <= self.joint_weight <= 1, f"joint_weight {self.joint_weight} (must be in [0, 1])"),
            (self.cosine_period >= 0, f"cosine_period {self.cosine_period} (must be >= 0)"),
        ] + [(getattr(self, k) >= 1, f"{k} {getattr(self, k)} (must be >= 1)")
             for k in ("batch_size", "epochs", "patience", "llm_batch_size", "train_stride", "eval_stride", "lora_rank")]
        bad = [message for ok, message in checks if not ok]
        if bad:
            raise InputError("training settings refused: " + "; ".join(bad))

    @classmethod
    def from_recipe(cls, recipe: Recipe, changed: list[str] | None = None, **settings: Any) -> "TrainConfig":
        """The recipe's optimisation fields with ``settings`` on top (None: keep the recipe's; clip 0: no
        clipping). ``overrides`` lists the recipe fields a setting changed, plus ``changed`` (model sizes)."""
        given = {k: v for k, v in settings.items() if v is not None}
        if given.get("clip") == 0:
            given["clip"] = None
        base = {k: getattr(recipe, k) for k in OPT_FIELDS}
        differ = [k for k in given if k in base and given[k] != base[k]]
        return cls(**{**base, **given, "recipe": recipe.name, "overrides": sorted({*differ, *(changed or [])})})

    def to_dict(self) -> dict:
        return asdict(self)


# what `timecma-train --joint` and `--llm-init` accept (timecma.joint)
JOINT_MODES = ("none", "lora", "full")
LLM_INITS = ("pretrained", "xavier")

# what `timecma-train --precompute-backend` accepts; `torch` is eager PyTorch (the default, as before)
PRECOMPUTE_BACKENDS = ("torch", "torch:bf16", "auto", "ort-cpu", "openvino", "openvino:bf16", "openvino:int8")


@dataclass
class LLMInfo:
    """Identity of the last-token encoder: what the store namespace and digests are built from."""

    id: str
    weights_digest: str
    tokenizer_digest: str
    wrapper_version: str
    namespace: str
    d_llm: int
    max_positions: int
    pad_id: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
