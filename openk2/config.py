"""Model configuration: one dataclass, presets as data, and HF `config.json` I/O.

Field names follow the Hugging Face DeepseekV3 / Kimi K2 `config.json` so a config file maps onto
`ModelConfig` one key to one field. The presets are the real values (Kimi-K2-Instruct's
`config.json`; the K2 technical report, arXiv 2507.20534) plus two small models that train on a
laptop CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
# Sizes that must be at least 1; the other integer fields (expert counts, dense-layer count, MTP
# layers) may be 0.
_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "moe_layer_freq",
    "n_group",
    "topk_group",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
)


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # per expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64  # MLA has one k/v per head; kept for config compatibility
    n_shared_experts: int = 1
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    q_lora_rank: int | None = 1536  # None: a full-rank q_proj (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    model_type: str = "kimi_k2"
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, written back

    # ---------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by the absorbed MLA cache: latent + shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN (DeepSeek-V3 / K2 convention)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(rs["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    def _check_types(self) -> None:
        """Each field holds the kind of value its default has (an int where an int is expected, a
        number for a float, ...), so a config.json with `"hidden_size": "7168"` or a negative size
        is refused here with the field's name instead of failing deep inside torch."""
        for f in fields(self):
            if f.name == "extra":
                continue
            value, default = getattr(self, f.name), f.default
            if value is None and ("None" in str(f.type) or default is None):
                continue
            if isinstance(default, bool):
                ok, kind = isinstance(value, bool), "true or false"
            elif isinstance(default, int) or "int" in str(f.type):
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif isinstance(default, float):
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok, kind = number and math.isfinite(value), "a finite number"
            elif isinstance(default, str):
                ok, kind = isinstance(value, str), "a string"
            else:
                continue
            if not ok:
                raise ValueError(f"{f.name} must be {kind}, got {value!r}")
            if kind == "an integer" and value < (1 if f.name in _POSITIVE_FIELDS else 0):
                bound = "at least 1" if f.name in _POSITIVE_FIELDS else "non-negative"
                raise ValueError(f"{f.name} must be {bound}, got {value}")

    def validate(self) -> ModelConfig:
        self._check_types()
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {self.model_type!r}; openk2 supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.scoring_func != "sigmoid":
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported (K2 uses 'sigmoid')")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ValueError("n_routed_experts must be divisible by n_group")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError("topk_group must be in [1, n_group]")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError("num_experts_per_tok exceeds n_routed_experts")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise ValueError("group-limited routing needs at least 2 experts per group")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even")
        return self

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    # ---------------------------------------------------------------- HF config.json I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in fields(cls)} - {"extra"}
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters:  # transformers >= 5: theta and scaling live together
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype not in (None, "default"):
                rp["type"] = rtype
                rp.pop("rope_type", None)
                d["rope_scaling"] = rp
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs.pop("rope_type")
            rs.pop("rope_type", None)
            if rs.get("type") in (None, "default"):
                rs = None
            d["rope_scaling"] = rs
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        for k in ("bos_token_id", "eos_token_id"):
            if isinstance(d.get(k), list):
                d[k] = d[k][0]
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        cfg = cls(**kwargs, extra=extra)
        return cfg.validate()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a HF `config.json` (a directory or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e

    def to_hf_dict(self, rope_format: str = "legacy") -> dict[str, Any]:
        """The `config.json` dict. rope_format 'legacy' writes `rope_theta` + `rope_scaling` (what the
        released K2 checkpoint and vLLM/SGLang read); 'parameters' writes transformers 5's
        `rope_parameters`."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update(self.extra)
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        rs = dict(self.rope_scaling) if self.rope_scaling else None
        if rope_format == "legacy":
            if rs:
                rs["type"] = rs.get("type", "yarn")
            d["rope_scaling"] = rs
        elif rope_format == "parameters":
            rp: dict[str, Any] = {"rope_theta": self.rope_theta}
            if rs:
                rp["rope_type"] = rs.pop("type", "yarn")
                rp.update(rs)
            else:
                rp["rope_type"] = "default"
            d.pop("rope_scaling")
            d.pop("rope_theta")
            d["rope_parameters"] = rp
        else:
            raise ValueError("rope_format must be 'legacy' or 'parameters'")
        return d

    def save_pretrained(self, path: str | os.PathLike, rope_format: str = "legacy") -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(rope_format), f, indent=2)
            f.write("\n")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_K2_YARN = {
    "type": "yarn",
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, ModelConfig] = {
    "kimi-k2": ModelConfig(rope_scaling=dict(_K2_YARN)),
    "deepseek-v3": ModelConfig(
        model_type="deepseek_v3",
        vocab_size=129280,
        first_k_dense_replace=3,
        n_routed_experts=256,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        num_attention_heads=128,
        num_key_value_heads=128,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840,
        bos_token_id=0,
        eos_token_id=1,
        num_nextn_predict_layers=1,
    ),
    # ~30M parameters (~10M activated): trains on 2 CPU cores in minutes. Its vocabulary is the default
    # tokenizer's: 7936 BPE tokens + 256 reserved specials, like K2's 163584 + 256.
    "small": ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        first_k_dense_replace=1,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope_theta=50000.0,
        max_position_embeddings=1024,
        bos_token_id=7936,
        eos_token_id=7937,
        torch_dtype="float32",
    ),
    # For tests: every architectural feature (YaRN, group-limited routing, dense + MoE layers), tiny sizes.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.827,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_theta=50000.0,
        rope_scaling={**_K2_YARN, "factor": 4.0, "original_max_position_embeddings": 64},
        max_position_embeddings=256,
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),
}
