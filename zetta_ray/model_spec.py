"""The shape of a GPT-style transformer, dense or MoE, and what it costs to train per token.

``ModelSpec`` is the one model description: the simulator reads it, the placer's ``Workload`` is made
from it (``Workload.from_model``), and ``zr.MoEConfig`` converts to it (``ModelSpec.from_moe_config``).
Pure Python, no Ray.

Symbols (as in Narayanan et al. 2021 and Korthikanti et al. 2022):
    L layers, h hidden, a heads, s sequence length, V vocabulary, f FFN hidden size,
    E experts per MoE block, k experts each token is routed to (top-k).

Parameter count per block: attention ``2h^2 (1 + g/a)`` (Q and output projections, plus K and V which
grouped-query attention shrinks to ``g`` of ``a`` heads), MLP ``2hf`` (``3hf`` gated, as SwiGLU), and
four ``h``-vectors of layer norm. An MoE block holds ``E`` such MLPs and a router ``hE``.

Model FLOPs per token (forward + backward, no recomputation; the convention of Megatron-LM's
``num_floating_point_operations`` that papers quote MFU against): ``6 x`` matmul parameters touched
plus attention scores ``12 L s h`` (non-causal count), plus the logits ``6 h V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zetta_ray.checks import positive_int
from zetta_ray.errors import ConfigError

if TYPE_CHECKING:
    from zetta_ray.config import MoEConfig

__all__ = ["ModelSpec"]


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSpec:
    """A transformer LM. ``kind="moe"`` makes every ``moe_every``-th block a mixture of experts.

    ``capacity_factor`` pads every expert to ``capacity_factor x`` its fair share of rows (GShard and
    Switch style; compute follows the padded size). Without it routing is dropless and the busiest
    expert rank carries ``expert_imbalance x`` the mean load, which sets the MoE compute time.
    ``flash_attention`` fuses the attention core (no ``s^2`` activations, no softmax memory traffic).
    """

    kind: str = "dense"
    layers: int
    hidden: int
    heads: int
    seq_len: int
    vocab: int
    ffn_hidden: int | None = None
    kv_heads: int | None = None
    gated_mlp: bool = False
    flash_attention: bool = False
    n_experts: int = 1
    top_k: int = 1
    moe_every: int = 1
    capacity_factor: float | None = None
    expert_imbalance: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "moe"):
            raise ConfigError(f"model.kind={self.kind!r} is invalid: use 'dense' or 'moe'")
        for name in ("layers", "hidden", "heads", "seq_len", "vocab", "n_experts", "top_k", "moe_every"):
            positive_int(f"model.{name}", getattr(self, name))
        if self.ffn_hidden is not None:
            positive_int("model.ffn_hidden", self.ffn_hidden)
        if self.kv_heads is not None:
            positive_int("model.kv_heads", self.kv_heads)
            if self.heads % self.kv_heads:
                raise ConfigError(
                    f"model.kv_heads={self.kv_heads} must divide heads ({self.heads}): grouped-query "
                    "attention shares each K/V head among heads/kv_heads query heads"
                )
        if self.hidden % self.heads:
            raise ConfigError(
                f"model.hidden={self.hidden} must be divisible by heads ({self.heads}); pick a multiple"
            )
        if self.kind == "dense" and (self.n_experts != 1 or self.top_k != 1):
            raise ConfigError(
                f"model.kind='dense' takes no experts (n_experts={self.n_experts}, top_k={self.top_k}); "
                "set kind='moe' or drop n_experts/top_k"
            )
        if self.kind == "moe":
            if self.n_experts < 2:
                raise ConfigError(f"model.n_experts={self.n_experts} is invalid: an MoE needs >= 2 experts")
            if self.top_k > self.n_experts:
                raise ConfigError(f"model.top_k={self.top_k} must be <= n_experts ({self.n_experts})")
            if self.moe_every > self.layers:
                raise ConfigError(f"model.moe_every={self.moe_every} must be <= layers ({self.layers})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"model.capacity_factor={self.capacity_factor!r} must be > 0 (or absent)")
        if not self.expert_imbalance >= 1:
            raise ConfigError(
                f"model.expert_imbalance={self.expert_imbalance!r} must be >= 1 (busiest over mean load)"
            )

    @classmethod
    def from_moe_config(cls, cfg: MoEConfig) -> ModelSpec:
        """The shape of ``zr.MoETransformer(cfg)``: every block an MoE of two-matrix (GELU) experts,
        attention without grouped K/V. The one conversion from the model's config to this description,
        which the simulator and (through ``placement.Workload.from_model``) the placer read."""
        return cls(
            kind="moe",
            layers=cfg.n_layers,
            hidden=cfg.d_model,
            heads=cfg.n_heads,
            seq_len=cfg.seq_len,
            vocab=cfg.vocab_size,
            ffn_hidden=cfg.d_ff,
            n_experts=cfg.n_experts,
            top_k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
        )

    # ---- shape helpers -------------------------------------------------------------------------------
    @property
    def f(self) -> int:
        """FFN hidden size (default 4h)."""
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.hidden

    @property
    def kv_ratio(self) -> float:
        """K/V heads over query heads (1 without grouped-query attention)."""
        return (self.kv_heads or self.heads) / self.heads

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of size h x f per MLP: 2, or 3 when gated (SwiGLU)."""
        return 3 if self.gated_mlp else 2

    @property
    def moe_layers(self) -> int:
        """Blocks whose MLP is a mixture of experts (every ``moe_every``-th, counting from 1)."""
        return self.layers // self.moe_every if self.kind == "moe" else 0

    @property
    def dense_mlp_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def load_factor(self) -> float:
        """Rows the busiest expert rank computes, over its fair share."""
        return self.capacity_factor if self.capacity_factor is not None else self.expert_imbalance

    # ---- parameters ----------------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        return int(2 * self.hidden * self.hidden * (1 + self.kv_ratio))

    @property
    def mlp_params(self) -> int:
        """One MLP (one expert)."""
        return self.mlp_matrices * self.hidden * self.f

    @property
    def block_dense_params(self) -> int:
        """Per block: attention and layer norms (never expert-sharded)."""
        return self.attention_params + 4 * self.hidden

    @property
    def expert_params(self) -> int:
        """All expert weights of the model."""
        return self.moe_layers * self.n_experts * self.mlp_params

    @property
    def dense_params(self) -> int:
        """Everything that is not an expert: blocks, dense MLPs, routers, embedding."""
        router = self.moe_layers * self.hidden * self.n_experts
        return (
            self.layers * self.block_dense_params
            + self.dense_mlp_layers * self.mlp_params
            + router
            + self.vocab * self.hidden
        )

    @property
    def total_params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token touches (top-k experts per MoE block)."""
        return self.dense_params + self.moe_layers * self.top_k * self.mlp_params

    # ---- FLOPs ---------------------------------------------------------------------------------------
    def model_flops_per_token(self) -> float:
        """Forward + backward FLOPs per token, no recomputation (the MFU numerator)."""
        h, s = self.hidden, self.seq_len
        matmul = (
            self.layers * self.attention_params
            + self.dense_mlp_layers * self.mlp_params
            + self.moe_layers * (self.top_k * self.mlp_params + self.hidden * self.n_experts)
            + self.vocab * h
        )
        return 6.0 * matmul + 12.0 * self.layers * s * h

    def recompute_flops_per_token(self, recompute: str) -> float:
        """Extra forward FLOPs per token that activation recomputation adds (hardware FLOPs)."""
        h, s = self.hidden, self.seq_len
        if recompute == "full":
            return (self.model_flops_per_token() - 6.0 * self.vocab * h) / 3.0
        if recompute == "selective":
            return 4.0 * self.layers * s * h
        return 0.0
