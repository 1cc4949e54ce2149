"""The reward model and the PPO critic: a transformer trunk with a scalar head."""

from __future__ import annotations

import torch
import torch.nn as nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


class ScalarHeadModel(nn.Module):
    def __init__(self, base_model: nn.Module, freeze_base: bool = False, seed: int = 0):
        super().__init__()
        self.transformer = base_model
        self.config = base_model.config
        dim = base_model.cfg.dim
        self.reward_head = nn.Linear(dim, 1)
        # a seeded stream of its own: the head must not depend on how much of the global RNG earlier work in this
        # process drew (`nanogpt4 rlhf` alone and the pipeline's RLHF stage must train the same reward model)
        nn.init.normal_(self.reward_head.weight, std=1 / (dim + 1) ** 0.5,
                        generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.reward_head.bias)
        if freeze_base:
            for p in self.transformer.parameters():
                p.requires_grad = False

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids, return_hidden=True, attention_mask=attention_mask)


class RewardModel(ScalarHeadModel):
    """``RewardModel(base_model)`` as in the seed: r(x) read at the last non-pad token.

    ``reward_offset`` centres the scale (set so that SFT responses average 0); unlike the seed, the base is
    fine-tuned unless ``freeze_base=True``.
    """

    def __init__(self, base_model: nn.Module, freeze_base: bool = False, seed: int = 0):
        super().__init__(base_model, freeze_base, seed)
        self.register_buffer("reward_offset", torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.hidden(input_ids, attention_mask)
        last = h[torch.arange(h.size(0), device=h.device), last_token_index(attention_mask)]
        return self.reward_head(last).squeeze(-1).float() - self.reward_offset

    @classmethod
    def load_pretrained(cls, path, device: torch.device | str = "cpu") -> RewardModel:
        """A trained reward model, frozen and in eval mode for scoring: a `nanogpt4 reward` run (its ``--out``;
        the ``reward`` directory of a `nanogpt4 rlhf` run) or one of its checkpoints. The seed called this to
        build its PPO trainer but never defined it."""
        from nanogpt4.errors import UserError
        from nanogpt4.model.transformer import Transformer
        from nanogpt4.train.checkpoint import load_model, resolve_stage_checkpoint, tensor_names

        ckpt = resolve_stage_checkpoint(path)
        if "reward_head.weight" not in tensor_names(ckpt / "model.safetensors"):
            raise UserError(f"'{path}' is not a reward model (its weights have no reward head); pass the directory "
                            f"`nanogpt4 reward --out` wrote")
        model, _, _ = load_model(ckpt, device, model_cls=lambda cfg: cls(Transformer(cfg)))
        return model.requires_grad_(False)


class ValueModel(ScalarHeadModel):
    """The PPO critic: a value for every position (initialised from the reward model or the policy)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.reward_head(self.hidden(input_ids, attention_mask)).squeeze(-1).float()
