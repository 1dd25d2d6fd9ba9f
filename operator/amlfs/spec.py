"""The `LossSearch` manifest as pydantic models: the single source of truth for the spec.

The local runner reads these from YAML, the trainer receives the spec as JSON, and the CRD schema is
generated from them. Field names are camelCase on the wire (Kubernetes convention) and snake_case in
Python. Every constraint here is also what the API server enforces once the CRD is generated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_VERSION = "amlfs.io/v1alpha1"
KIND = "LossSearch"

Parameterization = Literal["monotone", "paper", "bounded"]
DEFAULT_PARAMETERIZATION: Parameterization = "bounded"
POLY_TERM_DEFAULT = 1.0  # search.polyTerm: the default search moves around Poly-1 (docs/results.md)

# Presets a search can start from (search mode), per parameterisation of the amlfs space. label-smoothing is not
# a loss of the target probability; monotone keeps tau(0) = 0 (no gce, mae); bounded has tau linear above its
# floor (no focal, sce, poly1; gce and mae are approximated by their tau(0)).
REPRESENTABLE = {
    "paper": ("softmax", "cosface", "arcface", "focal", "gce", "mae", "sce", "poly1"),
    "monotone": ("softmax", "cosface", "arcface", "focal", "sce", "poly1"),
    "bounded": ("softmax", "cosface", "arcface", "gce", "mae", "poly1"),
}

Dataset = Literal[
    "digits",
    "mnist1d",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion-mnist",
    "imagefolder",
    "market1501",
    "dukemtmc-reid",
    "casia-webface",
]
TaskKind = Literal["classification", "retrieval", "verification"]
RewardMetric = Literal["", "accuracy", "mAP", "rank1"]

# What each task kind can be rewarded by (the first is its default) and which datasets have its layout. The
# in-memory datasets serve retrieval and verification open-set: their last task.heldOutClasses classes are the
# test identities.
IN_MEMORY = ("digits", "mnist1d", "cifar10", "cifar100", "mnist", "fashion-mnist")
KIND_REWARDS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "retrieval": ("mAP", "rank1"),
    "verification": ("accuracy",),
}
KIND_DATASETS: dict[str, tuple[str, ...]] = {
    "classification": (*IN_MEMORY, "imagefolder"),
    "retrieval": (*IN_MEMORY, "market1501", "dukemtmc-reid"),
    "verification": (*IN_MEMORY, "casia-webface"),
}
ModelName = Literal["mlp", "small-cnn", "cnn1d", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50"]
SpaceName = Literal["amlfs", "search-softmax"]
PresetName = Literal["softmax", "cosface", "arcface", "focal", "gce", "mae", "sce", "label-smoothing", "poly1"]

STORAGE_URI = re.compile(r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+|/.+)$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --- CEL rules for the generated CRD (amlfs.crd): the API server's share of the checks below ---------


def cel(*rules: tuple[str, str] | dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying x-kubernetes-validations: (rule, message) pairs or full rule dicts.

    Messages name the field and the fix. Pydantic ignores these; amlfs.crd copies them into the CRD.
    """
    return {"x-kubernetes-validations": [r if isinstance(r, dict) else {"rule": r[0], "message": r[1]} for r in rules]}


IMMUTABLE_RULE = "self == oldSelf"


def immutable(path: str, why: str) -> tuple[str, str]:
    """A transition rule: the field keeps the value it was created with.

    This marker is the only list of immutable fields: the CRD carries it as a CEL transition rule and
    `immutable_paths` reads it back for the local runner's check of a resumed search."""
    return (
        IMMUTABLE_RULE,
        f"{path} is immutable once the LossSearch is created ({why}); "
        "delete and re-create the LossSearch (or create a new one) to change it",
    )


# The CEL twin of STORAGE_URI (RE2 syntax: '-' last in the class instead of an escaped '\-').
STORAGE_URI_CEL = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file://.+|/.+)$"


class SpecError(ValueError):
    """Bad user input. `str()` is one line naming the field and the fix."""


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class LabelNoiseSpec(Model):
    """Label noise for robustness studies: applied, seeded, to the training and validation splits, never test."""

    type: Literal["symmetric", "pairflip"] = Field(
        "symmetric",
        description="symmetric: a noisy label is drawn uniformly from the other classes. pairflip: class c "
        "becomes c + 1 (mod the number of classes).",
    )
    rate: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of the training and validation examples whose label is replaced "
        "(exactly round(rate x n) of them); 0: clean.",
    )
    seed: int = Field(0, ge=0, description="Seed of which examples are relabelled and how.")


class ImbalanceSpec(Model):
    """A long-tailed training set for robustness studies: applied, seeded, to training and validation, never test."""

    ratio: float = Field(
        1.0,
        ge=1.0,
        le=10000.0,
        description="Examples of the largest class over those of the smallest (1: as loaded). Class c of C "
        "keeps round(n x ratio^(-c/(C-1))) examples, n the smallest class's count as loaded.",
    )
    profile: Literal["exponential"] = Field("exponential", description="How counts fall from class 0 to class C-1.")
    seed: int = Field(0, ge=0, description="Seed of which examples each class keeps.")


