"""``python -m pytorch_grad_cam_vlm``: the ``pytorch-grad-cam-vlm`` command line."""
import sys

from pytorch_grad_cam_vlm.cli import main

sys.exit(main())
