"""models.py: key/shape parity with HRNet-seg and torchvision, output sizes, a 1-batch overfit (strict loading of
these backbones: test_checkpoints.py)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import small_hrnet
from models import HRNetNeck, build_backbone, build_model

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")  # see testdata/README.md
PRESETS = {"hrnet18_small_v2": "w18_small_v2", "hrnet18": "w18", "hrnet32": "w32", "hrnet48": "w48"}


def reference(preset):
    path = os.path.join(REF, f"hrnet_{PRESETS[preset]}_keys.json")
    with open(path) as f:
        return json.load(f)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- parity with the references

@pytest.mark.parametrize("preset", list(PRESETS))
def test_hrnet_keys_shapes_order_and_counts_match_hrnet_seg(preset):
    ref = reference(preset)
    net = build_backbone(preset)
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert ours == ref["backbone"]                                    # every key, shape, in order
    assert len(ours) == ref["num_tensors_backbone_state_dict"]
    assert num_params(net) == ref["num_params_backbone"]
    assert sum(b.numel() for b in net.buffers()) == ref["num_buffer_elems_backbone"]


def test_hrnet_neck_is_stride4_concat_of_15_widths():
    ref = reference("hrnet18_small_v2")["forward_check"]              # input (1,3,128,256) -> stride 4
    net = small_hrnet()
    neck = HRNetNeck(net.channels)
    with torch.no_grad():
        xs = net(torch.randn(ref["input"]))
        y = neck(xs)
    assert [x.shape[1] for x in xs] == [18, 36, 72, 144]
    assert list(y.shape) == [1, 15 * 18] + ref["output"][2:]
    assert torch.equal(y[:, :18], xs[0])                              # branch 1 is not resampled


def test_hrnet_tiny_is_the_same_network_with_a_narrow_stem_and_branches():
    torch.manual_seed(0)
    net = build_backbone("hrnet_tiny").eval()
    with torch.no_grad():
        xs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(x.shape[1:]) for x in xs] == [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]
    assert net.conv2.weight.shape == (32, 32, 3, 3) and net.layer1[0].conv3.weight.shape == (128, 32, 1, 1)
    assert len(net.layer1) == 1 and [len(net.stage2), len(net.stage3), len(net.stage4)] == [1, 1, 1]
    # same parameter names as the full HRNet, a subset of them (fewer modules / blocks)
    assert set(net.state_dict()) <= set(build_backbone("hrnet18").state_dict())


@pytest.mark.parametrize("name,params,tensors", [("resnet18", 11_176_512, 120), ("resnet50", 23_508_032, 318),
                                                 ("resnet101", 42_500_160, 624)])
def test_resnet_matches_torchvision_names_and_param_counts_without_fc(name, params, tensors):
    net = build_backbone(name)
    sd = net.state_dict()
    assert num_params(net) == params and len(sd) == tensors            # torchvision minus fc.weight, fc.bias
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.conv1.weight"].shape == ((64, 64, 3, 3) if name == "resnet18" else (64, 64, 1, 1))
    if name == "resnet18":
        assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
        assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    else:
        assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
        assert sd["layer1.0.downsample.1.running_var"].shape == (256,)
    assert not any(k.startswith(("fc.", "avgpool")) for k in sd)


@pytest.mark.parametrize("output_stride,dilations", [(8, (2, 4)), (16, (1, 2))])
def test_resnet_output_stride_replaces_stride_by_dilation(output_stride, dilations):
    net = build_backbone("resnet18", output_stride=output_stride).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 512, 64 // output_stride, 96 // output_stride)
    assert (net.layer3[1].conv1.dilation[0], net.layer4[1].conv1.dilation[0]) == dilations
    assert net.layer4[0].conv1.dilation[0] == dilations[0]            # first block keeps the previous dilation


# ----------------------------------------------------------------------------- SegModel

@pytest.mark.parametrize("backbone", ["hrnet18_small_v2", "resnet18"])
def test_scores_at_input_resolution_for_odd_sizes(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, head="softmax", num_classes=5).eval()
    with torch.no_grad():
        scores = model(torch.randn(2, 3, 97, 131))["scores"]
    assert scores.shape == (2, 5, 97, 131)


def test_protoseg_training_dict_has_scores_at_input_resolution():
    torch.manual_seed(0)
    model = build_model("hrnet18_small_v2", head="protoseg", num_classes=3, num_prototypes=2).train()
    images, labels = torch.randn(2, 3, 65, 99), torch.randint(0, 3, (2, 65, 99))
    out = model(images, labels)
    assert out["scores"].shape == (2, 3, 65, 99)
    assert out["proto_sim"].shape[1] == 3 * 2                         # other entries untouched
    feature_size = out["proto_sim"].shape[2:]
    out = model.eval()(images)
    assert out.keys() == {"scores", "embed"}                          # eval: nothing for the losses or Eq. 14
    assert out["embed"].shape[:2] == (2, 270) and out["embed"].shape[2:] == feature_size


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("resnet18", head="softmax", num_classes=3).train()
    images = torch.randn(2, 3, 64, 64)
    # random class per 16x16 cell: learnable from stride-8 features, unlike per-pixel noise
    labels = F.interpolate(torch.randint(0, 3, (2, 1, 4, 4)).float(), size=(64, 64), mode="nearest")[:, 0].long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images)["scores"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(images)["scores"].argmax(1) == labels).float().mean().item()
    assert losses[-1] < 0.2 * losses[0], losses[::5]
    assert acc > 0.9, acc