class PairsSpec(Model):
    """The test pairs of a verification task on image files (LFW's pairs.txt format)."""

    file: str = Field(
        "",
        description="pairs.txt: a header line (folds and pairs per class per fold, e.g. '10 300'), then per fold "
        "the matched 'name n1 n2' lines and then the mismatched 'name1 n1 name2 n2' lines. A local path or an "
        "s3:// URI.",
    )
    images_root: str = Field(
        "",
        description="Directory or s3:// prefix holding the pairs' images as <name>/<name>_<nnnn>.jpg (LFW layout).",
    )


def _kind_rule(kind: str) -> str:
    rewards = ["", *KIND_REWARDS[kind]]
    return f"self.?kind.orValue('classification') != '{kind}' || self.?reward.orValue('') in {rewards}"


def _layout_rule(kind: str) -> str:
    datasets = list(KIND_DATASETS[kind])
    return f"self.?kind.orValue('classification') != '{kind}' || self.?dataset.orValue('digits') in {datasets}"


class TaskSpec(Model):
    """What to train on, and what kind of task it is."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            {
                "rule": "self.?dataset.orValue('digits') != 'imagefolder' "
                "|| (self.?labelNoise.?rate.orValue(0.0) == 0.0 && self.?imbalance.?ratio.orValue(1.0) == 1.0)",
                "message": "spec.task.labelNoise and spec.task.imbalance apply to in-memory datasets only; "
                "use another dataset or set labelNoise.rate: 0 and imbalance.ratio: 1",
                "fieldPath": ".labelNoise",
            },
            {
                "rule": "self.?labelNoise.?type.orValue('symmetric') != 'pairflip' "
                "|| self.?labelNoise.?rate.orValue(0.0) < 0.5",
                "message": "spec.task.labelNoise.rate must be below 0.5 for pairflip noise (the flipped class would "
                "become the majority label); lower the rate",
                "fieldPath": ".labelNoise.rate",
            },
            *(
                {
                    "rule": _kind_rule(kind),
                    "message": f"spec.task.reward is not a metric of a {kind} task; use "
                    + " or ".join(KIND_REWARDS[kind])
                    + " (or leave it empty)",
                    "fieldPath": ".reward",
                }
                for kind in KIND_REWARDS
            ),
            *(
                {
                    "rule": _layout_rule(kind),
                    "message": f"spec.task.dataset has no {kind} layout; use one of "
                    + ", ".join(KIND_DATASETS[kind])
                    + " with this task.kind",
                    "fieldPath": ".dataset",
                }
                for kind in ("classification", "retrieval", "verification")
            ),
            {
                "rule": "self.?kind.orValue('classification') != 'verification' "
                "|| self.?dataset.orValue('digits') != 'casia-webface' "
                "|| (self.?pairs.?file.orValue('') != '' && self.?pairs.?imagesRoot.orValue('') != '')",
                "message": "spec.task.pairs.file and spec.task.pairs.imagesRoot are needed for verification on "
                "casia-webface (the test pairs); set them to LFW's pairs.txt and image directory",
                "fieldPath": ".pairs",
            },
            {
                "rule": "self.?dataset.orValue('digits') == 'casia-webface' "
                "|| (self.?pairs.?file.orValue('') == '' && self.?pairs.?imagesRoot.orValue('') == '')",
                "message": "spec.task.pairs applies to verification on casia-webface only (open-set pairs are "
                "built from the held-out classes); delete spec.task.pairs",
                "fieldPath": ".pairs",
            },
            {
                "rule": "!(self.?dataset.orValue('digits') in " + str(list(IN_MEMORY)) + ") "
                "|| self.?kind.orValue('classification') == 'classification' "
                "|| self.?heldOutClasses.orValue(0) >= 2",
                "message": "spec.task.heldOutClasses must be at least 2 for retrieval or verification on an in-memory "
                "dataset (its last classes are the open-set test identities); set e.g. heldOutClasses: 4",
                "fieldPath": ".heldOutClasses",
            },
            {
                "rule": "self.?heldOutClasses.orValue(0) == 0 || (self.?kind.orValue('classification') != "
                "'classification' && self.?dataset.orValue('digits') in " + str(list(IN_MEMORY)) + ")",
                "message": "spec.task.heldOutClasses applies to open-set retrieval or verification on an in-memory "
                "dataset only; set heldOutClasses: 0",
                "fieldPath": ".heldOutClasses",
            },
            {
                "rule": "self.?kind.orValue('classification') == 'classification' "
                "|| (self.?labelNoise.?rate.orValue(0.0) == 0.0 && self.?imbalance.?ratio.orValue(1.0) == 1.0)",
                "message": "spec.task.labelNoise and spec.task.imbalance apply to classification only; set "
                "labelNoise.rate: 0 and imbalance.ratio: 1",
                "fieldPath": ".labelNoise",
            },
            {
                "rule": "size(self.?imageSize.orValue([])) != 1",
                "message": "spec.task.imageSize must be empty or [height, width]; set e.g. imageSize: [256, 128]",
                "fieldPath": ".imageSize",
            },
        )
    )

    kind: TaskKind = Field(
        "classification",
        description="classification: the reward is validation accuracy on the training classes. retrieval "
        "(person re-identification): identity classification in training, query/gallery ranking of the "
        "embedding before the head in evaluation. verification (faces): identity classification in training, "
        "10-fold same/different accuracy on image pairs in evaluation.",
    )
    reward: RewardMetric = Field(
        "",
        description="The validation metric that is the reward: classification accuracy (with search.reward); "
        "retrieval mAP or rank1; verification accuracy. Empty: the kind's first.",
    )
    held_out_classes: int = Field(
        0,
        ge=0,
        le=1000,
        description="Open-set retrieval/verification on an in-memory dataset: its last heldOutClasses classes "
        "are the test identities (never trained on); the validation identities are carved from the others.",
    )
    image_size: list[Annotated[int, Field(ge=8, le=4096)]] = Field(
        default_factory=list,
        max_length=2,
        description="[height, width] images are resized to (market1501, dukemtmc-reid: default [256, 128]; "
        "casia-webface: default [112, 112]).",
    )
    random_erasing: float = Field(
        0.5, ge=0.0, le=1.0, description="Retrieval on image files: probability of random erasing when augmenting."
    )
    pairs: PairsSpec = Field(default_factory=PairsSpec)

    dataset: Dataset = Field(
        "digits", description="Dataset name: digits, mnist1d, cifar10, cifar100, mnist, fashion-mnist or imagefolder."
    )
    data_root: str = Field(
        "",
        description="Local directory or s3:// prefix holding the dataset files "
        "(torchvision layout). Unused for digits and mnist1d, which are built offline.",
    )
    download: bool = Field(False, description="Let torchvision download the dataset into dataRoot when missing.")
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of the training set held out as the "
        "validation split (the reward). Carved with a fixed seed; the test set is never "
        "used for the reward.",
    )
    split_seed: int = Field(0, ge=0, description="Seed of the train/validation split.")
    batch_size: int = Field(128, ge=1, le=65536, description="Training batch size per sample.")
    eval_batch_size: int = Field(1024, ge=1, le=65536, description="Batch size for validation and test passes.")
    augment: bool = Field(True, description="Standard augmentation (random crop + flip for CIFAR-style images).")
    train_limit: int = Field(0, ge=0, description="Use at most this many training examples (0: all). For smoke tests.")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader workers, for imagefolder only.")
    label_noise: LabelNoiseSpec = Field(default_factory=LabelNoiseSpec)
    imbalance: ImbalanceSpec = Field(default_factory=ImbalanceSpec)

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.dataset == "imagefolder" and (self.label_noise.rate > 0 or self.imbalance.ratio > 1):
            raise ValueError("labelNoise and imbalance apply to in-memory datasets only, not imagefolder")
        if self.label_noise.type == "pairflip" and self.label_noise.rate >= 0.5:
            raise ValueError(
                f"labelNoise.rate {self.label_noise.rate} must be below 0.5 for pairflip noise "
                "(the flipped class would become the majority label)"
            )
        self._check_kind()
        return self

    def _check_kind(self) -> None:
        kind, rewards = self.kind, KIND_REWARDS[self.kind]
        if self.reward and self.reward not in rewards:
            raise ValueError(f"reward {self.reward} is not a metric of a {kind} task; use {' or '.join(rewards)}")
        if self.dataset not in KIND_DATASETS[kind]:
            raise ValueError(
                f"dataset {self.dataset} has no {kind} layout; use one of {', '.join(KIND_DATASETS[kind])} "
                "with this task.kind"
            )
        if self.dataset == "casia-webface" and not (self.pairs.file and self.pairs.images_root):
            raise ValueError(
                "pairs.file and pairs.imagesRoot are needed for verification on casia-webface (the test pairs); "
                "set them to LFW's pairs.txt and image directory"
            )
        if self.dataset != "casia-webface" and (self.pairs.file or self.pairs.images_root):
            raise ValueError(
                "pairs applies to verification on casia-webface only (open-set pairs are built from the held-out "
                "classes); remove task.pairs"
            )
        open_set = kind != "classification" and self.dataset in IN_MEMORY
        if open_set and self.held_out_classes < 2:
            raise ValueError(
                f"heldOutClasses must be at least 2 for {kind} on {self.dataset} (its last classes are the "
                "open-set test identities); set e.g. heldOutClasses: 4"
            )
        if self.held_out_classes and not open_set:
            raise ValueError(
                "heldOutClasses applies to open-set retrieval or verification on an in-memory dataset only; "
                "set heldOutClasses: 0"
            )
        if kind != "classification" and (self.label_noise.rate > 0 or self.imbalance.ratio > 1):
            raise ValueError("labelNoise and imbalance apply to classification only")
        if len(self.image_size) == 1:
            raise ValueError(f"imageSize {self.image_size} must be empty or [height, width]; set e.g. [256, 128]")

    @property
    def reward_metric(self) -> str:
        """The validation metric that is the reward (classification: accuracy, refined by search.reward)."""
        return self.reward or KIND_REWARDS[self.kind][0]


class ModelSpec(Model):
    """The network and its classifier head."""

    name: ModelName = Field(
        "small-cnn", description="mlp, small-cnn, cnn1d (mnist1d), resnet20/32/56 (CIFAR), resnet18/50 (torchvision)."
    )
    head: Literal["linear", "cosine"] = Field(
        "linear",
        description="linear: plain logits, t acts on the target "
        "logit. cosine: normalised features and weights, t acts on the "
        "target cosine and logits are scale * cosine.",
    )
    scale: float = Field(16.0, gt=0.0, le=128.0, description="Cosine-head scale s.")
    bn_neck: bool = Field(
        False,
        description="A BatchNorm1d between the features and the head (Luo et al.'s BNNeck); retrieval and "
        "verification then evaluate the batch-normalised feature.",
    )
    width: int = Field(32, ge=4, le=1024, description="Base width of mlp/small-cnn/cnn1d.")


class OptimizerSpec(Model):
    """The network's optimiser and learning-rate schedule (across search epochs). An edit of a running search
    applies from its next epoch, at the schedule's current position; only the optimiser's kind is fixed."""

    name: Literal["sgd", "adamw"] = Field(
        "sgd",
        description="sgd (with momentum) or adamw.",
        json_schema_extra=cel(immutable("spec.optimizer.name", "the checkpoints hold this optimiser's state")),
    )
    lr: float = Field(
        0.1,
        gt=0.0,
        description="Peak learning rate.",
        json_schema_extra=cel(
            ("self > 0.0", "spec.optimizer.lr must be greater than 0 (the peak learning rate); set e.g. lr: 0.1")
        ),
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (adamw: beta1), in [0, 1).")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only).")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 weight decay (adamw: decoupled).")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine",
        description="Per-iteration schedule over the search's epochs as it began (search.epochs at epoch 0); "
        "epochs added later train at its final LR.",
    )
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length, in epochs.")
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="step schedule: fractions of the run at which the LR is multiplied by gamma.",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: LR factor at each milestone.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Only used by the softmax preset.")


class InitSpec(Model):
    """The init loss: where the loss distribution's mean starts (search mode: a preset approximated in the
    search space) and the exact loss every sample trains with in selection-only mode."""

    preset: PresetName = Field(
        "softmax",
        description="softmax (identity: plain cross-entropy), cosface, arcface, focal, gce (generalised "
        "cross-entropy (1 - p^q)/q), mae (2(1 - p)), sce (symmetric CE: alpha CE + beta RCE), "
        "label-smoothing (selection-only mode) or poly1 (CE + epsilon (1 - p); in the bounded parameterization "
        "the search moves t, the floor and the prior coordinate around it, and every sampled loss keeps its "
        "epsilon (1 - p) term).",
    )
    margin: float = Field(0.35, ge=0.0, le=1.5, description="cosface/arcface margin m.")
    gamma: float = Field(2.0, ge=0.0, le=10.0, description="focal gamma.")
    q: float = Field(0.7, gt=0.0, le=1.0, description="gce exponent q (q -> 0: cross-entropy, q = 1: MAE / 2).")
    alpha: float = Field(0.1, ge=0.0, le=10.0, description="sce weight of cross-entropy.")
    beta: float = Field(1.0, ge=0.0, le=10.0, description="sce weight of reverse cross-entropy -ln(1e-4) (1 - p).")
    smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label-smoothing epsilon.")
    poly_epsilon: float = Field(1.0, ge=-1.0, le=10.0, description="poly1 epsilon.")
    class_balance: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Class-balanced weighting (Cui et al., CVPR 2019) of every loss of the search (the "
        "preset in selection-only mode, each sampled loss in search mode): class c weighs "
        "(1 - beta) / (1 - beta^n_c), n_c its training examples, normalised to mean 1 over classes. "
        "This is that beta (e.g. 0.999); 0: off.",
    )
    logit_adjustment: float = Field(
        0.0,
        ge=0.0,
        le=4.0,
        description="Logit adjustment (Menon et al., ICLR 2021) of every loss of the search: the loss sees the "
        "logits plus a log pi_c, pi_c the training split's share of class c, so rare classes get a larger margin "
        "(the trained network's own logits are not shifted). This is that a: 1 makes cross-entropy "
        "Bayes-consistent for the balanced error (long-tailed data, balanced test); 0: off. With "
        "search.priorAdjustment it is where the searched strength starts; otherwise fixed.",
    )


class SearchSpec(Model):
    """The loss-function search itself."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            {
                # has(): the API server also checks the `default: {}` of search, before nested defaults fill it in
                "rule": "!has(self.minSamples) || !has(self.samplesPerEpoch) "
                "|| self.minSamples <= self.samplesPerEpoch",
                "message": "spec.search.minSamples must not exceed spec.search.samplesPerEpoch (an epoch could never "
                "close); lower minSamples or raise samplesPerEpoch",
                "fieldPath": ".minSamples",
            },
            {
                "rule": "(self.?space.orValue('amlfs') == 'amlfs' "
                f"&& self.?parameterization.orValue('{DEFAULT_PARAMETERIZATION}') == 'bounded') "
                f"|| self.?polyTerm.orValue({POLY_TERM_DEFAULT}) in [0.0, {POLY_TERM_DEFAULT}]",
                "message": "spec.search.polyTerm applies to the bounded parameterization of the amlfs space only; "
                "set search.parameterization: bounded, or remove search.polyTerm",
                "fieldPath": ".polyTerm",
            },
        )
    )

    mode: Literal["search", "selection-only"] = Field(
        "search",
        description="search: sample losses around mu and "
        "update mu by REINFORCE. selection-only: every sample trains "
        "with the init loss and only best-of-B selection happens "
        "(the baseline every quality claim is measured against).",
        json_schema_extra=cel(immutable("spec.search.mode", "it fixes what mu means")),
    )
    space: SpaceName = Field(
        "amlfs",
        description="amlfs (piecewise-linear t and tau) or search-softmax.",
        json_schema_extra=cel(immutable("spec.search.space", "mu lives in this space")),
    )
    parameterization: Parameterization = Field(
        DEFAULT_PARAMETERIZATION,
        description="amlfs space only. bounded: t given by offsets at its knots, tau(p) = tau0 + (1 - tau0) p "
        "with a floor tau0 >= 0 (cross-entropy at tau0 = 0; bounded above 0, robust to label noise). monotone: "
        "continuous increasing t and tau given by offsets and log-slopes, tau(0) = 0. paper: independent slope "
        "and intercept per piece, as in the AM-LFS paper.",
        json_schema_extra=cel(immutable("spec.search.parameterization", "it fixes what mu means")),
    )
    prior_adjustment: bool = Field(
        True,
        description="bounded parameterisation: mu gets one more coordinate, the strength a of a logit adjustment "
        "(the loss sees the logits plus a log pi_c, pi_c the training split's class priors; see "
        "init.logitAdjustment), searched from init.logitAdjustment (0: plain). On balanced training data it "
        "changes nothing. On long-tailed data whose test is balanced, pair it with search.reward: "
        "neg-balanced-val-loss (plain accuracy on a long-tailed validation split rewards the head classes; "
        "balanced accuracy on a handful of rare-class validation examples is too noisy to move a).",
        json_schema_extra=cel(immutable("spec.search.priorAdjustment", "mu's dimension depends on it")),
    )
    poly_term: float = Field(
        POLY_TERM_DEFAULT,
        ge=-1.0,
        le=10.0,
        description="bounded parameterisation, search mode: every sampled loss adds polyTerm x (1 - p), Poly-1's "
        "term (Leng et al., ICLR 2022), fixed, so the search moves t, the floor and the prior coordinate around "
        "CE + polyTerm (1 - p) (measured: it gains under label noise, and on long tails with reward "
        "neg-balanced-val-loss, and costs nothing on clean data; see docs/results.md). 0: the search around the "
        "init loss alone. With init.preset poly1 the term is init.polyEpsilon. Other parameterisations do not "
        "take it.",
        json_schema_extra=cel(immutable("spec.search.polyTerm", "every sampled loss carries it")),
    )
    intervals: int = Field(
        6,
        ge=1,
        le=64,
        description="M, the number of equal pieces of t and tau (search-softmax: probability bins; 1 = one global a).",
        json_schema_extra=cel(
            (
                "self >= 1 && self <= 64",
                "spec.search.intervals must be between 1 and 64 "
                "(M pieces of t and tau); set intervals: 1 to 64, e.g. 6",
            ),
            immutable("spec.search.intervals", "mu's dimension depends on it"),
        ),
    )
    epochs: int = Field(
        10,
        ge=1,
        le=100000,
        description="Search epochs; each trains every sample one epoch. May be raised on a running or finished "
        "search to extend it. The LR schedule keeps the span the search began with (stored in its checkpoints), "
        "so added epochs train at the schedule's final LR (constant: optimizer.lr; step: lr x gamma per "
        "milestone; cosine: 0, which leaves the network as it is): set epochs when creating a cosine search.",
        json_schema_extra=cel(("self >= 1", "spec.search.epochs must be at least 1; set epochs: 1 or more")),
    )
    samples_per_epoch: int = Field(
        4,
        ge=2,
        le=256,
        description="B, samples of the loss per epoch.",
        json_schema_extra=cel(
            (
                "self >= 2",
                "spec.search.samplesPerEpoch must be at least 2 (B samples per epoch); set samplesPerEpoch: 2 or more",
            )
        ),
    )
    sigma: float = Field(
        0.2,
        gt=0.0,
        le=10.0,
        description="Std of the sampling distribution. May be changed on a running search: an epoch samples "
        "and updates mu with the sigma it was planned with, the next epoch uses the new one.",
        json_schema_extra=cel(
            (
                "self > 0.0",
                "spec.search.sigma must be greater than 0 (std of the sampling distribution); set e.g. sigma: 0.2",
            )
        ),
    )
    lr: float = Field(
        0.05,
        gt=0.0,
        le=10.0,
        description="Adam learning rate on mu.",
        json_schema_extra=cel(
            ("self > 0.0", "spec.search.lr must be greater than 0 (Adam learning rate on mu); set e.g. lr: 0.05")
        ),
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the whole search: samples, initial weights, data order.",
        json_schema_extra=cel(immutable("spec.search.seed", "the search replays from it")),
    )
    elitism: bool = Field(True, description="Sample 0 of every epoch is mu itself.")
    antithetic: bool = Field(
        True,
        description="Sampled losses come in mirrored pairs mu + sigma eps, mu - sigma eps (with elitism the pairs "
        "follow sample 0); with commonRandomNumbers a pair's reward difference is the loss's effect alone.",
        json_schema_extra=cel(immutable("spec.search.antithetic", "the search replays from it")),
    )
    common_random_numbers: bool = Field(
        True,
        description="search mode: the B samples of an epoch see the same batch order, augmentation and "
        "dropout (drawn from seed and epoch), so their rewards differ by the loss alone. selection-only "
        "mode always gives each sample its own order (its samples differ by nothing else).",
        json_schema_extra=cel(immutable("spec.search.commonRandomNumbers", "the search replays from it")),
    )
    mu_bound: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Trust region: every coordinate of mu stays within "
        "muBound of its initial value, so noisy rewards cannot drift the loss far away "
        "(0: unbounded, as in the paper).",
    )
    reward: Literal["accuracy", "balanced-accuracy", "accuracy+loss", "neg-val-loss", "neg-balanced-val-loss"] = Field(
        "accuracy",
        description="What a sample is rewarded (and the best sample chosen) by, on the validation split: "
        "accuracy; balanced-accuracy: the mean of the per-class recalls (long-tailed data whose test split is "
        "balanced: plain accuracy on a long-tailed validation split rewards the head classes); accuracy+loss: "
        "accuracy minus 0.01 x cross-entropy (the loss breaks ties between equal "
        "accuracies); neg-val-loss: minus the cross-entropy; neg-balanced-val-loss: minus the mean over classes of "
        "their mean cross-entropy (long-tailed data: a smoother signal than balanced accuracy where the rare "
        "classes have a handful of validation examples). The validation loss is always plain "
        "cross-entropy, whatever loss the sample trained with, so samples stay comparable.",
        json_schema_extra=cel(immutable("spec.search.reward", "rewards of different epochs are compared")),
    )
    min_samples: int = Field(1, ge=1, description="An epoch closes only with at least this many rewards.")
    max_retries: int = Field(2, ge=0, le=20, description="Re-runs of a sample that failed transiently.")
    logit_range: float = Field(
        10.0,
        gt=0.0,
        le=1000.0,
        description="Linear heads: t is piecewise-linear on "
        "[-logitRange, logitRange] and extends its end pieces beyond.",
        json_schema_extra=cel(immutable("spec.search.logitRange", "it fixes what mu means")),
    )
    init: InitSpec = Field(
        default_factory=InitSpec, json_schema_extra=cel(immutable("spec.search.init", "mu starts from it"))
    )

    @property
    def bounded(self) -> bool:
        """The bounded parameterisation of the amlfs space (the one with a floor, a prior coordinate and the
        Poly-1 term)."""
        return self.space == "amlfs" and self.parameterization == "bounded"

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if self.min_samples > self.samples_per_epoch:
            raise ValueError(
                f"minSamples ({self.min_samples}) must not exceed samplesPerEpoch ({self.samples_per_epoch})"
            )
        if not self.bounded and self.poly_term not in (0.0, POLY_TERM_DEFAULT):
            raise ValueError(
                "polyTerm applies to the bounded parameterization of the amlfs space only; set "
                "parameterization: bounded, or remove polyTerm"
            )
        return self


