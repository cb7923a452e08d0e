"""PyTorch twins of jaxclf's CNN and ResNet (same layers, widths and parameter counts), used only
by benchmarks as a baseline. Never imported by jaxclf/ or serving/."""
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
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.b1(self.c1(x)))
    y = self.b2(self.c2(y))
    return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class ResNet18(nn.Module):
  """Small-input stem (3x3/1 conv, no pool), stages (2, 2, 2, 2), as jaxclf's resnet18 stem='small'."""

  def __init__(self, num_classes=10, width=64, in_ch=1):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                              nn.ReLU(inplace=True))
    blocks, c = [], width
    for i, n in enumerate((2, 2, 2, 2)):
      for j in range(n):
        out = width * 2**i
        blocks.append(BasicBlock(c, out, 2 if i > 0 and j == 0 else 1))
        c = out
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(c, num_classes)

  def forward(self, x):
    return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def sgd_train_step(model, batch, size=28, in_ch=1):
  """One-call PyTorch train step on a synthetic batch with configs/cnn.py's optimizer and loss
  (SGD-Nesterov, weight decay off BN and biases, label smoothing 0.1): the benches' baseline."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                         {"params": no_decay, "weight_decay": 0}], lr=0.05, momentum=0.9,
                        nesterov=True)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
  x = torch.randn(batch, in_ch, size, size).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))

  def one():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return one
