"""SQLModel tables: the single source of truth for everything the factory makes.

Every row an expensive step produces has a primary key that is a content hash of what
produced it (see `store.keys`), so `INSERT ... ON CONFLICT DO NOTHING` makes reruns no-ops.
Schema changes go through Alembic (`store/migrations`); `cai db upgrade` applies them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class ConstitutionVersion(SQLModel, table=True):
    """Every constitution version the store has seen, with its full canonical text."""

    __tablename__ = "constitution_version"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str  # short SHA-256 of the canonical parsed content, e.g. 3f2a9c1b
    sha256: str
    canonical: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON of the parsed file
    source_text: str = Field(sa_column=Column(Text, nullable=False))  # the YAML as the user wrote it
    source_path: str = ""
    principle_hashes: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Prompt(SQLModel, table=True):
    __tablename__ = "prompt"

    id: str = Field(primary_key=True)  # hash of the canonical messages
    text: str = Field(sa_column=Column(Text, nullable=False))  # last user turn, for display
    messages: list = Field(sa_column=Column(JSON, nullable=False))  # [{"role", "content"}, ...]
    category: str | None = None
    source: str = ""  # file it came from
    created_at: datetime = Field(default_factory=utcnow)


class PromptTag(SQLModel, table=True):
    __tablename__ = "prompt_tag"

    prompt_id: str = Field(foreign_key="prompt.id", primary_key=True)
    tag: str = Field(primary_key=True, index=True)


class Run(SQLModel, table=True):
    """One flow run: its resolved config, model, engine and constitution version."""

    __tablename__ = "run"

    id: str = Field(primary_key=True)  # uuid hex
    flow: str = Field(index=True)
    config: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model: str = ""
    engine: str = ""
    constitution: str = ""
    constitution_version: str = ""
    status: str = "running"  # running | completed | failed
    timings: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    summary: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    host: str = ""
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class Response(SQLModel, table=True):
    """A model output: an initial answer, a critique, a revision, or a policy sample.

    kind: initial | critique | revision | sample. Critiques are their own rows so that the
    critique stage can be resumed; each revision row also carries its critique's text.
    """

    __tablename__ = "response"
    __table_args__ = (
        Index("ix_response_prompt_kind", "prompt_id", "kind"),
        Index("ix_response_parent", "parent_id"),
    )

    id: str = Field(primary_key=True)  # content key, see store.keys.response_key
    prompt_id: str = Field(foreign_key="prompt.id")
    kind: str
    round: int = 0  # 0 for initial/sample, 1..n for critique/revision
    sample_index: int = 0  # for kind=sample: which of the k samples
    parent_id: str | None = None  # the response this one critiques or revises
    critique_id: str | None = None  # for revisions: the critique row it answers
    principle_id: str | None = None
    principle_hash: str | None = None
    critique: str | None = Field(default=None, sa_column=Column(Text))  # for revisions
    conversation: list = Field(sa_column=Column(JSON, nullable=False))  # exactly what was sent
    text: str = Field(sa_column=Column(Text, nullable=False))
    model: str
    sampling: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    seed: int = 0
    constitution: str | None = None
    constitution_version: str | None = None  # the version under which this row was first made
    run_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    # cai.quality gate figures of `text` (None: made before gates existed); see cai/quality.py
    quality: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # steering that produced this row but is not part of the training prompt (e.g. a primed
    # assistant opening for a contrastive pair): {"kind": ..., "text": ...}
    steering: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class Judgment(SQLModel, table=True):
    """One feedback-model judgment of a pair under one principle in one order."""

    __tablename__ = "judgment"
    __table_args__ = (Index("ix_judgment_pair", "pair_key"),)

    id: str = Field(primary_key=True)
    pair_key: str  # the unordered candidate pair (x, y) this judges
    prompt_id: str = Field(foreign_key="prompt.id")
    response_x_id: str  # canonical first response of the pair
    response_y_id: str
    principle_id: str
    principle_hash: str
    order: str  # "xy": x shown as (A); "yx": y shown as (A)
    logp_a: float
    logp_b: float
    prob_x: float  # probability that x is better, from this judgment (after CoT clamping and calibration)
    prob_x_raw: float | None = None  # before contextual calibration (None: judged without it)
    # how the judge's choice was scored when not from full log-probs (engines.base.ChoiceScores):
    # "top-logprobs" (a hosted API's first answer token), "hard" or "unparsed" (no log-probs at all)
    scoring: str | None = None
    reasoning: str | None = Field(default=None, sa_column=Column(Text))  # CoT text, if any
    conversation: list = Field(sa_column=Column(JSON, nullable=False))
    judge_model: str
    constitution: str
    constitution_version: str
    run_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class PreferencePair(SQLModel, table=True):
    """chosen/rejected responses to one prompt, with how the preference was decided."""

    __tablename__ = "preference_pair"
    __table_args__ = (Index("ix_pair_constitution", "constitution", "constitution_version"),)

    id: str = Field(primary_key=True)
    prompt_id: str = Field(foreign_key="prompt.id")
    chosen_id: str = Field(foreign_key="response.id")
    rejected_id: str = Field(foreign_key="response.id")
    method: str  # revision | ai | contrastive | helpful
    label_prob: float = 1.0  # P(chosen better); 1.0 for revision pairs
    status: str = "ok"  # ok | tie | position-inconsistent | gated:<gate> (cai.quality.gate_pair)
    principle_ids: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    constitution: str
    constitution_version: str
    policy_model: str = ""
    judge_model: str | None = None
    details: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    run_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Review(SQLModel, table=True):
    """One person's verdict on one preference pair (`cai review`); the pair itself never changes.

    Several people may review a pair, and one person may review it again (their latest verdict
    counts, cai/review.py). The verdict is in the pair's terms (`chosen`: the person prefers the
    reply the factory chose); `left` records which reply was on the left, so a person's own
    position bias can be measured.
    """

    __tablename__ = "review"
    __table_args__ = (Index("ix_review_pair_reviewer", "pair_id", "reviewer"),)

    id: str = Field(primary_key=True)  # cai.review.review_key: pair, reviewer, time, verdict, sides, note
    pair_id: str = Field(foreign_key="preference_pair.id")
    reviewer: str = Field(index=True)
    verdict: str  # chosen | rejected | tie | both-bad | skip (cai.review.VERDICTS)
    left: str  # the reply shown on the left: chosen | rejected
    note: str | None = Field(default=None, sa_column=Column(Text))
    ai_shown: bool = False  # the person opened the factory's label before giving the verdict
    source: str = "page"  # page | import:<file name>
    created_at: datetime = Field(default_factory=utcnow)


class RefLogp(SQLModel, table=True):
    """Reference-model sequence log-prob of one (prompt, response), computed once for DPO."""

    __tablename__ = "ref_logp"

    id: str = Field(primary_key=True)  # hash(ref model, max lengths, prompt messages, response)
    ref_model: str
    logp: float
    n_tokens: int
    truncated: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class TrainingRun(SQLModel, table=True):
    __tablename__ = "training_run"

    id: str = Field(primary_key=True)
    base_model: str
    out_dir: str
    config: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    data_selection: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    constitution: str | None = None
    constitution_version: str | None = None
    status: str = "running"
    final_metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    run_id: str | None = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class TrainingStep(SQLModel, table=True):
    __tablename__ = "training_step"

    training_run_id: str = Field(foreign_key="training_run.id", primary_key=True)
    step: int = Field(primary_key=True)
    split: str = Field(primary_key=True)  # train | eval
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class EvalResult(SQLModel, table=True):
    """One model's answer to one held-out prompt, with refusal and head-to-head judgments."""

    __tablename__ = "eval_result"
    __table_args__ = (Index("ix_eval_name", "eval_name"),)

    id: str = Field(primary_key=True)
    eval_name: str  # groups one comparison (model vs baseline on prompt sets)
    prompt_id: str = Field(foreign_key="prompt.id")
    prompt_tag: str
    model: str
    role: str  # model | baseline
    text: str = Field(sa_column=Column(Text, nullable=False))
    refused: bool = False
    refusal_pattern: str | None = None
    win_prob: float | None = None  # P(this answer better than the other model's), both orders
    details: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    run_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class TaxonomyVersion(SQLModel, table=True):
    """Every harm taxonomy version the store has seen (constitution/taxonomy.py), with its text."""

    __tablename__ = "taxonomy_version"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str  # short SHA-256 of the canonical parsed content
    canonical: str = Field(sa_column=Column(Text, nullable=False))
    source_text: str = Field(sa_column=Column(Text, nullable=False))
    source_path: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class RedteamCandidate(SQLModel, table=True):
    """One attacker generation (cai/redteam.py) and the filter verdict it got; kept ones name their Prompt.

    Its lineage: the run, attacker model, sampling, the few-shot prompts shown (Prompt ids of the
    taxonomy's seeds), the taxonomy version and category.
    """

    __tablename__ = "redteam_candidate"
    __table_args__ = (Index("ix_redteam_candidate_taxonomy", "taxonomy", "taxonomy_version"),)

    id: str = Field(primary_key=True)  # cai.redteam.item_key
    taxonomy: str
    taxonomy_version: str
    category: str
    kind: str  # harmful | benign
    round: int = 0
    shot_ids: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # Prompt ids shown
    conversation: list = Field(sa_column=Column(JSON, nullable=False))  # exactly what the attacker was sent
    raw: str = Field(sa_column=Column(Text, nullable=False))  # its continuation as generated
    text: str = Field(sa_column=Column(Text, nullable=False))  # the parsed request
    verdict: str  # cai.redteam.VERDICTS
    match: str | None = Field(default=None, sa_column=Column(Text))  # the stored prompt it duplicates
    score: float | None = None
    prompt_id: str | None = Field(default=None, foreign_key="prompt.id")  # set when kept
    model: str
    sampling: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    seed: int = 0
    run_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class RedteamAttack(SQLModel, table=True):
    """The policy's answer to one generated prompt in a campaign, and whether the attack got through."""

    __tablename__ = "redteam_attack"
    __table_args__ = (Index("ix_redteam_attack_campaign", "campaign"),)

    id: str = Field(primary_key=True)  # hash(campaign, prompt)
    campaign: str  # policy@hash(fingerprint, sampling, taxonomy version): one group in the report
    prompt_id: str = Field(foreign_key="prompt.id")
    category: str
    kind: str  # harmful | benign
    model: str
    text: str = Field(sa_column=Column(Text, nullable=False))
    refused: bool = False
    refusal_pattern: str | None = None
    success: bool = False  # cai.redteam.attack_success
    details: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    run_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Failure(SQLModel, table=True):
    """A work item that failed; after `MAX_ATTEMPTS` it is quarantined and skipped."""

    __tablename__ = "failure"

    stage: str = Field(primary_key=True)
    item_key: str = Field(primary_key=True)
    error: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int = 0
    quarantined: bool = False
    run_id: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Claim(SQLModel, table=True):
    """A worker's lease on a work item, so several workers never do the same item."""

    __tablename__ = "claim"

    stage: str = Field(primary_key=True)
    item_key: str = Field(primary_key=True)
    worker: str
    expires_at: datetime