class StorageSpec(Model):
    """Where checkpoints, results and the history go."""

    uri: str = Field(
        "",
        description="s3://bucket/prefix or file:///path. Empty: the local runner's --workdir.",
        json_schema_extra=cel(
            (
                f"self == '' || self.matches('{STORAGE_URI_CEL}')",
                "spec.storage.uri must be empty, s3://bucket/prefix (bucket: 3-63 lowercase letters, "
                "digits, '.' or '-'), file:///path or an absolute path; fix the URI",
            )
        ),
    )
    endpoint: str = Field(
        "",
        description="S3 endpoint URL for S3-compatible servers (empty: AWS, or the operator's default). The "
        "trainer pods and the operator's own calls (promotions, history) both go there; the pods with "
        "secretName's credentials, the operator with its own.",
    )
    region: str = Field("", description="S3 region (empty: from the environment).")
    secret_name: str = Field(
        "", description="Kubernetes Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for trainer pods."
    )
    delete_on_delete: bool = Field(False, description="Delete the search's objects when the resource is deleted.")

    @model_validator(mode="after")
    def _check(self) -> StorageSpec:
        if self.uri and not STORAGE_URI.match(self.uri):
            raise ValueError(f"uri {self.uri!r} is not s3://bucket/prefix, file:///path or an absolute path")
        return self


