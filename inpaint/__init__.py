"""inpaint: image inpainting with a U-Net fused with a ConvMixer encoder, trained with Ray on CPU clusters."""

from inpaint.vision import import_torchvision

# First, so that every later `import torchvision` (ours, torchmetrics', mlflow's) finds it importable.
import_torchvision()

__version__ = "0.1.0"
