"""The registries of plain data (ffn_dist/registry.py) and the builders that map their names
to code name the same things, and what a config may name is read from the registry."""

import dataclasses

import pytest

from ffn_dist import registry
from ffn_dist.config import ConfigError, load_config
from ffn_dist.data.sampling import ORDERS
from ffn_dist.losses import LOSS_BUILDERS, build_loss, probability_scale
from ffn_dist.models.heads import HEAD_CLASSES
from ffn_dist.stages.methods import FITS


@pytest.mark.parametrize(
    "entries, code",
    [(registry.LOSSES, LOSS_BUILDERS), (registry.HEADS, HEAD_CLASSES), (registry.METHODS, FITS)],
    ids=["losses", "heads", "methods"],
)
def test_every_registered_name_has_its_code_and_no_code_is_unregistered(entries, code):
    assert list(entries) == list(code)


def test_entries_declare_known_heads_orders_and_priors():
    assert all(set(loss.heads) <= set(registry.HEADS) for loss in registry.LOSSES.values())
    assert all(s.order in ORDERS for s in registry.SAMPLERS.values())
    entries = [*registry.LOSSES.values(), *registry.SAMPLERS.values(), *registry.METHODS.values()]
    assert all(entry.prior in registry.PRIORS for entry in entries)


def test_a_loss_added_to_the_registry_and_its_builder_is_configurable_and_trains(monkeypatch):
    """A new loss touches its registry entry and its builder, nothing else."""
    import torch

    from ffn_dist.losses import CELoss

    monkeypatch.setitem(registry.LOSSES, "dummy", registry.Loss(heads=("cosine",)))
    monkeypatch.setitem(LOSS_BUILDERS, "dummy", lambda counts, p: CELoss(len(counts)))
    with pytest.raises(ConfigError, match="loss dummy puts its margin on cosine logits"):
        load_config(None, ["branches.ce.loss=dummy"])  # its heads are read from the entry
    cfg = load_config(None, ["branches.ce.loss=dummy", "branches.ce.head=cosine"])
    loss = build_loss("dummy", [5, 3, 1], cfg.stage1, "cosine")
    assert loss.input_scale == cfg.stage1.cosine_s == probability_scale("dummy", "cosine", cfg.stage1)
    value = loss(torch.zeros(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]))
    value.backward()
    assert value.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_a_config_names_only_registered_methods():
    with pytest.raises(ConfigError, match="stage2.method"):
        load_config(None, ["stage2.method=nonesuch"])
    fields = {f.name: f for f in dataclasses.fields(load_config(None, []).stage2)}
    assert fields["method"].metadata["choices"] is registry.METHODS


def test_a_stage2_method_added_to_the_registry_and_its_fit_trains_and_is_recorded(
    tmp_path, demo_root, monkeypatch
):
    """A new stage-2 method touches its registry entry and its fit function, nothing else."""
    from ffn_dist.run.paths import classifier_variant, record_path
    from ffn_dist.stages.classifier import fit_classifier
    from ffn_dist.stages.methods import fit_ncm
    from tests.test_methods import synthetic_run

    monkeypatch.setitem(registry.METHODS, "dummy", registry.Method())
    monkeypatch.setitem(FITS, "dummy", fit_ncm)  # class means, under another name
    ncm, cache = synthetic_run(tmp_path / "ncm", demo_root, "stage2.method=ncm")
    dummy, _ = synthetic_run(tmp_path / "dummy", demo_root, "stage2.method=dummy")
    assert fit_classifier(dummy, cache)["test"] == fit_classifier(ncm, cache)["test"]
    assert classifier_variant(dummy).startswith("dummy/")
    assert record_path(dummy, "classifier", classifier_variant(dummy)).is_file()