class ResourcesSpec(Model):
    """Resources of every trainer pod."""

    gpu: int = Field(
        1,
        ge=0,
        le=1,
        description="nvidia.com/gpu per trainer pod: 1 trains on it (and fails at once where CUDA is unusable), 0 "
        "on the CPU with the node's GPUs hidden. A trainer uses one GPU; to use a GPU for several samples, pack "
        "them with trainer.samplesPerPod.",
        json_schema_extra=cel(
            (
                "self <= 1",
                "spec.trainer.resources.gpu must be 0 or 1 (a trainer trains on one GPU); set 1, and pack samples "
                "onto it with spec.trainer.samplesPerPod",
            )
        ),
    )
    cpu: str = Field("4", description="CPU request and limit (the trainer's torch threads follow it).")
    memory: str = Field("16Gi", description="Memory request and limit.")
    ephemeral_storage: str = Field(
        "20Gi",
        description="ephemeral-storage request and limit, and the size limit of the pod's /tmp (the dataset "
        "downloaded from task.dataRoot, checkpoints on their way to storage).",
    )


class TrainerSpec(Model):
    """How each sample's trainer runs."""

    image: str = Field("amlfs-trainer:latest", description="Trainer image (entrypoint amlfs-trainer).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    active_deadline_seconds: int = Field(3600, ge=1, description="Kill a trainer pod that runs longer than this.")
    start_timeout_seconds: int = Field(
        900,
        ge=0,
        le=86400,
        description="Give up on a trainer pod whose container has not started this long after the pod was made "
        "(unschedulable, an image that cannot be pulled, a missing Secret): it fails and is retried up to "
        "search.maxRetries. Its waiting reason shows in the sample's status and the Degraded condition at once. "
        "The default leaves time to pull a CUDA image onto a new node; 0: wait forever (e.g. behind a queue).",
    )
    samples_per_pod: int = Field(
        1,
        ge=1,
        le=256,
        description="k, samples of an epoch trained by one pod: an epoch runs ceil(B/k) pods, each training its "
        "k losses from the same start checkpoint in one process (vectorised on a GPU). Pays for small models and "
        "short epochs, where a pod's start-up outweighs its training; keep 1 for a model that fills a GPU. The "
        "pod's resources are the whole pack's. A change applies from the next epoch.",
    )
    metrics_port: int = Field(9400, ge=0, le=65535, description="Port of the trainer's /metrics (0: off).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of the trainer container."
    )
    pod_template: dict[str, Any] = Field(
        default_factory=dict,
        description="A partial Pod (metadata and spec) "
        "merged into every trainer pod: nodeSelector, tolerations, affinity, "
        "labels/annotations (e.g. a Kueue queue name), priorityClassName, "
        "schedulerName, resources, volumes.",
    )


class LossSearchSpec(Model):
    """What to search: the task, the network, its optimiser, the search, where results go, how trainers run."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            # `.?` / orValue: the API server also checks the `default: {}` of spec, before nested defaults fill it in
            {
                "rule": "self.?search.?init.?preset.orValue('') != 'arcface' "
                "|| self.?model.?head.orValue('') == 'cosine'",
                "message": "spec.search.init.preset arcface needs spec.model.head: cosine; set model.head: cosine "
                "or pick another preset",
                "fieldPath": ".search.init.preset",
            },
            {
                "rule": "self.?search.?mode.orValue('search') != 'search' "
                "|| self.?search.?init.?preset.orValue('') != 'label-smoothing'",
                "message": "spec.search.init.preset label-smoothing is not a loss of the target probability, so no "
                "search space can start from it; use it with search.mode: selection-only",
                "fieldPath": ".search.init.preset",
            },
            {
                "rule": "self.?search.?mode.orValue('search') != 'search' "
                "|| self.?search.?space.orValue('amlfs') != 'amlfs' "
                "|| self.?search.?init.?preset.orValue('softmax') == 'label-smoothing' || "
                + " || ".join(
                    f"(self.?search.?parameterization.orValue('{DEFAULT_PARAMETERIZATION}') == '{par}' "
                    f"&& self.?search.?init.?preset.orValue('softmax') in {list(names)})"
                    for par, names in REPRESENTABLE.items()
                ),
                "message": "spec.search.init.preset is not representable in spec.search.parameterization (monotone "
                "starts from softmax, cosface, arcface, focal, sce or poly1; bounded from softmax, cosface, arcface, "
                "gce, mae or poly1; paper from all but label-smoothing); use another search.parameterization or "
                "search.mode: selection-only",
                "fieldPath": ".search.init.preset",
            },
            {
                "rule": "self.?task.?kind.orValue('classification') == 'classification' "
                "|| self.?search.?reward.orValue('accuracy') == 'accuracy'",
                "message": "spec.search.reward accuracy+loss and neg-val-loss apply to classification only (retrieval "
                "and verification are rewarded by spec.task.reward); use search.reward: accuracy",
                "fieldPath": ".search.reward",
            },
            {
                "rule": "self.?trainer.?samplesPerPod.orValue(1) <= self.?search.?samplesPerEpoch.orValue(4)",
                "message": "spec.trainer.samplesPerPod must not exceed spec.search.samplesPerEpoch (a pod packs "
                "samples of one epoch); lower trainer.samplesPerPod",
                "fieldPath": ".trainer.samplesPerPod",
            },
            {
                "rule": "self.?search.?space.orValue('') != 'search-softmax' || self.?search.?mode.orValue('') != "
                "'search' || self.?search.?init.?preset.orValue('softmax') == 'softmax'",
                "message": "spec.search.init.preset must be softmax when spec.search.space is search-softmax "
                "(other presets are not representable there); set search.init.preset: softmax",
                "fieldPath": ".search.init.preset",
            },
        )
    )

    task: TaskSpec = Field(
        default_factory=TaskSpec, json_schema_extra=cel(immutable("spec.task", "every epoch trains on the same data"))
    )
    model: ModelSpec = Field(
        default_factory=ModelSpec,
        json_schema_extra=cel(immutable("spec.model", "every epoch resumes the same network")),
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    suspend: bool = Field(False, description="Pause between epochs; running samples finish.")

    @property
    def reward_metric(self) -> str:
        """The name of the validation metric that is a sample's reward: search.reward for classification,
        the task's metric (task.reward or its kind's default) otherwise."""
        return self.search.reward if self.task.kind == "classification" else self.task.reward_metric

    @model_validator(mode="after")
    def _check(self) -> LossSearchSpec:
        init = self.search.init
        if init.preset == "arcface" and self.model.head != "cosine":
            raise ValueError("search.init.preset arcface needs model.head: cosine")
        if self.search.space == "search-softmax" and self.search.mode == "search" and init.preset != "softmax":
            raise ValueError(f"search.init.preset {init.preset} is not representable in search-softmax; use softmax")
        if self.search.mode == "search" and init.preset == "label-smoothing":
            raise ValueError(
                "search.init.preset label-smoothing is not a loss of the target probability, so no search space "
                "can start from it; use it with search.mode: selection-only"
            )
        if self.task.kind != "classification" and self.search.reward != "accuracy":
            raise ValueError(
                f"search.reward {self.search.reward} applies to classification only (retrieval and verification are "
                "rewarded by task.reward); use search.reward: accuracy"
            )
        if self.trainer.samples_per_pod > self.search.samples_per_epoch:
            raise ValueError(
                f"trainer.samplesPerPod ({self.trainer.samples_per_pod}) must not exceed search.samplesPerEpoch "
                f"({self.search.samples_per_epoch}): a pod packs samples of one epoch; lower trainer.samplesPerPod"
            )
        par = self.search.parameterization
        if (
            self.search.mode == "search"
            and self.search.space == "amlfs"
            and init.preset != "label-smoothing"
            and init.preset not in REPRESENTABLE[par]
        ):
            raise ValueError(
                f"search.init.preset {init.preset} is not representable in the {par} parameterization (it starts "
                f"from {', '.join(REPRESENTABLE[par])}); use another search.parameterization or search.mode: "
                "selection-only"
            )
        return self


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=40)]
    namespace: str = "default"


class LossSearch(Model):
    """A LossSearch runs an AM-LFS loss-function search: each epoch trains B samples of a parametric loss
    from a shared checkpoint, rewards them by validation accuracy and moves the sampling distribution's
    mean mu by REINFORCE."""

    api_version: Literal["amlfs.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LossSearch"]
    metadata: Metadata
    spec: LossSearchSpec = Field(default_factory=LossSearchSpec)

    @model_validator(mode="after")
    def _check(self) -> LossSearch:
        if not NAME.match(self.metadata.name):
            raise ValueError(f"metadata.name {self.metadata.name!r} must be lowercase letters, digits and '-'")
        return self


# --- which fields are immutable, read from the markers above ------------------------------------------


def _marked_immutable(extra: Any) -> bool:
    rules = extra.get("x-kubernetes-validations", []) if isinstance(extra, dict) else []
    return any(isinstance(r, dict) and r.get("rule") == IMMUTABLE_RULE for r in rules)


def immutable_paths(model: type[BaseModel] = LossSearchSpec, prefix: str = "") -> list[str]:
    """Dotted camelCase paths below `spec` of every field marked `immutable(...)` (on the field or on its
    model), in field order. A marked field is frozen as a whole, so nothing below it is listed."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{f.alias or name}"
        sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        on_model = sub is not None and _marked_immutable(sub.model_config.get("json_schema_extra"))
        if on_model or _marked_immutable(f.json_schema_extra):
            out.append(path)
        elif sub is not None:
            out.extend(immutable_paths(sub, f"{path}."))
    return out


