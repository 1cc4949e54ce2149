"""Vision-language model: image -> patch encoder -> projector -> image tokens inside the GPT's sequence.

The LLaVA / nanoVLM layout. A text row carries ``image_tokens`` copies of the ``<|image|>`` token where an
image belongs (:meth:`MultimodalTransformer.expand_image_tokens` does the expansion); the encoder's output
vectors replace those embeddings in place, so the sequence length, the labels and the KV-cache generator stay
exactly as for text. Several images per row are allowed: images fill the ``<|image|>`` groups in reading order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogpt4.config import ModelConfig
from nanogpt4.errors import UserError
from nanogpt4.model.losses import linear_cross_entropy
from nanogpt4.model.transformer import Block, Transformer, model_section


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) table: half the channels encode the row, half the column, at geometric frequencies."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (ys.flatten(), xs.flatten()):
        angles = c[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.size(1)))


def conv_stem(channels: int, dim: int, patch: int) -> nn.Sequential:
    """3x3 conv + ReLU + 2x2 max-pool stages down to the patch grid, then a 1x1 projection: the "hybrid" ViT
    patch embedding (Dosovitskiy et al. 2021; Xiao et al. 2021). Stride-1 convolutions keep the few pixels a
    small shape has; from scratch this learns shapes several times faster than one strided patch projection."""
    n_down = patch.bit_length() - 1
    widths = [channels] + [min(dim, 32 << i) for i in range(n_down)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers.append(nn.Conv2d(widths[-1], dim, 1))
    return nn.Sequential(*layers)


class ViTEncoder(nn.Module):
    """Patch embedding (conv stem or one strided conv) + learned positions + bidirectional transformer
    blocks -> (N, patches, dim)."""

    def __init__(self, mm):
        super().__init__()
        grid = mm.image_size // mm.patch_size
        if mm.stem == "conv":
            self.patch_embed = conv_stem(mm.channels, mm.encoder_dim, mm.patch_size)
        else:
            self.patch_embed = nn.Conv2d(mm.channels, mm.encoder_dim, mm.patch_size, stride=mm.patch_size)
        # learned positions, started from 2D sin-cos at full amplitude (MAE's table): from random noise a small
        # ViT spends thousands of steps discovering that neighbouring patches are neighbours, and spatial
        # questions need the position of every object readable downstream
        self.pos = nn.Parameter(sincos_2d(grid, mm.encoder_dim)[None])
        block_cfg = ModelConfig(dim=mm.encoder_dim, n_layers=mm.encoder_layers, n_heads=mm.encoder_heads,
                                vocab_size=1, max_seq_len=grid * grid)
        self.blocks = nn.ModuleList(Block(block_cfg, i) for i in range(mm.encoder_layers))
        self.norm = nn.LayerNorm(mm.encoder_dim)
        self.out_dim = mm.encoder_dim
        for m in self.blocks.modules():  # ViT/GPT-2 style: small normal weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x, is_causal=False)  # every patch sees the whole image
        return self.norm(x)


class CNNEncoder(nn.Module):
    """The seed's two-layer CNN, kept as an option; its feature map is pooled to the same patch grid."""

    def __init__(self, mm):
        super().__init__()
        self.grid = mm.image_size // mm.patch_size
        self.net = nn.Sequential(
            nn.Conv2d(mm.channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.out_dim = 64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.net(images), self.grid).flatten(2).transpose(1, 2)


class PretrainedEncoder(nn.Module):
    """A Hugging Face vision tower (ViT, SigLIP, CLIP vision, ...) from a local directory or the Hub cache."""

    def __init__(self, name: str, freeze: bool):
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError:
            raise UserError("multimodal.pretrained_encoder needs `transformers`; pip install 'nanogpt4[hf]'") from None
        from nanogpt4.data.sources import hub_unreachable

        try:  # offline, a Hub id can still come from the local cache; asking the Hub would retry for ~30 s
            model = AutoModel.from_pretrained(name, local_files_only=hub_unreachable(name))
        except Exception as e:
            raise UserError(f"cannot load vision encoder '{name}' ({str(e).splitlines()[0][:160]}); offline, pass "
                            f"a local directory saved with save_pretrained, or drop multimodal.pretrained_encoder") \
                from None
        self.tower = getattr(model, "vision_model", model)  # CLIP/SigLIP wrap the vision half
        cfg = getattr(self.tower, "config", model.config)
        self.out_dim = cfg.hidden_size
        self.image_size = cfg.image_size
        self.channels = getattr(cfg, "num_channels", 3)
        self.n_tokens = (cfg.image_size // cfg.patch_size) ** 2
        if freeze:
            self.tower.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=images).last_hidden_state
        return hidden[:, -self.n_tokens:]  # drop a class token where the tower has one


class MultimodalTransformer(nn.Module):
    """``model(text_input, image_input)`` -> logits; ``labels=`` -> loss on text tokens only."""

    def __init__(self, config, lm: Transformer | None = None):
        super().__init__()
        self.config = config
        mm = self.mm = config.multimodal
        self.lm = lm if lm is not None else Transformer(config)
        self.cfg = self.lm.cfg
        if mm.pretrained_encoder:
            self.encoder = PretrainedEncoder(mm.pretrained_encoder, mm.freeze_encoder)
            self.image_size, self.channels = self.encoder.image_size, self.encoder.channels
            n_patches = self.encoder.n_tokens
        else:
            if mm.image_size % mm.patch_size:
                raise UserError(f"multimodal.image_size={mm.image_size} must be a multiple of "
                                f"multimodal.patch_size={mm.patch_size}")
            self.encoder = ViTEncoder(mm) if mm.encoder == "vit" else CNNEncoder(mm)
            self.image_size, self.channels = mm.image_size, mm.channels
            n_patches = (mm.image_size // mm.patch_size) ** 2
        self.grid, self.merge = math.isqrt(n_patches), mm.token_merge
        if self.grid ** 2 != n_patches or self.grid % self.merge:
            raise UserError(f"multimodal.token_merge={self.merge} needs a square patch grid it divides; the encoder "
                            f"gives {n_patches} patches")
        self.image_tokens = n_patches // self.merge ** 2
        dim = model_section(config).dim
        # LLaVA-1.5's two-layer MLP projector, over the merged (k*k*encoder_dim) patch features
        self.projector = nn.Sequential(nn.Linear(self.encoder.out_dim * self.merge ** 2, dim), nn.GELU(),
                                       nn.Linear(dim, dim))
        self.image_token_id = mm.image_token_id

    # ---------------------------------------------------------------- text side
    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        """Each ``<|image|>`` in a token list becomes ``image_tokens`` copies (one slot per image vector)."""
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.image_tokens if t == self.image_token_id else [t])
        return out

    # ---------------------------------------------------------------- image side
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, image_tokens, dim), in the LM's width."""
        if images.dim() != 4:
            raise UserError(f"images must be (N, C, H, W) or (B, K, C, H, W), got shape {tuple(images.shape)}")
        n, c, h, w = images.shape
        if c != self.channels or h != self.image_size or w != self.image_size:
            raise UserError(f"image shape ({c}, {h}, {w}) does not match the model's ({self.channels}, "
                            f"{self.image_size}, {self.image_size}); resize to multimodal.image_size="
                            f"{self.image_size} with {self.channels} channels")
        return self.projector(self.merge_patches(self.encoder(images)))

    def merge_patches(self, feats: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle (nanoVLM, InternVL): each k x k block of the patch grid becomes one token carrying the
        block's k*k feature vectors side by side, so the LM reads k^2 fewer image tokens and nothing is pooled."""
        k = self.merge
        if k == 1:
            return feats
        n, g, c = feats.size(0), self.grid, feats.size(-1)
        blocks = feats.reshape(n, g // k, k, g // k, k, c).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, (g // k) ** 2, k * k * c)

    def embed(self, text_input: torch.Tensor, image_input: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image vectors written over the ``<|image|>`` slots."""
        x = self.lm.token_embed(text_input)
        slots = text_input == self.image_token_id
        n_slots = int(slots.sum())
        if image_input is None:
            if n_slots:
                raise UserError(f"text_input has {n_slots} <|image|> slots but no image_input was given")
            return x
        images = image_input.flatten(0, 1) if image_input.dim() == 5 else image_input
        if images.dim() != 4:
            raise UserError(f"image_input must be (N, C, H, W) or (B, K, C, H, W), got {tuple(image_input.shape)}")
        expected = images.size(0) * self.image_tokens
        if n_slots != expected:
            raise UserError(f"text_input has {n_slots} <|image|> slots but {images.size(0)} images need "
                            f"{expected} ({self.image_tokens} each); expand each <|image|> with "
                            f"model.expand_image_tokens and pass one image per <|image|>")
        feats = self.encode_images(images.to(x.dtype) if not torch.is_autocast_enabled() else images)
        x = x.clone()
        x[slots] = feats.reshape(-1, feats.size(-1)).to(x.dtype)  # reading order = images' order
        return x

    def forward(self, text_input: torch.Tensor, image_input: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        x = self.embed(text_input, image_input)
        hidden = self.lm(text_input, return_hidden=True, attention_mask=attention_mask, inputs_embeds=x)
        if labels is not None:
            # a target that is an image slot is never a prediction the LM can or should make
            labels = labels.masked_fill(labels == self.image_token_id, -100)
            return linear_cross_entropy(hidden, self.lm.head.weight, labels)
        return hidden if return_hidden else self.lm.head(hidden)

    @torch.no_grad()
    def generate(self, text_input: torch.Tensor, image_input: torch.Tensor | None, max_new_tokens: int,
                 **kwargs) -> torch.Tensor:
        """The LM's KV-cache generator with the image tokens in the prefix; returns (B, T + new) token ids."""
        was = self.training
        self.eval()
        try:
            embeds = self.embed(text_input, image_input)
        finally:
            self.train(was)
        return self.lm.generate(text_input, max_new_tokens, inputs_embeds=embeds, **kwargs)

    # ---------------------------------------------------------------- optimisation
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"lm": list(self.lm.parameters()), "encoder": list(self.encoder.parameters()),
                "projector": list(self.projector.parameters())}

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), eps: float = 1e-8,
                             device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with decay on matrices only; the projector (and a from-scratch encoder) may run at a
        scaled learning rate (``lr_scale``, applied by the trainer's schedule). Frozen parts are left out."""
        scales = {"lm": 1.0, "encoder": self.mm.encoder_lr_scale, "projector": self.mm.projector_lr_scale}
        groups = []
        for name, params in self.param_groups().items():
            params = [p for p in params if p.requires_grad]
            for decay in (True, False):
                chosen = [p for p in params if (p.dim() >= 2) == decay]
                if chosen:
                    groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0,
                                   "lr_scale": scales[name], "name": name})
        if not groups:
            raise UserError("nothing to train: every parameter of the multimodal model is frozen")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
