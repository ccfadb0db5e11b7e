"""The code runs on every torch of the range setup.py declares: 2.11 (stock CUDA images)
through the pinned release. Arguments that differ between them are chosen by feature."""

import re
import types

import torch
from packaging.requirements import Requirement

from ffn_dist import engines
from tests.conftest import REPO


class Torch211DDP:
    """DistributedDataParallel.__init__ as torch 2.11 declares it (no `forward_sync_buffers`,
    which 2.14 adds while deprecating `broadcast_buffers`; passing it failed on the first
    GPU), recording what it is given: an argument 2.11 lacks is a TypeError here too."""

    given = None

    def __init__(
        self,
        module,
        device_ids=None,
        output_device=None,
        dim=0,
        broadcast_buffers=True,
        init_sync=True,
        process_group=None,
        bucket_cap_mb=None,
        find_unused_parameters=False,
        check_reduction=False,
        gradient_as_bucket_view=False,
        static_graph=False,
        delay_all_reduce_named_params=None,
        param_to_hook_all_reduce=None,
        mixed_precision=None,
        device_mesh=None,
        skip_all_reduce_unused_params=False,
    ):
        Torch211DDP.given = dict(locals())


def test_ddp_is_given_only_arguments_torch_2_11_knows(monkeypatch):
    monkeypatch.setattr(engines, "DistributedDataParallel", Torch211DDP)
    model = torch.nn.Linear(2, 2)
    branch = types.SimpleNamespace(size=2, group="group")
    world = types.SimpleNamespace(device=torch.device("cuda", 1))  # the GPU path's arguments
    engines.DDPEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), branch, world, accumulation=1)
    assert Torch211DDP.given["broadcast_buffers"] is False  # buffers stay per replica
    assert Torch211DDP.given["device_ids"] == [1] and Torch211DDP.given["process_group"] == "group"


def test_buffer_sync_is_switched_off_by_the_argument_this_torch_has():
    assert engines.no_buffer_sync(Torch211DDP) == {"broadcast_buffers": False}
    installed = engines.no_buffer_sync(torch.nn.parallel.DistributedDataParallel)
    assert set(installed) <= {"broadcast_buffers", "forward_sync_buffers"} and list(installed.values()) == [
        False
    ]


def test_the_declared_range_holds_the_pinned_release_and_the_stock_image():
    setup = (REPO / "setup.py").read_text()
    declared = Requirement(re.search(r'"(torch[><=!,.\d]+)"', setup).group(1)).specifier
    pinned = re.search(r"^torch==(\S+)$", (REPO / "scripts" / "constraints.txt").read_text(), re.M).group(1)
    assert declared.contains(pinned) and declared.contains("2.11.0")
    assert declared.contains(torch.__version__.split("+")[0])
