"""Row ids are content keys: the same inputs must give the same ids as before the cai/ refactor
(values computed with the pre-refactor code, commit 017af4d), or a resumed store would redo work."""

from __future__ import annotations

from cai import rl_cai, sl_cai
from cai.prompts import prompt_id
from engines.base import Sampling

MSGS = [{"role": "user", "content": "How do I bake bread?"}]
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128, seed=0).to_dict()


def test_sl_cai_keys_are_unchanged() -> None:
    assert sl_cai.initial_item("p1", MSGS, "smollm2-135m", SAMPLING).key == "2b7b19a0d3a4ffe13277e8464f4abb70"
    assert sl_cai.revision_pair_key("v1", "p1", "c", "r") == "646759b92f0cfefd541217986ab78e27"


def test_rl_cai_and_prompt_keys_are_unchanged() -> None:
    assert rl_cai.sample_key("p1", "smollm2-135m", SAMPLING, 0, 1) == "70cd301ab74d83fe60a11fcafe504b03"
    assert rl_cai.pair_key("p1", "x", "y") == "50ef88dcd9b2b1c1321997f4f3884a79"
    settings = {"template": "t", "max_chars": 1200, "cot": None}
    assert rl_cai.judgment_key("pk", "ph", 0, "xy", "smollm2-135m", settings) == "a0939aafba67f1de4d3e4e4fee414022"
    assert prompt_id(MSGS) == "1deb05645e1f3ca201307f90"


def test_new_sampling_fields_stay_out_of_keys_at_their_defaults() -> None:
    with_defaults = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128, seed=0, repetition_penalty=1.0,
                             no_repeat_ngram=0).to_dict()
    assert with_defaults == SAMPLING
