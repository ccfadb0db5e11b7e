"""What a config may name, as plain data: the losses, heads and samplers of a stage-1 branch
and the stage-2 methods. Nothing here imports torch: the config is checked against these
names, and the builders (losses.build_loss, models.heads.HEAD_CLASSES, stages.methods.FITS)
map the same names to code (a test checks that the key sets are equal).

A training prior is the label distribution a classifier's scores are fitted to: `instance`
(the training counts, a long tail) or `class-balanced` (every class alike); `sqrt` draws
classes in proportion to the square root of their counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIORS = ("instance", "class-balanced", "sqrt")


@dataclass(frozen=True)
class Loss:
    heads: tuple[str, ...] = ("linear", "cosine")  # the heads it accepts
    # the stage-1 setting that scales its logits into probabilities; None: the head's own
    # (stage1.cosine_s on a cosine head, 1 on a linear one)
    scale: str | None = None
    reweightable: bool = False  # deferred re-weighting may set its class weights
    prior: str = "instance"


LOSSES = {
    "ce": Loss(reweightable=True),
    "kps": Loss(heads=("cosine",), scale="kps_s"),
    "ldam": Loss(heads=("cosine",), scale="ldam_s", reweightable=True),
    "balanced_softmax": Loss(prior="class-balanced"),
    "focal": Loss(reweightable=True),
    "class_balanced_ce": Loss(prior="class-balanced"),
    "logit_adjusted": Loss(prior="class-balanced"),
}
# margins on cosine logits, each with its own scale s
MARGIN_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.scale)
# class weights that deferred re-weighting sets
REWEIGHTABLE_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.reweightable)


@dataclass(frozen=True)
class Head:
    cosine: bool  # logits are cosines (a scale turns them into probabilities)


HEADS = {"linear": Head(cosine=False), "cosine": Head(cosine=True)}


@dataclass(frozen=True)
class Sampler:
    order: str  # the epoch order that draws it (data.sampling.ORDERS)
    prior: str


SAMPLERS = {
    "instance": Sampler("shuffle", "instance"),
    "class_balanced": Sampler("balanced", "class-balanced"),
    "sqrt": Sampler("sqrt", "sqrt"),
}


@dataclass(frozen=True)
class Method:
    """A stage-2 method. Its hyperparameters' grids are the config's `stage2.NAME` section (if
    it has one); `defaults` are the published values used without a val split. `cosine`: its
    logits are cosines trained at LDAM's scale s (probabilities are softmax(s x logits))."""

    defaults: dict = field(default_factory=dict)
    cosine: bool = False
    prior: str = "class-balanced"


METHODS = {
    "ffn": Method(cosine=True),
    "erm": Method(prior="instance"),
    "crt": Method(),
    "lws": Method(),
    "tau_norm": Method({"tau": 1.0}),
    "ncm": Method(),
    "logit_adjustment": Method({"tau": 1.0}),
    "balanced_softmax": Method(),
    "weight_balancing": Method({"weight_decay": 0.1, "max_norm": 0.1}),  # the authors' demo
    "mislas": Method({"head": 0.3, "tail": 0.0}),
    "disalign": Method({"rho": 1.0}),
    "ldam_drw": Method(cosine=True),
}
