from pathlib import Path

import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.models.checkpoints import load_checkpoint, save_checkpoint
from kdcache.models.factory import create_model, list_models

ZOO = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
    "ResNet18",
    "ResNet50",
]


def test_zoo_is_complete():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_forward_shape(name: str):
    model = create_model(name, 100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_reference_key_names():
    """Spot checks of the mdistiller/RepDistiller state-dict names that published checkpoints use."""
    keys = {
        n: set(create_model(n, 100).state_dict())
        for n in ("resnet32x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50")
    }
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer3.4.bn2.running_var", "fc.weight"} <= keys[
        "resnet32x4"
    ]
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.weight", "fc.bias"} <= keys[
        "wrn_40_2"
    ]
    assert {"block0.0.bias", "block0.4.running_mean", "block4.4.weight", "classifier.weight"} <= keys["vgg13"]
    assert {"conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"} <= keys[
        "MobileNetV2"
    ]
    assert {"layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"} <= keys["ShuffleV1"]
    assert {"layer1.0.conv5.weight", "layer2.7.bn3.bias", "conv2.weight", "linear.weight"} <= keys["ShuffleV2"]
    assert {"layer4.2.conv3.weight", "layer1.0.shortcut.0.weight", "linear.weight"} <= keys["ResNet50"]
    for name in ("ShuffleV1", "ShuffleV2"):  # both zoo ShuffleNets have a 1x1 stem
        assert create_model(name, 100).state_dict()["conv1.weight"].shape == (24, 3, 1, 1)


@pytest.mark.parametrize("layout", ["model", "state_dict", "bare", "module"])
def test_checkpoint_layouts_round_trip(tmp_path: Path, layout: str):
    torch.manual_seed(1)
    src = create_model("wrn_16_1", 10).eval()
    sd = src.state_dict()
    obj = {"model": sd, "epoch": 3} if layout == "model" else {"state_dict": sd} if layout == "state_dict" else sd
    if layout == "module":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(obj, tmp_path / "c.pth")
    dst = load_checkpoint(create_model("wrn_16_1", 10), tmp_path / "c.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_written_checkpoints_use_the_zoo_layout(tmp_path: Path):
    model = create_model("resnet8", 10)
    save_checkpoint(tmp_path / "s.pt", model, epoch=1)
    obj = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(obj) == {"model", "epoch"} and set(obj["model"]) == set(model.state_dict())


def test_checkpoint_of_another_architecture_names_it(tmp_path: Path):
    save_checkpoint(tmp_path / "w.pth", create_model("wrn_16_2", 100))
    with pytest.raises(KdcacheError, match="looks like a wrn_16_2 checkpoint"):
        load_checkpoint(create_model("resnet8", 100), tmp_path / "w.pth")


def test_wrong_class_count_is_a_shape_mismatch(tmp_path: Path):
    save_checkpoint(tmp_path / "r.pth", create_model("resnet8", 100))
    with pytest.raises(KdcacheError, match=r"shape mismatch \(fc.weight \(100, 64\) vs \(10, 64\)"):
        load_checkpoint(create_model("resnet8", 10), tmp_path / "r.pth")


def test_nan_weights_are_refused(tmp_path: Path):
    model = create_model("resnet8", 10)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "n.pth", model)
    with pytest.raises(KdcacheError, match="non-finite weights in fc.weight"):
        load_checkpoint(create_model("resnet8", 10), tmp_path / "n.pth")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KdcacheError, match="did you mean resnet32x4"):
        create_model("resnet32x5", 100)
    with pytest.raises(KdcacheError, match="torchvision.resnet34"):
        create_model("torchvision.resnet35", 1000)


def test_torchvision_models_by_name():
    model = create_model("torchvision.resnet18", 7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(KdcacheError, match="IMAGENET1K_V1"):
        create_model("torchvision.resnet18", 1000, weights="NOPE")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_checkpoint_of_every_architecture_reproduces_outputs(tmp_path: Path, name: str):
    torch.manual_seed(0)
    src = create_model(name, 100)
    for m in src.modules():  # trained-looking BN statistics so eval-mode outputs depend on them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    src.eval()
    torch.save({"model": src.state_dict(), "epoch": 240, "best_acc": 0.0}, tmp_path / "ckpt_epoch_240.pth")
    dst = load_checkpoint(create_model(name, 100), tmp_path / "ckpt_epoch_240.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
