"""The seed's ``PredictableScaling`` API, on exact counts.

Scaling rule (stated, as the seed leaves it open): ``scale_factor`` s multiplies width *and* depth, keeping
the depth/width aspect ratio and the head dimension fixed (Kaplan et al. find loss insensitive to shape at
fixed N within wide ranges, so one knob suffices):

    dim -> round(dim·s / head_dim)·head_dim  (>= one head),   n_layers -> max(1, round(n_layers·s))

so non-embedding parameters grow about as s³. Parameters, FLOPs and memory are the instantiated model's
exact figures (:mod:`nanogpt4.scaling.accounting`), not the seed's params·scale² and params·4 bytes.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nanogpt4.scaling.accounting import analytic_params, kv_cache_bytes_per_token, meta_model, training_memory
from nanogpt4.scaling.laws import CHINCHILLA, ChinchillaLaw

GB = 1024**3


def scaled_config(config: DictConfig, scale_factor: float) -> DictConfig:
    if scale_factor <= 0:
        raise ValueError(f"scale_factor must be positive, got {scale_factor}")
    m = config.model
    head_dim = m.dim // m.n_heads
    heads = max(1, round(m.dim * scale_factor / head_dim))
    kv_ratio = m.n_heads // (m.n_kv_heads or m.n_heads)
    heads = max(kv_ratio, heads // kv_ratio * kv_ratio)
    cfg = OmegaConf.merge(config, {"model": {
        "dim": heads * head_dim, "n_heads": heads,
        "n_kv_heads": heads // kv_ratio if m.n_kv_heads else None,
        "n_layers": max(1, round(m.n_layers * scale_factor))}})
    return cfg  # type: ignore[return-value]


class PredictableScaling:
    def __init__(self, config: DictConfig, law: ChinchillaLaw | None = None, dtype: str = "bfloat16"):
        self.config = config
        self.law = law or CHINCHILLA
        self.dtype = dtype
        self.base_params = self._calculate_base_params()

    def _calculate_base_params(self) -> int:
        """The configured model's exact parameter count (embeddings, biases, norms and tying included), as
        ``Transformer(config).num_parameters()`` counts it."""
        return analytic_params(self.config)["params"]

    def predict_performance(self, scale_factor: float, tokens: float | None = None) -> dict:
        """Exact size, FLOPs and memory of the scaled model; loss from the law at ``tokens`` (default 20/param)."""
        cfg = scaled_config(self.config, scale_factor)
        model = meta_model(cfg)
        n = model.num_parameters()
        micro = cfg.training.batch_size // cfg.training.grad_accum_steps
        mem = training_memory(cfg, micro, cfg.model.max_seq_len, self.dtype, "cuda")
        d_tokens = tokens if tokens is not None else 20 * n
        return {
            "scale_factor": scale_factor,
            "dim": cfg.model.dim, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
            "parameters": n,
            "non_embedding_parameters": model.num_parameters(non_embedding=True),
            "flops_per_token": model.flops_per_token(cfg.model.max_seq_len, training=True),
            "inference_flops_per_token": model.flops_per_token(cfg.model.max_seq_len, training=False),
            "memory_gb": mem.total / GB,
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, 2 if self.dtype == "bfloat16" else 4),
            "predicted_loss": float(self.law.loss(n, d_tokens)),
            "loss_law": self.law.source,
        }

    def find_optimal_scale(self, target_flops: float, max_memory: float = 10) -> tuple[float, dict]:
        """Largest scale whose training FLOPs/token stay within ``target_flops`` and whose training memory
        stays within ``max_memory`` GB (bisection: both grow monotonically with the scale)."""
        def fits(s: float) -> bool:
            p = self.predict_performance(s)
            return p["flops_per_token"] <= target_flops and p["memory_gb"] <= max_memory

        low, high = 1e-3, 1.0
        if not fits(low):
            raise ValueError("even the smallest model exceeds the FLOP or memory budget")
        while fits(high) and high < 1e4:
            low, high = high, high * 2
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low, self.predict_performance(low)

    def compute_optimal(self, compute_flops: float) -> dict:
        """Chinchilla-style plan for a total training budget: N*, D* and the predicted loss."""
        return self.law.compute_optimal(compute_flops)
