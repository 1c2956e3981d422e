"""The reference for our speed: the same networks written in plain PyTorch.

Layer for layer the torchvision layouts of ResNet18 and DenseNet121 (without
importing torchvision, which does not install beside the CPU torch wheel
here), with the stems of `kerasrot.models`. Used only by `throughput.py`.
"""

import torch
from torch import nn


def _stem(kind, filters):
    if kind == "cifar":
        return [nn.Conv2d(3, filters, 3, padding=1, bias=False), nn.BatchNorm2d(filters), nn.ReLU()]
    return [
        nn.Conv2d(3, filters, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(filters),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(num_classes, stem_kind):
    layers, cin = _stem(stem_kind, 64), 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet121(num_classes, stem_kind, growth=32):
    layers, c = _stem(stem_kind, 2 * growth), 2 * growth
    for i, size in enumerate((6, 12, 24, 16)):
        for _ in range(size):
            layers.append(DenseLayer(c, growth))
            c += growth
        if i < 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


NETWORKS = {"resnet18": resnet18, "densenet121": densenet121}
