"""ShapleyCAM for models whose target layers need a reshape_transform (token sequences)."""
import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from pytorch_grad_cam_vlm.models.state import eager_attention


class ShapleyCAM(pytorch_grad_cam.ShapleyCAM):
    """grad-cam's ShapleyCAM, made to work on token models.

    - grad-cam keeps raw activations for this method (it needs their graph for the Hessian-vector product), and its
      ``get_cam_image`` then fails on ``(B, seq, C)`` outputs: here they are reshaped after the weights are computed.
    - The Hessian-vector product needs second derivatives, which PyTorch's fused attention kernels lack: a wrapped
      transformers model runs with eager attention during the call and gets its implementation back after.
    """

    def forward(self, input_tensor, targets, eigen_smooth=False):
        model = getattr(self.model, "model", None)
        try:
            if model is None or not hasattr(model, "set_attn_implementation"):
                return super().forward(input_tensor, targets, eigen_smooth)
            with eager_attention(model):
                return super().forward(input_tensor, targets, eigen_smooth)
        finally:
            # grad-cam's release() detaches the kept gradients in place, which autograd refuses for views: the
            # gradient of an output that only a view consumes (Mistral 3's last vision block, squeezed) is one.
            grads = self.activations_and_grads.gradients
            grads[:] = [g.clone() if isinstance(g, torch.Tensor) and g._is_view() else g for g in grads]

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
        weights = self.get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        reshape = self.activations_and_grads.reshape_transform
        if reshape is not None:
            activations = reshape(activations)
        weighted = weights[:, :, None, None] * activations.detach().cpu().numpy()
        return get_2d_projection(weighted) if eigen_smooth else np.asarray(weighted.sum(axis=1))