class WorkProgress(SQLModel, table=True):
    """What one run of one stage claimed, wrote and failed, and on which worker and host: `cai status`
    shows it per worker while runs are going (claims themselves are deleted when their item is done)."""

    __tablename__ = "work_progress"

    run_id: str = Field(primary_key=True)
    stage: str = Field(primary_key=True)
    worker: str = ""  # the Prefect worker that started the run (PREFECT__WORKER_NAME); "" for a plain `cai` run
    host: str = Field(default="", index=True)  # the machine's host name
    claimed: int = 0  # items claimed (taken over ones included)
    done: int = 0  # items computed and written by this run
    failed: int = 0  # failed attempts
    updated_at: datetime = Field(default_factory=utcnow)


class Spend(SQLModel, table=True):
    """The ledger: requests and tokens one run's stage sent to one endpoint and model, and their cost.

    Written with each chunk's outputs in one transaction (store/ledger.py), so a killed run's
    spend up to its last stored chunk is kept; local engines appear as endpoint local:hf / local:vllm."""

    __tablename__ = "spend"

    run_id: str = Field(primary_key=True)
    stage: str = Field(primary_key=True)
    endpoint: str = Field(primary_key=True)
    model: str = Field(primary_key=True)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0  # requests that still failed after their retries
    cost_usd: float | None = None  # None: no price for this model in the run's price table
    updated_at: datetime = Field(default_factory=utcnow)


MAX_ATTEMPTS = 3
