"""Which principle governs a prompt, and so whether it should be refused or answered.

    from constitution.govern import Governance
    gov = Governance([harmless, helpful_honest])
    rule = gov.rule(category="weapons", tags=["red-team"])
    rule.principle.id, rule.refuse        # ("weapons", True)

Nothing in the code decides which prompts are harmful: a principle with a `stance` declares it
for the prompts it `governs` (by prompt tag or by category), and a constitution's
`default_principle` covers prompts that have no category. The lookup, across the constitutions
of a run in the order given:

1. a principle that governs one of the prompt's tags (the most specific declaration);
2. else a principle that governs the prompt's category;
3. else, for a prompt without a category, the first constitution's `default_principle`;
4. else nothing governs it: it makes no contrastive or helpful pair and its eval replies are
   counted apart (`cai constitution lint` lists such categories).

When two principles claim the same tag or category, the first wins; `lint` reports it, as an
error when their stances differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from constitution.load import Constitution, Principle


@dataclass(frozen=True)
class Rule:
    """The principle that governs a prompt, where it lives and why it was chosen."""

    constitution: Constitution
    principle: Principle
    via: str  # "tag:<tag>" | "category:<category>" | "default"

    @property
    def refuse(self) -> bool:
        return self.principle.refuses

    @property
    def stance(self) -> str:
        return self.principle.stance or ""

    @property
    def ref(self) -> str:
        return f"{self.constitution.name}:{self.principle.id}"


class Governance:
    """The rules of several constitutions, looked up by prompt tag and category."""

    def __init__(self, constitutions: Sequence[Constitution]) -> None:
        self.constitutions = list(constitutions)
        self.by_tag: dict[str, list[tuple[Constitution, Principle]]] = {}
        self.by_category: dict[str, list[tuple[Constitution, Principle]]] = {}
        for c in self.constitutions:
            for p in c.principles:
                if not p.stance:
                    continue
                for tag in p.governs.tags:
                    self.by_tag.setdefault(tag, []).append((c, p))
                for cat in p.governs.categories:
                    self.by_category.setdefault(cat, []).append((c, p))
        self.default = next(((c, c.principle(c.default_principle)) for c in self.constitutions
                             if c.default_principle), None)

    def rule(self, category: str | None, tags: Iterable[str] = ()) -> Rule | None:
        for tag in sorted(tags):
            if tag in self.by_tag:
                c, p = self.by_tag[tag][0]
                return Rule(c, p, f"tag:{tag}")
        if category and category in self.by_category:
            c, p = self.by_category[category][0]
            return Rule(c, p, f"category:{category}")
        if not category and self.default:
            c, p = self.default
            return Rule(c, p, "default")
        return None

    def refuse(self, category: str | None, tags: Iterable[str] = ()) -> bool | None:
        """True: the prompt should be refused; False: answered; None: nothing governs it."""
        r = self.rule(category, tags)
        return None if r is None else r.refuse

    def taught_refusals(self) -> list[str]:
        """Every refusal the constitutions teach or name (refuse examples, answer counter-examples):
        the refusal detector recognises these as refusals (cai/refusal.py)."""
        return [t for c in self.constitutions for texts in c.taught_texts().values() for t in texts]

    def claims(self) -> list[tuple[str, str, list[tuple[Constitution, Principle]]]]:
        """(kind, name, principles) for every tag and category some principle governs."""
        return ([("tag", k, v) for k, v in sorted(self.by_tag.items())]
                + [("category", k, v) for k, v in sorted(self.by_category.items())])
