"""`jaxclf weights convert` against PyTorch: torchvision-layout ResNet-18/50 and VGG-11/16-BN written
here with torchvision's exact module names and shapes (torchvision does not install beside the torch
2.13 CPU wheel; bench/torch_models.py writes its baselines the same way), random weights and
randomised BatchNorm statistics, saved as zip .pth, legacy .pth and .safetensors, converted, loaded
through model.pretrained's path and compared: logits for ResNet, the `features` map for VGG.

Needs torch and safetensors (the bench extra, `scripts/setup.sh --bench`; scripts/test.sh installs it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
# scripts/test.sh installs both (setup.sh --bench): missing, the install is broken (an error,
# not a skip).
import safetensors.torch as safetensors_torch
import torch

from jaxclf.models import create_model
from jaxclf.models.pretrained import load_pretrained
from jaxclf.models.weights import convert_file, read_converted

nn = torch.nn

# ----------------------------------------------------------------------------- torchvision twins


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


VGG_CFG = {"vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
           "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                        512, 512, 512, "M"]}


class VGG(nn.Module):
  """torchvision's VGG with batch_norm=True. `hidden` is 4096 there; the converter drops the
  classifier (its keys are checked by name only), so the test uses 16 to keep the file small."""

  def __init__(self, cfg, hidden=16, num_classes=1000):
    super().__init__()
    layers, c = [], 3
    for v in cfg:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        c = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, num_classes))


def randomise_batchnorm(model, seed):
  """So that eval-mode BatchNorm is not the identity: random affine and running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(7)
  return model.eval()


TORCH_MODELS = {
    "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
    "vgg11_bn": lambda: VGG(VGG_CFG["vgg11_bn"]),
    "vgg16_bn": lambda: VGG(VGG_CFG["vgg16_bn"]),
}


def save(state, path, fmt):
  if fmt == "safetensors":
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  else:
    torch.save(state, str(path), _use_new_zipfile_serialization=fmt == "zip")
  return str(path)


@pytest.fixture(scope="module", autouse=True)
def _few_torch_threads():
  old = torch.get_num_threads()
  torch.set_num_threads(1)  # the CPU is shared with jax and other tests
  yield
  torch.set_num_threads(old)


def reference(arch, seed=0, size=64):
  torch.manual_seed(seed)
  model = randomise_batchnorm(TORCH_MODELS[arch](), seed)
  x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
  with torch.no_grad():
    out = model(x) if arch.startswith("resnet") else model.features(x)
  return model, x.numpy(), out.numpy()


def flax_output(arch, npz, x_nchw, num_classes=1000):
  kwargs = {"stem": "imagenet"} if arch.startswith("resnet") else {"features_only": True}
  model = create_model(arch.replace("_bn", ""), num_classes=num_classes, **kwargs)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  variables = load_pretrained(npz, model, abstract, num_classes)  # model.pretrained's path
  out = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  return out if out.ndim == 2 else out.transpose(0, 3, 1, 2)  # NHWC features -> NCHW


def assert_close(got, want, rel=1e-4):
  assert got.shape == want.shape
  scale = float(np.abs(want).max())
  assert scale > 1e-2  # random BN statistics keep the activations far from zero
  err = float(np.abs(got - want).max())
  print(f"max abs diff {err:.3g}, max |ref| {scale:.3g}, relative {err / scale:.2g}")
  assert err <= rel * scale, f"max abs diff {err:.3g} vs max |ref| {scale:.3g}"


# ----------------------------------------------------------------------------- parity


def test_resnet18_logits_match_torch_from_every_file_format(tmp_path):
  model, x, want = reference("resnet18")
  state = model.state_dict()
  converted = {}
  for fmt in ("zip", "legacy", "safetensors"):
    src = save(state, tmp_path / f"r18_{fmt}.{'safetensors' if fmt == 'safetensors' else 'pth'}",
               fmt)
    out = str(tmp_path / f"r18_{fmt}.npz")
    meta = convert_file(src, "resnet18", out)
    assert meta["source_format"] == {"zip": "torch-zip", "legacy": "torch-legacy"}.get(fmt, fmt)
    converted[fmt] = read_converted(out)[0]
  # The three readers give bit-identical arrays; one logits comparison then covers all three.
  for fmt in ("legacy", "safetensors"):
    assert converted[fmt].keys() == converted["zip"].keys()
    for k, v in converted["zip"].items():
      np.testing.assert_array_equal(converted[fmt][k], v, err_msg=f"{fmt} {k}")
  assert_close(flax_output("resnet18", str(tmp_path / "r18_zip.npz"), x), want)


def test_resnet50_logits_match_torch(tmp_path):
  model, x, want = reference("resnet50", seed=3)
  src = save(model.state_dict(), tmp_path / "r50.safetensors", "safetensors")
  convert_file(src, "resnet50", str(tmp_path / "r50.npz"))
  assert_close(flax_output("resnet50", str(tmp_path / "r50.npz"), x), want)


@pytest.mark.parametrize("arch,fmt", [("vgg11_bn", "legacy"), ("vgg16_bn", "zip")])
def test_vgg_bn_features_match_torch(tmp_path, arch, fmt):
  """torchvision's conv biases are folded into the BatchNorm mean, so this checks the fold too."""
  model, x, want = reference(arch, seed=5, size=32)
  assert float(model.features[0].bias.detach().abs().max()) > 0.01  # torch's init: a real bias to fold
  src = save(model.state_dict(), tmp_path / f"{arch}.pth", fmt)
  convert_file(src, arch, str(tmp_path / f"{arch}.npz"))
  assert want.shape == (2, 512, 1, 1)
  assert_close(flax_output(arch, str(tmp_path / f"{arch}.npz"), x), want)


def test_transfer_to_ten_classes_keeps_a_fresh_head_and_the_backbone(tmp_path):
  model, _, _ = reference("resnet18", seed=1)
  src = save(model.state_dict(), tmp_path / "r18.pth", "zip")
  convert_file(src, "resnet18", str(tmp_path / "r18.npz"))
  flax_model = create_model("resnet18", num_classes=10, stem="imagenet")
  fresh = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                 train=False))  # shapes only: a fast stand-in
  loaded = load_pretrained(str(tmp_path / "r18.npz"), flax_model, fresh, 10)
  assert loaded["params"]["Dense_0"]["kernel"] is fresh["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(loaded["params"]["conv_init"]["kernel"]),
                                model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(loaded["batch_stats"]["ResNetBlock_7"]["BatchNorm_1"]
                                           ["var"]), model.layer4[1].bn2.running_var.numpy())
