"""Store queries behind `cai redteam`: the corpus a new line is checked against, the kept prompts a
campaign answers, and what a run or a campaign made.

    cai redteam --taxonomy harms --per-category 20

flows/redteam.py calls these; the rows are store.RedteamCandidate and store.RedteamAttack.
"""

from __future__ import annotations

from sqlmodel import Session, select

from store.models import Prompt, RedteamAttack, RedteamCandidate


def corpus_texts(session: Session) -> list[str]:
    """The text of every stored prompt: a generated line that repeats one is a duplicate."""
    return list(session.exec(select(Prompt.text)))


def kept_candidates(session: Session, taxonomy_version: str) -> list[RedteamCandidate]:
    """Every line kept under this taxonomy version, by any run."""
    return list(session.exec(select(RedteamCandidate).where(RedteamCandidate.taxonomy_version == taxonomy_version,
                                                            RedteamCandidate.verdict == "kept")))


def run_verdicts(session: Session, run_id: str) -> list[tuple[str, str]]:
    """(category, verdict) of every line the run generated."""
    return [(c.category, c.verdict)
            for c in session.exec(select(RedteamCandidate).where(RedteamCandidate.run_id == run_id))]


def campaign_outcomes(session: Session, campaign: str) -> list[tuple[str, str, bool]]:
    """(category, kind, success) of every prompt the campaign's policy answered."""
    return [(r.category, r.kind, r.success)
            for r in session.exec(select(RedteamAttack).where(RedteamAttack.campaign == campaign))]
