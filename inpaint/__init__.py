"""inpaint: image inpainting with a U-Net fused with a ConvMixer encoder, trained with Ray on CPU clusters."""

from inpaint.runtime import import_torchvision

# The one thing importing the library does (inpaint.runtime): later imports of torchvision (ours,
# torchmetrics', mlflow's) find it importable beside the CPU build of torch.
import_torchvision()

__version__ = "0.1.0"
