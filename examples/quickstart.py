"""Anti-alias a torchvision ResNet-50 and check that nothing else changed.

Run: python examples/quickstart.py
"""

import torch
import torchvision

import fxblur

model = torchvision.models.resnet50().eval()  # random weights: nothing is downloaded
blurred = fxblur.transform(model)  # prints the change report

x = torch.randn(1, 3, 224, 224)
print("output shape:", tuple(blurred(x).shape), "(original:", tuple(model(x).shape), end=")\n")
print("same state_dict keys:", list(blurred.state_dict()) == list(model.state_dict()))
print("parameters shared with the original:", blurred.fc.weight is model.fc.weight)
