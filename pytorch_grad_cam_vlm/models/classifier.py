"""Image classifiers (torchvision and timm CNNs and ViTs) on the wrappers' shared base, with an automatic target layer.

The candidate layers (:attr:`ClassifierWrapper.layers`, which ``explain()`` and ``--layers`` index) are found by
architecture, and the automatic layer (:attr:`ClassifierWrapper.target_layer`) is the last of them, the one grad-cam's
documentation names:

- **ResNet-like** (a ``layer4``: torchvision ResNet / ResNeXt / Wide ResNet, timm ResNet): the last block of each of
  ``layer1..layer4``; auto ``layer4[-1]``.
- **A sequence of feature modules** (torchvision ``features``: VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt;
  timm ``stages`` or ``blocks``: ConvNeXt, EfficientNet, MobileNetV3, ...): the last module at each spatial resolution
  of its output, found by one forward pass at the input size; auto the last spatial one (``features[-1]``: VGG's last
  pool, DenseNet's ``norm5``; timm EfficientNet's ``bn2`` after its 1x1 ``conv_head``).
- **Any other CNN** (Inception-ResNet, Inception, RegNet, ...): the model's own child modules, read the same way;
  auto the last spatial one (``conv2d_7b`` of Inception-ResNet-v2, ``Mixed_7c`` of Inception-v3, ``s4`` of RegNet).
- **ViT** (torchvision ``encoder.layers``, timm ``blocks`` with ``norm1``): each block's first norm; auto the last
  block's (``encoder.layers[-1].ln_1``, ``blocks[-1].norm1``), as grad-cam's documentation recommends;
  :meth:`ClassifierWrapper.reshape_transform` drops the class (and register) tokens and lays the patches on their grid.

Preprocessing is the model's own default: torchvision's ``weights.transforms()`` of the architecture (resize the
shorter side, center crop, ImageNet mean and std; e.g. 256 -> 224 bilinear, EfficientNet bicubic, ConvNeXt 236), timm's
``resolve_data_config`` + ``create_transform``. ``image_size`` keeps the resize-to-crop ratio at another crop size.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.base import ModelWrapper
from pytorch_grad_cam_vlm.models.frame import ImageFrame, center_crop_frame
from pytorch_grad_cam_vlm.models.state import explaining

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("torchvision", "timm")


class ClassifierProcessor:
    """Stands where a VLM's processor does (``processor.image_processor.image_mean``): the preprocessing
    ``transform`` (PIL image -> normalised ``(3, H, W)``), its mean, std and crop size, and ``resize_size``, the
    shorter side the transform resizes to before its center crop (torchvision's rounding), which places maps on the
    user's image (``None``: the transform is something else, and maps stay on its output)."""

    def __init__(self, transform: Callable, image_mean: Sequence[float], image_std: Sequence[float],
                 crop_size: int, resize_size: Optional[int] = None) -> None:
        self.transform = transform
        self.image_mean, self.image_std = [float(v) for v in image_mean], [float(v) for v in image_std]
        self.crop_size = int(crop_size)
        self.resize_size = None if resize_size is None else int(resize_size)

    @property
    def image_processor(self) -> "ClassifierProcessor":
        return self


def source_of(model: torch.nn.Module) -> str:
    """``"timm"`` or ``"torchvision"``, by where the model's class is defined (other models count as torchvision)."""
    return "timm" if type(model).__module__.startswith("timm.") else "torchvision"


def default_processor(model: torch.nn.Module, name: Optional[str] = None,
                      image_size: Optional[int] = None) -> ClassifierProcessor:
    """The model's default preprocessing (see the module's docstring). ``name``: the torchvision architecture
    (e.g. ``"resnet50"``) whose ``weights.transforms()`` to take; without it, 256 -> 224 bilinear (a ViT: its own
    ``image_size``). Reading the weights' transforms downloads nothing."""
    if source_of(model) == "timm":
        import timm.data

        config = timm.data.resolve_data_config({} if image_size is None else {"input_size": (3, image_size,
                                                                                               image_size)},
                                               model=model)
        transform = timm.data.create_transform(**config)
        crop = config["input_size"][-1]
        # timm's "center" mode (its default) resizes the shorter side to floor(crop / crop_pct), then center-crops.
        resize = (math.floor(crop / config["crop_pct"]) if config.get("crop_mode", "center") in (None, "center")
                  and config["input_size"][-1] == config["input_size"][-2] else None)
        return ClassifierProcessor(transform, config["mean"], config["std"], crop, resize)
    from torchvision.models import get_model_weights
    from torchvision.transforms import InterpolationMode

    crop, resize, interpolation = getattr(model, "image_size", 224), None, InterpolationMode.BILINEAR
    if name is not None:
        preset = get_model_weights(name).DEFAULT.transforms()
        crop, resize, interpolation = preset.crop_size[0], preset.resize_size[0], preset.interpolation
    resize = resize or round(crop * 256 / 224)
    if image_size is not None:
        crop, resize = int(image_size), round(image_size * resize / crop)
    return ClassifierProcessor(_torchvision_transform(crop, resize, interpolation), IMAGENET_MEAN, IMAGENET_STD, crop,
                               resize)


def _torchvision_transform(crop: int, resize: int, interpolation) -> Callable:
    """torchvision's ``ImageClassification`` preset: resize the shorter side (antialiased), center crop, to float
    in [0, 1], normalise with the ImageNet mean and std."""
    import torchvision.transforms.functional as TF

    def transform(image):
        image = TF.center_crop(TF.resize(image, [resize], interpolation=interpolation, antialias=True), [crop])
        tensor = TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float)
        return TF.normalize(tensor, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return transform


# ----------------------------------------------------------------------------------------- layers by architecture
def vit_blocks(model: torch.nn.Module) -> Optional[Tuple[List[torch.nn.Module], List[torch.nn.Module], int, int]]:
    """``(blocks, norms, prefix tokens, patch size)`` of a torchvision or timm ViT, else ``None``."""
    if hasattr(model, "encoder") and hasattr(model, "class_token"):  # torchvision VisionTransformer
        blocks = list(model.encoder.layers)
        return blocks, [b.ln_1 for b in blocks], 1, int(model.patch_size)
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(model, "patch_embed") and hasattr(blocks[0], "norm1"):  # timm ViT
        patch = model.patch_embed.patch_size
        return list(blocks), [b.norm1 for b in blocks], int(getattr(model, "num_prefix_tokens", 1)), int(patch[0])
    return None


def feature_sequence(model: torch.nn.Module) -> Tuple[List[torch.nn.Module], List[torch.nn.Module]]:
    """``(modules in execution order, tail modules after them)`` of a CNN's spatial feature path."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)], []
    for attribute in ("features", "stages", "blocks"):
        sequence = getattr(model, attribute, None)
        if isinstance(sequence, (torch.nn.Sequential, torch.nn.ModuleList)) and len(sequence):
            tail = [getattr(model, n) for n in ("conv_head", "bn2", "norm_pre") if isinstance(
                getattr(model, n, None), torch.nn.Module) and not isinstance(getattr(model, n), torch.nn.Identity)]
            return list(sequence), tail
    if getattr(model, "output_fmt", "NCHW") != "NCHW":  # timm's channels-last models (Swin): no (B, C, h, w) maps
        raise InputError(f"No automatic target layer for {type(model).__name__}: its features are channels-last "
                         f"({model.output_fmt}); pass target layers and a reshape_transform yourself.")
    # Inception-ResNet, Inception, RegNet, ...: the model's own modules, in the order they are registered (their
    # order of execution in these architectures); those that do not run at inference (auxiliary heads) drop out.
    return [m for m in model.children() if not isinstance(m, torch.nn.Identity)], []


def output_shapes(model: torch.nn.Module, modules: Sequence[torch.nn.Module], size: int) -> Tuple[list, int]:
    """The output shape of each of ``modules`` (``None`` if it did not run) and the number of classes, from one
    forward pass of a zero image ``(1, 3, size, size)`` in eval mode without gradients (the model's modes kept)."""
    shapes = [None] * len(modules)

    def record(k):
        def hook(module, args, output):
            shapes[k] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        return hook
    handles = [m.register_forward_hook(record(k)) for k, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        with explaining(model, False), torch.no_grad():
            logits = model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes, int(logits.shape[-1])


def cnn_layers(model: torch.nn.Module, size: int) -> Tuple[List[torch.nn.Module], list, int]:
    """``(candidate layers, graph-start stages, classes)`` of a CNN: per :func:`feature_sequence`, the last module
    at each spatial resolution, then the last spatial tail module; each stage the run of modules that ends at a
    candidate (a ResNet stage: the whole ``layerN``)."""
    sequence, tail = feature_sequence(model)
    shapes, classes = output_shapes(model, sequence + tail, size)
    ran = [shape is not None for shape in shapes]  # an auxiliary head does not run in eval mode: left out
    sequence, tail = [m for m, r in zip(sequence, ran) if r], [m for m, r in zip(tail, ran[len(sequence):]) if r]
    shapes = [shape for shape in shapes if shape is not None]
    spatial = [len(s) == 4 and s[2] * s[3] > 1 if s else False for s in shapes]
    picks = [k for k in range(len(sequence)) if spatial[k]
             and (k + 1 == len(sequence) or not spatial[k + 1] or shapes[k + 1][2:] != shapes[k][2:])]
    tail_picks = [len(sequence) + k for k in range(len(tail)) if spatial[len(sequence) + k]]
    if tail_picks:
        picks.append(tail_picks[-1])
    if not picks:
        raise InputError(f"{type(model).__name__} has no spatial feature map at {size}x{size} pixels.")
    modules = sequence + tail
    resnet = hasattr(model, "layer4")
    layers = [modules[k][-1] if resnet else modules[k] for k in picks]
    stages, start = [], 0
    for k in picks:
        stages.append(tuple(modules[start:k + 1]))
        start = k + 1
    return layers, stages, classes


class ClassifierWrapper(ModelWrapper):
    """An image classifier for grad-cam and :func:`~pytorch_grad_cam_vlm.explain`: ``forward(x)`` takes normalised
    images ``(B, 3, H, W)`` (:meth:`preprocess`) and returns the logits ``(B, classes)`` float32.

    :attr:`layers` are the candidate layers, :attr:`target_layer` the automatic one (see the module's docstring);
    :meth:`reshape_transform` maps CNN feature maps as they are and ViT tokens onto the patch grid. While a forward
    pass runs the model is in eval mode with frozen parameters and no autograd graph before the shallowest hooked
    stage; afterwards its modes, ``requires_grad`` flags and hooks are as they were. FullGrad runs on CNNs only.
    """

    ablation_layer_type = AblationLayer
    refuses_fullgrad = False

    def __init__(self, model: torch.nn.Module, processor: Optional[ClassifierProcessor] = None,
                 class_names: Optional[Sequence[str]] = None, name: Optional[str] = None,
                 image_size: Optional[int] = None, efficient_gradients: bool = True) -> None:
        processor = processor or default_processor(model, name, image_size)
        super().__init__(model, processor, efficient_gradients)
        vit = vit_blocks(model)
        self.is_vit = vit is not None
        self.refuses_fullgrad = self.is_vit  # a ViT's only bias is its patch embedding's
        if vit is not None:
            self._stages, self._layers, self.prefix_tokens, self.patch_size = vit
            self.num_classes = output_shapes(model, [], processor.crop_size)[1]
        else:
            self._layers, self._stages, self.num_classes = cnn_layers(model, processor.crop_size)
            self.prefix_tokens, self.patch_size = 0, 1
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise InputError(f"{len(self.class_names)} class names for a model with {self.num_classes} outputs: give "
                             "one name per class, in the order of the model's outputs.")
        self._watch_layers(*{id(p): p for p in self._parents()}.values())
        self.grid: Optional[Tuple[int, int]] = None  # ViT: patches per side of the latest forward pass

    def _parents(self) -> List[torch.nn.Module]:
        """The modules whose children are the candidate layers (AblationCAM swaps those children)."""
        children = {id(c): m for m in self.model.modules() for c in m.children()}
        return [children[id(layer)] for layer in self._layers if id(layer) in children]

    @property
    def input_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layers(self) -> List[torch.nn.Module]:
        """The candidate layers in depth order, the automatic one last."""
        return list(self._layers)

    @property
    def target_layer(self) -> torch.nn.Module:
        """The automatic target layer: the last spatial feature block (CNN) or the last block's first norm (ViT)."""
        return self._layers[-1]

    @property
    def last_layer_blank(self) -> bool:
        """False: every candidate layer reaches the logits."""
        return False

    @property
    def token_cell(self) -> int:
        return self.patch_size

    def image_frame(self, image_size: Tuple[int, int], input_size: Tuple[int, int]) -> ImageFrame:
        """Where the input lies on the image (see :meth:`ModelWrapper.image_frame`): the default preprocessing
        resizes the shorter side to ``processor.resize_size`` and center-crops (torchvision's rounding); the rest of
        the image is not seen. A processor without ``resize_size`` has no known frame: explain its tensor."""
        if self.processor.resize_size is None:
            raise ValueError("This classifier's preprocessing is not a resize of the shorter side and a center crop, "
                             "so its maps cannot be placed on the image: pass the preprocessed tensor to explain, or "
                             "a ClassifierProcessor with resize_size.")
        crop = self.processor.crop_size
        return center_crop_frame(image_size, self.processor.resize_size, (crop, crop), round)

    def class_name(self, index: int) -> str:
        """The name of class ``index``: from ``class_names``, else the index itself."""
        return self.class_names[index] if self.class_names else str(index)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """The model's default preprocessing (resize, center crop, normalise) of one image, ``(1, 3, s, s)``."""
        return self.processor.transform(load_rgb(image))[None].float()

    def predict(self, x: torch.Tensor) -> Tuple[int, str, float]:
        """``(class index, name, softmax probability)`` of the first image of ``x``."""
        with torch.no_grad():
            probabilities = self(x[:1])[0].softmax(-1)
        index = int(probabilities.argmax())
        return index, self.class_name(index), float(probabilities[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x, self.patch_size)
        self.batch_size = x.shape[0]
        self.grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        with self._explaining(x.to(self.input_device), self._stages) as x:
            return self.model(x).float()

    def reshape_transform(self, output) -> torch.Tensor:
        """A layer's output to ``(B, C, h, w)`` float32: CNN feature maps as they are; ViT tokens ``(B, prefix +
        h*w, C)`` without the prefix (class, register) tokens, on the patch grid of the latest forward pass."""
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.dim() == 4:
            return hidden.float()
        if hidden.dim() != 3 or self.grid is None or hidden.shape[1] != self.prefix_tokens + self.grid[0] * self.grid[1]:
            raise ValueError(f"Cannot map an output of shape {tuple(hidden.shape)} to the image grid {self.grid}.")
        patches = hidden[:, self.prefix_tokens:].float()
        return patches.reshape(hidden.shape[0], *self.grid, -1).permute(0, 3, 1, 2)

    def ablation_layer(self) -> AblationLayer:
        """grad-cam's ablation layer for AblationCAM on this model: ``AblationLayerVit`` on ViT tokens."""
        return AblationLayerVit() if self.is_vit else AblationLayer()


# ----------------------------------------------------------------------------------------- loading
def is_classifier_spec(name: str) -> bool:
    """Whether a ``--model`` names a classifier architecture (``torchvision:NAME``, ``timm:NAME``)."""
    return isinstance(name, str) and name.split(":", 1)[0] in SOURCES and ":" in name


def read_class_names(path: str) -> List[str]:
    """One label per line (blank lines at the end ignored)."""
    if not os.path.isfile(path):
        raise InputError(f"Class names file not found: {path}")
    with open(path, encoding="utf-8") as f:
        names = [line.rstrip("\r\n") for line in f]
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise InputError(f"{path} holds no class names: write one label per line.")
    return names


def load_state_dict(path: str) -> dict:
    """A state dict from ``.safetensors`` or a ``.pth`` / ``.pt`` file read with ``torch.load(weights_only=True)``
    (tensors only, no code); a checkpoint dict holding it under ``state_dict`` or ``model`` is unwrapped."""
    if not os.path.isfile(path):
        raise InputError(f"Weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (unpickling refused, a broken file)
        raise InputError(f"Cannot read {path} as a state dict: {str(error).splitlines()[0]}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def build_classifier(spec: str, weights: Optional[str] = None, random_weights: bool = False,
                     num_classes: Optional[int] = None) -> Tuple[torch.nn.Module, str]:
    """``(model in eval mode, architecture name)`` of ``torchvision:NAME`` or ``timm:NAME``, built with random
    weights (nothing downloaded) and loaded from ``weights``. Without ``weights`` it refuses unless
    ``random_weights``."""
    source, name = spec.split(":", 1)
    if weights is None and not random_weights:
        raise InputError(f"--model {spec} needs --weights PATH (a state dict, .safetensors or .pth): random weights "
                         "explain nothing; pass --random-weights for a test run.")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    try:
        if source == "timm":
            try:
                import timm
            except ImportError as error:
                raise InputError("timm is not installed: pip install 'pytorch-grad-cam-vlm[timm]'.") from error
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            import torchvision
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    except (RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"Unknown {source} model {name!r}: {str(error).splitlines()[0]}") from error
    if weights is not None:
        try:
            model.load_state_dict(load_state_dict(weights))
        except RuntimeError as error:
            raise InputError(f"{weights} does not fit {spec}: {str(error).splitlines()[1].strip()} (a fine-tuned "
                             "head? --classes sets the number of classes)") from error
    return model.eval(), name
