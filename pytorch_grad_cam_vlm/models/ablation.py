"""Ablation layers that let grad-cam's AblationCAM ablate channels of a decoder layer's token sequence."""
from __future__ import annotations

from pytorch_grad_cam.ablation_layer import AblationLayer


class TokenAblationLayer(AblationLayer):
    """Stands in for a decoder layer during AblationCAM: returns the layer's cached output with one hidden channel
    set to zero at the image positions (the positions the map is drawn on), one channel per batch row.

    Zero, not grad-cam's "minimum minus 1e7": decoder hidden states go through RMSNorm, where a huge value in one
    channel would swamp all the others instead of removing one.
    """

    def __init__(self, wrapper) -> None:
        super().__init__()
        self._wrapper = [wrapper]  # a list, so that the wrapper is not registered as a submodule

    def set_next_batch(self, input_batch_index: int, activations, num_channels_to_ablate: int) -> None:
        self.returns_tuple = isinstance(activations, tuple)
        hidden = activations[0] if self.returns_tuple else activations
        if hidden.dim() != 3:  # AblationCAM has put this layer in the model: take it out before refusing
            self._wrapper[0]._put_back_layers()
            raise ValueError("TokenAblationLayer ablates decoder layers (B, seq, C); vision blocks and mergers are "
                             "not supported by AblationCAM here (the model's layers are back in place): use a "
                             "gradient or score method for them.")
        self.activations = hidden[input_batch_index].detach().clone().unsqueeze(0).repeat(
            num_channels_to_ablate, 1, 1)

    def __call__(self, *args, **kwargs):
        output = self.activations.clone()
        positions = self._wrapper[0].layout.vision_positions.to(output.device)
        for row in range(output.size(0)):
            output[row, positions, int(self.indices[row])] = 0
        return (output,) if self.returns_tuple else output


class ViewAblationLayer(TokenAblationLayer):
    """:class:`TokenAblationLayer` for the LLaVA views: ablates channel ``c`` at the positions of the tokens the
    wrapper's ``view`` draws (with ``"combined"``, channels ``C..2C-1`` are the base image's channels ``0..C-1``);
    decoder layers only."""

    def set_next_batch(self, input_batch_index: int, activations, num_channels_to_ablate: int) -> None:
        hidden = activations[0] if isinstance(activations, tuple) else activations
        wrapper = self._wrapper[0]
        # Told by length and width: a vision block's rows can be as long as a short prompt (InternVL's one tile).
        decoder = (wrapper.layout.sequence_length, wrapper.model.config.text_config.hidden_size)
        if hidden.dim() != 3 or tuple(hidden.shape[1:]) != decoder:
            wrapper._put_back_layers()  # AblationCAM has put this layer in the model: take it out before refusing
            raise ValueError("ViewAblationLayer ablates decoder layers (B, seq, C); vision blocks and the projector "
                             "are not supported by AblationCAM here (the model's layers are back in place): use a "
                             "gradient or score method for them.")
        super().set_next_batch(input_batch_index, activations, num_channels_to_ablate)

    def __call__(self, *args, **kwargs):
        output = self.activations.clone()
        wrapper = self._wrapper[0]
        for row in range(output.size(0)):
            positions, channel = wrapper.ablation_target(int(self.indices[row]))
            output[row, positions.to(output.device), channel] = 0
        return (output,) if self.returns_tuple else output
