"""Recipes: one Prefect flow per stage (generate, label, evaluate, train, export, report), the
pipeline and schedules that compose them, and the `cai` command line in `flows/cli/`.

Helpers the flows share, which are not flows themselves: `common` (constitutions, bundled
prompt sets, the engine cache), `stage` (the claim/compute/write runner), `plots`, `publish`.
"""