# --- loading with one-line errors -------------------------------------------------------------

_FIXES = {
    "greater_than": "use a value > {gt}",
    "greater_than_equal": "use a value >= {ge}",
    "less_than": "use a value < {lt}",
    "less_than_equal": "use a value <= {le}",
    "literal_error": "use one of {expected}",
    "extra_forbidden": "remove it (unknown field)",
    "missing": "add it",
}


def _field_path(loc: tuple[Any, ...], prefix: str) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts)


def explain(err: ValidationError, prefix: str = "") -> str:
    """One line for the first validation error: `field: problem (got X); fix`."""
    e = err.errors()[0]
    where = _field_path(tuple(x for x in e["loc"] if x not in ("function-after",)), prefix)
    ctx = e.get("ctx") or {}
    fix = _FIXES.get(e["type"], "").format(**{k: v for k, v in ctx.items()}) if e["type"] in _FIXES else ""
    msg = str(ctx.get("error", e["msg"])) if e["type"] == "value_error" else e["msg"]
    got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
    return f"{where or 'manifest'}: {msg}{got}" + (f"; {fix}" if fix else "")


def parse_manifest(data: Any, source: str = "manifest") -> LossSearch:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a LossSearch mapping, got {type(data).__name__}")
    try:
        return LossSearch.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {explain(err)}") from None


