"""How the DPO loop trains: every setting with its default and the reason for it, written once.

    TrainerConfig(beta=0.1, lr=5e-6, max_steps=50)
    cai train --set trainer.loss_type=ipo --lr 1e-5      # nested as `trainer` in flows/configs.py

What to train on is the caller's business (flows/train.py). No torch import here, so the command
line can read these fields (defaults and help) without loading torch.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

LossType = Literal["sigmoid", "ipo", "hinge"]
Scheduler = Literal["linear", "cosine", "constant"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


# torch.manual_seed takes a 64-bit integer: every seed setting stays in the signed range (a loop adds
# its epoch to it, which still fits in torch's unsigned upper half)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def seed_field(description: str, default: int = 0) -> Any:
    """A seed setting: an integer torch and the engines can take."""
    return Field(default, ge=SEED_MIN, le=SEED_MAX, description=description)


LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    """LoRA through peft (training/lora.py): r=0 trains every weight; r>0 trains low-rank adapters only."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(0, ge=0, description="adapter rank; 0: full-weight training (no adapters)")
    alpha: float = Field(16.0, gt=0, description="adapter scale is alpha/r: 16 with r=8 is the common start")
    dropout: float = Field(0.0, ge=0, lt=1, description="on the adapter input only; 0 keeps policy == reference "
                           "at step 0")
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_ATTENTION),
                                      description="module names that get adapters: Llama attention projections; "
                                      "add gate_proj,up_proj,down_proj for the MLP (or pass 'all-linear')")

    @property
    def enabled(self) -> bool:
        return self.r > 0


class LoopSettings(BaseModel):
    """What the SFT, DPO and reward-model loops share, written once: schedule, clipping, lengths,
    precision, seed, accumulation and checkpoints (training/loop.py)."""

    model_config = ConfigDict(extra="forbid")

    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of steps ramping the lr up (early loss is sharp)")
    scheduler: Scheduler = Field("linear", description="lr decay after warmup: linear | cosine | constant")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 disables")
    max_length: int = Field(512, ge=2, description="prompt + answer tokens per sequence")
    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (from the end)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast where a measured matmul is faster (engines/precision.py), "
        "else fp32; bfloat16 autocasts; weights stay fp32 either way")
    seed: int = seed_field("data order and anything random")
    length_grouping: int = Field(8, ge=1, description="rows of similar length batched together within windows of "
                                 "this many batches (less padding); 1: plain shuffled batches")
    ref_batch_tokens: int = Field(8192, ge=1, description="token budget of one no-grad batch (reference, eval)")
    grad_accum: int = Field(1, ge=1, description="micro-batches (of batch_size rows) per optimizer step: bigger "
                            "batch, same memory")
    train_batch_tokens: int | None = Field(None, ge=1, description="token budget of one forward with grad: a "
                                           "micro-batch goes through in parts under it, same gradients; DPO at "
                                           "256 on a CPU: ~15% less peak memory for ~13% more time (bench/dpo.py). "
                                           "None: no limit")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (model, optimizer, RNG, history) "
                                  "that --resume continues from; 0: none")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")

    @model_validator(mode="after")
    def _lengths(self) -> Any:
        check_lengths(self.max_length, self.max_prompt_length)
        return self


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """The prompt is cut to max_prompt_length tokens within max_length: the answer needs room after it."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}), "
                         "which also holds the answer: raise --max-length or lower --max-prompt-length")


class TrainerConfig(LoopSettings):
    """How to train: loss, optimizer, schedule, lengths, evals and checkpoints."""

    beta: float = Field(0.1, gt=0, description="KL strength; lower lets the policy drift further from the base")
    loss_type: LossType = Field("sigmoid", description="sigmoid (DPO) | ipo | hinge")
    label_smoothing: float = Field(0.0, ge=0, le=1, description="ε for pairs without a soft label: label-flip rate")
    use_soft_labels: bool = Field(True, description="AI-labelled pairs train with ε = 1 − label_prob")
    epochs: int = Field(1, ge=1, description="passes over the training pairs")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    lr: float = Field(5e-6, gt=0, description="peak learning rate; small: the reward is a log-ratio to the start")
    weight_decay: float = Field(0.0, ge=0, description="DPO is usually run without it")
    batch_size: int = Field(4, ge=1, description="pairs per forward (two sequences each); fits 135M on a laptop")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evals; None: about ten per run")
    early_stop_patience: int | None = Field(3, ge=1, description="stop after this many held-out evals without a "
                                            "lower loss (None: never); over-optimisation shows there first")
    keep_best: bool = Field(False, description="restore the weights of the best held-out eval at the end (off: "
                            "the last step's, as DPO on a fixed step count is usually run)")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen reply (RPO); 0: plain DPO")
    gradient_checkpointing: bool = Field(False, description="far less activation memory for ~30% more compute")
    recompute_mlp: bool = Field(False, description="only the MLP blocks recompute their activations in backward: "
                                "about half the activation memory for ~12% more time on a LoRA step")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="low-rank adapters instead of full "
                               "weights; the reference is the base with adapters off")


class SFTConfig(LoopSettings):
    """How the supervised stage (training/sft.py) fine-tunes on chosen replies before preference training."""

    lr: float = Field(2e-5, gt=0, description="peak lr; SFT moves a 135M model at 1e-5..3e-5, DPO's 5e-6 barely does")
    epochs: int = Field(2, ge=1, description="passes over the rows; more memorises a few hundred replies")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(8, ge=1, description="rows per micro-batch (grad_accum of them make an optimizer step)")
    weight_decay: float = Field(0.0, ge=0, description="off, as in most instruction tuning of small models")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evals; None: three per run")
    early_stop_patience: int | None = Field(2, ge=1, description="held-out evals without a lower loss before stopping")
    keep_best: bool = Field(True, description="restore the weights of the best held-out eval at the end")
    freeze_layers: int = Field(0, ge=0, description="the embeddings and this many bottom decoder layers stay as they "
                               "are: backward stops above them (half of them frozen: about a third less compute)")


class RewardConfig(LoopSettings):
    """How the Bradley-Terry reward model (training/reward.py) trains: a scalar head on the base model."""

    lr: float = Field(1e-5, gt=0, description="peak lr for the body; the fresh head learns at head_lr")
    head_lr: float = Field(1e-3, gt=0, description="the new scalar head starts at random: it needs a far larger lr")
    epochs: int = Field(2, ge=1, description="passes over the pairs; reward models overfit after one or two")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch (two sequences each; grad_accum of them "
                            "make an optimizer step)")
    weight_decay: float = Field(0.0, ge=0, description="off: a few hundred pairs, one or two epochs")
    use_soft_labels: bool = Field(True, description="AI-labelled pairs train towards their label_prob, not 1")
    center_rewards: float = Field(0.01, ge=0, description="weight of (r_c + r_r)^2: keeps scores near 0 "
                                  "(Eisenstein et al. 2023), so scores of different runs compare")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evals; None: four per run")
    early_stop_patience: int | None = Field(None, ge=1, description="held-out evals without a lower loss before "
                                            "stopping; None: never (one or two epochs are the guard)")
    keep_best: bool = Field(False, description="restore the weights of the best held-out eval at the end")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="adapters instead of full weights "
                               "(the head is always trained in full)")
