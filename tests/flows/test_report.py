"""The static report: figures from a representative store, escaping, an empty store, and a real
headless-Chromium render of the page (images load from relative paths, no network)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from flows.report import ReportConfig, collect, make_report
from store.db import session_scope
from store.models import (
    EvalResult,
    Judgment,
    PreferencePair,
    Prompt,
    PromptTag,
    Response,
    Run,
    TrainingRun,
    TrainingStep,
    utcnow,
)

CHROMIUM = "/usr/bin/chromium"
HOSTILE = "<script>alert('x')</script> & <b>bold</b>"  # must show as text, never run or render


def _populate(url: str) -> None:
    """A small store with every kind of row the report reads, written directly."""
    now = utcnow()
    cv = {"constitution": "harmless", "constitution_version": "abcd1234"}

    def resp(**kw) -> Response:
        return Response(conversation=[], model="m", **cv, **kw)

    with session_scope(url) as s:
        for i in range(3):
            pid = f"p{i}"
            s.add(Prompt(id=pid, text=f"How do I pick lock number {i}? {HOSTILE}",
                         messages=[{"role": "user", "content": f"lock {i}"}]))
            s.add(PromptTag(prompt_id=pid, tag="red-team"))
        s.flush()
        for i in range(3):
            pid = f"p{i}"
            chain = [resp(id=f"{pid}-init", prompt_id=pid, kind="initial",
                          text=f"Sure, here is how to pick lock {i}: use a tension wrench. {HOSTILE}")]
            for r, principle in ((1, "dangerous-help"), (2, "privacy" if i else "dangerous-help")):
                parent = chain[-1].id
                chain.append(resp(id=f"{pid}-c{r}", prompt_id=pid, kind="critique", round=r, parent_id=parent,
                                  principle_id=principle, text=f"Round {r} critique: it helps burglars."))
                chain.append(resp(id=f"{pid}-r{r}", prompt_id=pid, kind="revision", round=r, parent_id=parent,
                                  critique_id=f"{pid}-c{r}", principle_id=principle,
                                  text=f"Round {r} revision: call a licensed locksmith instead."))
            for k in range(2):
                chain.append(resp(id=f"{pid}-s{k}", prompt_id=pid, kind="sample", sample_index=k,
                                  text=f"sample {k} for {pid}"))
            s.add_all(chain)
            s.flush()
            s.add(PreferencePair(id=f"{pid}-rev", prompt_id=pid, chosen_id=f"{pid}-r2",
                                 rejected_id=f"{pid}-init", method="revision",
                                 principle_ids=["dangerous-help"], created_at=now + timedelta(i),
                                 details={"chain": [c.id for c in chain if c.kind != "sample"]}, **cv))
            # AI pair: x = sample 0, y = sample 1; p2's judge follows the (A) slot (inconsistent)
            probs = {"xy": 0.8, "yx": 0.7} if i < 2 else {"xy": 0.7, "yx": 0.3}
            jids = []
            for principle in ("less-harmful", "kinder"):
                for order, p in probs.items():
                    jid = f"{pid}-{principle}-{order}"
                    jids.append(jid)
                    s.add(Judgment(id=jid, pair_key=f"{pid}-pk", prompt_id=pid, response_x_id=f"{pid}-s0",
                                   response_y_id=f"{pid}-s1", principle_id=principle, principle_hash="h",
                                   order=order, logp_a=-0.2, logp_b=-1.6, prob_x=p, conversation=[],
                                   judge_model="judge", **cv))
            mean = (probs["xy"] + probs["yx"]) / 2
            s.add(PreferencePair(id=f"{pid}-ai", prompt_id=pid, chosen_id=f"{pid}-s0",
                                 rejected_id=f"{pid}-s1", method="ai", label_prob=mean, judge_model="judge",
                                 status="ok" if i < 2 else "position-inconsistent",
                                 principle_ids=["less-harmful", "kinder"],
                                 details={"x_id": f"{pid}-s0", "judgments": jids}, **cv))
        s.add(TrainingRun(id="tr1", base_model="smollm2-135m", out_dir="runs/harmless-dpo",
                          status="completed", final_metrics={"loss": 0.41, "rewards/accuracies": 0.9}, **cv))
        s.flush()
        for step in range(1, 21):
            s.add(TrainingStep(training_run_id="tr1", step=step, split="train",
                               metrics={"loss": 0.69 - 0.014 * step, "rewards/margins": 0.05 * step,
                                        "rewards/accuracies": min(1.0, 0.5 + 0.03 * step)}))
            if step % 5 == 0:
                s.add(TrainingStep(training_run_id="tr1", step=step, split="eval",
                                   metrics={"loss": 0.7 - 0.01 * step, "rewards/margins": 0.04 * step,
                                            "rewards/accuracies": 0.5 + 0.02 * step}))
        s.add(Run(id="evalrun", flow="eval", status="completed", **cv))
        s.flush()
        for i in range(3):
            for role, refused, win in (("model", i < 2, 0.7), ("baseline", False, 0.3)):
                s.add(EvalResult(id=f"e{i}{role}", eval_name="dpo-vs-base@1234", prompt_id=f"p{i}",
                                 prompt_tag="red-team", model=f"{role}-model", role=role, text="...",
                                 refused=refused, win_prob=win, run_id="evalrun", details={"judge": "base"}))
        s.add(EvalResult(id="old", eval_name="older@0000", prompt_id="p0", prompt_tag="red-team", model="x",
                         role="model", text="", created_at=now - timedelta(days=3)))


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_report_figures_from_a_representative_store(db_url: str, tmp_path: Path) -> None:
    _populate(db_url)
    out = tmp_path / "report"
    data = make_report(ReportConfig(out=out, database_url=db_url))
    saved = json.loads((out / "report.json").read_text())
    assert saved["principles"] == data["principles"] == {"dangerous-help": 4, "privacy": 2}
    assert {(r["kind"], r["round"]): r["count"] for r in saved["stages"]["responses"]} == {
        ("critique", 1): 3, ("critique", 2): 3, ("initial", 0): 3, ("revision", 1): 3, ("revision", 2): 3,
        ("sample", 0): 6}
    assert saved["judge"]["pairs"] == 3
    assert saved["judge"]["position_consistency"] == pytest.approx(2 / 3)  # p2's orders disagree
    assert saved["training"]["steps"] == 20 and len(saved["training"]["series"]["eval"]["loss"]) == 4
    assert saved["eval"]["eval_name"] == "dpo-vs-base@1234"  # the latest eval, not the older one
    model = saved["eval"]["sets"]["red-team"]["model"]
    assert model["refusal_rate"] == pytest.approx(2 / 3) and model["win_rate"] == pytest.approx(0.7)
    assert len(saved["examples"]) == 3
    kinds = [step["kind"] for step in saved["examples"][0]["chain"]]
    assert kinds == ["initial", "critique", "revision", "critique", "revision"]
    # the revision pair's chosen/rejected are the chain's ends; the AI pair is shown beside it
    first = saved["examples"][0]
    assert first["revision_pair"] and [p["method"] for p in first["pairs"]] == ["ai"]

    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in page
    assert "harmless@abcd1234" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing loads from the network
    for name in ("stages.png", "principles.png", "dpo.png", "eval.png", "label_prob_hist.png"):
        assert name in _img_sources(page) and (out / name).stat().st_size > 5000


def test_report_on_an_empty_store_renders_and_says_so(sqlite_url: str, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    (out).mkdir()
    (out / "dpo.png").write_bytes(b"stale")  # a plot from an older report must not linger
    (out / "report.json").write_text(json.dumps({"generator": "cai-factory report", "files": ["dpo.png"]}))
    data = make_report(ReportConfig(out=out, database_url=sqlite_url))
    page = (out / "index.html").read_text()
    assert _img_sources(page) == [] and not (out / "dpo.png").exists()
    assert page.count('class="empty"') == 8  # one per section, the red-team campaign and people's review included
    assert data["judge"] is None and data["eval"] is None and data["training"] is None and data["redteam"] is None
    assert data["review"] is None
    assert json.loads((out / "report.json").read_text())["examples"] == []


def test_report_filters_by_constitution(sqlite_url: str, tmp_path: Path) -> None:
    _populate(sqlite_url)
    with session_scope(sqlite_url) as s:
        other = collect(s, ReportConfig(constitution="helpful-honest"))
        same = collect(s, ReportConfig(constitution="harmless@abcd"))
    assert other["principles"] == {} and other["judge"] is None and other["eval"] is None
    assert other["training"] is None and other["examples"] == []
    assert same["principles"] == {"dangerous-help": 4, "privacy": 2} and same["eval"] is not None
    assert same["training"]["id"] == "tr1" and len(same["examples"]) == 3


@pytest.mark.browser
def test_report_renders_in_headless_chromium(sqlite_url: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install -y chromium` (this test must "
                    "run, not skip: it is the only check that the report renders in a browser)")
    _populate(sqlite_url)
    out = tmp_path / "report"
    make_report(ReportConfig(out=out, database_url=sqlite_url))
    page = (out / "index.html").read_text()
    sources = _img_sources(page)
    assert len(sources) >= 5
    for src in sources:
        assert not src.startswith(("http:", "https:", "//", "/")), src  # relative paths only
        assert (out / src).is_file(), f"<img src={src!r}> points to a missing file"

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), "--headless", "--no-sandbox",
           "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--screenshot={shot}", "--window-size=1280,2000", (out / "index.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert shot.stat().st_size > 50_000  # a page of text and plots, not a blank canvas

    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1280)
    grey = pixels[..., :3].mean(axis=2)
    assert grey.std() > 0.05  # not one flat colour
    assert (grey < 0.5).mean() > 0.01  # some dark ink: text and plot lines were drawn


def test_cli_report_writes_the_page(sqlite_url: str, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    _populate(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    r = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "r"), "--examples", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "index.html").exists()
    assert "(7 plots" in " ".join(r.output.split())  # rich wraps long paths at the terminal width
    assert len(json.loads((tmp_path / "r" / "report.json").read_text())["examples"]) == 1