def load_manifest(path: str | Path) -> LossSearch:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the manifest ({exc.strerror}); check the path") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{p}: malformed YAML{where}: {problem}; fix the syntax") from None
    if len(docs) != 1:
        raise SpecError(f"{p}: expected exactly one LossSearch document, found {len(docs)}")
    return parse_manifest(docs[0], str(p))


# fields added to the spec later, with the values a search begun before them ran with
LEGACY: dict[str, dict[str, Any]] = {
    "search": {
        "commonRandomNumbers": False,
        "antithetic": False,
        "reward": "accuracy",
        "priorAdjustment": False,
        "polyTerm": 0.0,
    },
    "task": {
        "kind": "classification",
        "reward": "",
        "heldOutClasses": 0,
        "imageSize": [],
        "randomErasing": 0.5,
        "pairs": {"file": "", "imagesRoot": ""},
    },
    "model": {"bnNeck": False},
}


def as_begun(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored spec (JSON, camelCase) with every field it predates filled in as its search ran with it."""
    return doc | {key: LEGACY[key] | (doc.get(key) or {}) for key in LEGACY}


def spec_from_json(text: str, source: str = "spec") -> LossSearchSpec:
    try:
        return LossSearchSpec.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise SpecError(f"{source}: not valid JSON ({exc.msg}); pass the LossSearch spec as JSON") from None
    except ValidationError as err:
        raise SpecError(f"{source}: {explain(err, 'spec')}") from None


def spec_to_json(spec: LossSearchSpec) -> str:
    return spec.model_dump_json(by_alias=True)
