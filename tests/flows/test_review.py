"""flows/review.py and `cai review ...`: the page over every pair method, verdict rows, filters and paging,
the token and anti-forgery checks, stats against a hand count, JSONL round trip, and what export,
training and the report do with the verdicts. The browser test is tests/flows/test_review_browser.py."""

from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from reviewstore import XSS, seed
from sqlmodel import select
from typer.testing import CliRunner

from cai import review
from cai.errors import UserError
from flows.cli import app as cli
from flows.configs import ReportConfig, ReviewConfig, TrainConfig
from flows.review import make_app, settings
from store.db import session_scope
from store.models import PreferencePair, Review
from store.reviews import QueueFilter, count

LOCAL = "http://127.0.0.1:8765"


def client(url: str, host: str = "127.0.0.1", token: str | None = None, reviewer: str = "ann", **cfg) -> TestClient:
    s = settings(ReviewConfig(database_url=url, host=host, **cfg), token, reviewer)
    return TestClient(make_app(s), base_url=LOCAL if host == "127.0.0.1" else "http://review.example:8765")


def shown(page: str) -> tuple[str, str, str]:
    """(pair id, the side shown left, the anti-forgery value) of a review page."""
    pair = re.search(r'data-pair="([^"]+)"', page).group(1)
    left = re.search(r'data-left="([^"]+)"', page).group(1)
    return pair, left, re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def rows(url: str) -> list[Review]:
    with session_scope(url) as s:
        return list(s.exec(select(Review).order_by(Review.created_at)))


def judge(c: TestClient, choice: str, query: str = "", note: str = "") -> tuple[str, str]:
    page = c.get("/" + query)
    assert page.status_code == 200, page.text
    pair, left, csrf = shown(page.text)
    r = c.post("/verdict", data={"pair": pair, "left": left, "choice": choice, "csrf": csrf, "note": note},
               follow_redirects=False)
    assert r.status_code == 303, r.text
    return pair, left


@pytest.mark.parametrize("method, knows", [
    ("revision", "revision chain of 2 replies"), ("ai", "both orders: 0.700 with the chosen reply shown first"),
    ("contrastive", "reply was steered (primed-opening)"), ("helpful", "reply was steered (primed-opening)"),
    ("best-of-n", "reward scores: chosen 1.500, rejected -0.500 (of 4 samples)")])
def test_the_page_shows_every_pair_method_with_what_the_factory_knows(sqlite_url, method, knows):
    pairs = seed(sqlite_url)
    page = client(sqlite_url).get(f"/?method={method}&queue=all")
    assert page.status_code == 200
    pair, left, _ = shown(page.text)
    assert pairs[pair].method == method
    i = int(pair.split("-")[1])
    assert f"Question {i}: how do I do thing {i}?" in page.text
    assert f"good answer {i}" in page.text and f"bad answer {i}" in page.text
    assert knows in page.text
    # the left reply is the one the page says it put there
    left_text = re.search(r'id="reply-left">.*?<div class="text">(.*?)</div>', page.text, re.S).group(1)
    assert left_text == (f"good answer {i}" if left == "chosen" else f"bad answer {i}")
    # the factory's label sits in a closed fold, so a person judges blind unless they open it
    assert '<details id="ai">' in page.text


def test_stored_text_is_escaped_everywhere(db_url):
    seed(db_url, xss=True)
    c = client(db_url)
    judge(c, "left", "?pair=pair-000", note=XSS)
    for path in ("/?pair=pair-000", "/queue?queue=all", "/stats"):
        page = c.get(path)
        assert page.status_code == 200
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert all(re.fullmatch(r'<script nonce="[^"]+">', s) for s in scripts), scripts  # only the page's own
        assert "<img src=x" not in page.text
        assert "script-src 'nonce-" in page.headers["content-security-policy"]
    page = c.get("/?pair=pair-000").text
    assert "&lt;script&gt;document.title=&#x27;owned&#x27;&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;") >= 2  # the prompt and the reply


def test_verdicts_are_rows_with_the_sides_shown_and_never_change_the_pair(db_url):
    seed(db_url)
    with session_scope(db_url) as s:
        before = {p.id: p.model_dump() for p in s.exec(select(PreferencePair))}
    ann = client(db_url)
    seen = [judge(ann, choice, note="checked" if choice == "tie" else "")
            for choice in ("left", "right", "tie", "both-bad", "skip")]
    got = rows(db_url)
    assert [(r.pair_id, r.reviewer, r.left, r.source) for r in got] == [(p, "ann", left, "page") for p, left in seen]
    assert [r.verdict for r in got] == [review.verdict_for(c, left) for c, (_, left) in
                                        zip(("left", "right", "tie", "both-bad", "skip"), seen, strict=True)]
    assert [r.note for r in got] == [None, None, "checked", None, None]
    assert len({p for p, _ in seen}) == 5  # each verdict moved the queue on
    # a second person reviews the same pair: a second row, the first untouched
    bob = client(db_url, reviewer="bob")
    pair, left = judge(bob, "left", f"?pair={seen[0][0]}")
    assert [(r.pair_id, r.reviewer) for r in rows(db_url)][-1] == (seen[0][0], "bob")
    with session_scope(db_url) as s:
        assert {p.id: p.model_dump() for p in s.exec(select(PreferencePair))} == before
    # ann's to-do queue no longer offers what she judged (the skip comes round again); nobody's offers neither
    with session_scope(db_url) as s:
        assert count(s, QueueFilter(queue="todo", reviewer="ann")) == 10 - 4
        assert count(s, QueueFilter(queue="unreviewed")) == 10 - 4
        assert count(s, QueueFilter(queue="reviewed")) == 4
        assert count(s, QueueFilter(queue="todo", reviewer="bob")) == 10 - 1


def test_the_reviewer_name_is_set_on_the_page(sqlite_url):
    seed(sqlite_url)
    c = client(sqlite_url)
    csrf = shown(c.get("/").text)[2]
    assert c.post("/reviewer", data={"reviewer": "carol", "csrf": csrf}, follow_redirects=False).status_code == 303
    judge(c, "left")
    assert rows(sqlite_url)[-1].reviewer == "carol"
    assert c.post("/reviewer", data={"reviewer": " ", "csrf": csrf}).status_code == 400
    assert c.post("/reviewer", data={"reviewer": "mallory"}).status_code == 403  # no anti-forgery value


def test_queue_filters(db_url):
    seed(db_url)
    with session_scope(db_url) as s:
        version = s.exec(select(PreferencePair.constitution_version)).first()

        def n(**kw) -> int:
            return count(s, QueueFilter(queue="all", **kw))

        assert n() == 10
        assert n(method="ai") == 2 and n(method="best-of-n") == 2
        assert n(status="gated") == 1 and n(status="gated:empty") == 1 and n(status="ok") == 9
        assert n(principle="harm") == 2 and n(principle="safer") == 2 and n(principle="ha") == 0
        assert n(version=f"harmless@{version[:4]}") == 10 and n(version="harmless@ffff") == 0
        assert n(version="other") == 0
        assert n(tag="odd") == 5
        assert n(label_min=0.6, label_max=0.7) == 2  # the ai pairs (0.65)
        assert n(label_min=0.9) == 8  # best-of-n at 0.95 and the pairs chosen by construction (1.0)
        assert n(method="ai", tag="odd", label_max=0.7) == 1
    page = client(db_url).get("/?method=ai&queue=all")
    assert "2 pairs match these filters" in page.text
    assert client(db_url).get("/?label_min=2").text.count("label_min: expected a number between 0 and 1") == 1


def test_the_queue_list_is_paged(sqlite_url):
    seed(sqlite_url)
    c = client(sqlite_url, page_size=3)
    seen, url = [], "/queue?queue=all"
    for _ in range(5):
        page = c.get(url)
        assert page.status_code == 200
        ids = re.findall(r"<code>(pair-\d+)</code>", page.text)
        seen += ids
        nxt = re.search(r'id="next-page" href="([^"]+)"', page.text)
        if not nxt:
            break
        url = nxt.group(1).replace("&amp;", "&")
    assert seen == [f"pair-{i:03d}" for i in range(10)]


def test_a_review_of_the_last_pair_wraps_round_and_a_done_queue_says_so(sqlite_url):
    seed(sqlite_url, n=2)
    c = client(sqlite_url)
    judge(c, "left", "?pair=pair-001")
    assert shown(c.get("/?after=pair-001").text)[0] == "pair-000"
    judge(c, "left")
    page = c.get("/")
    assert 'id="done"' in page.text and "data-pair" not in page.text


def test_off_loopback_every_request_needs_the_token(sqlite_url):
    seed(sqlite_url)
    with pytest.raises(UserError, match="requires a token"):
        settings(ReviewConfig(database_url=sqlite_url, host="0.0.0.0"), None, "ann")
    stranger = client(sqlite_url, host="0.0.0.0", token="s3cret-token")
    assert stranger.get("/").status_code == 401
    assert stranger.get("/stats").status_code == 401
    assert stranger.get("/?token=wrong").status_code == 401
    # a page fetched with the token gives a real anti-forgery value; without the token it still cannot post
    team = client(sqlite_url, host="0.0.0.0", token="s3cret-token")
    first = team.get("/?token=s3cret-token&queue=all", follow_redirects=False)
    assert first.status_code == 303 and "token" not in first.headers["location"]
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    pair, left, csrf = shown(team.get(first.headers["location"]).text)
    form = {"pair": pair, "left": left, "choice": "left", "csrf": csrf}
    assert stranger.post("/verdict", data=form).status_code == 401
    assert stranger.post("/reviewer", data={"reviewer": "x", "csrf": csrf}).status_code == 401
    assert rows(sqlite_url) == []
    # with the token (cookie or bearer header) it works
    assert team.post("/verdict", data=form, follow_redirects=False).status_code == 303
    bearer = TestClient(team.app, base_url="http://review.example:8765",
                        headers={"Authorization": "Bearer s3cret-token"})
    assert bearer.get("/").status_code == 200
    assert len(rows(sqlite_url)) == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_state_changes_from_another_site_are_refused(sqlite_url, host):
    seed(sqlite_url)
    c = client(sqlite_url, host=host, token=None if host == "127.0.0.1" else "tok")
    if host != "127.0.0.1":
        c.cookies.set("cai_review_token", "tok")
    pair, left, csrf = shown(c.get("/?queue=all").text)
    form = {"pair": pair, "left": left, "choice": "left", "csrf": csrf}
    assert c.post("/verdict", data={**form, "csrf": ""}).status_code == 403
    assert c.post("/verdict", data={**form, "csrf": "guess"}).status_code == 403
    assert c.post("/verdict", data={**form, "note": "x" * 70_000}).status_code == 413
    assert c.post("/verdict", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/verdict", data=form, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert c.post("/verdict", data=form, headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
    assert rows(sqlite_url) == []
    same = c.base_url.netloc.decode() if isinstance(c.base_url.netloc, bytes) else c.base_url.netloc
    assert c.post("/verdict", data=form, headers={"Origin": f"http://{same}", "Sec-Fetch-Site": "same-origin"},
                  follow_redirects=False).status_code == 303
    assert len(rows(sqlite_url)) == 1


def test_on_loopback_only_loopback_host_names_are_served(sqlite_url):
    seed(sqlite_url)
    c = client(sqlite_url)
    assert c.get("/", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert c.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    assert c.get("/", headers={"Host": "[::1]:8765"}).status_code == 200


def test_stats_match_a_hand_count(sqlite_url, monkeypatch):
    """Verdicts given through the page on the seeded store; `cai review stats --json` against a hand count."""
    seed(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    ann, bob = client(sqlite_url), client(sqlite_url, reviewer="bob")

    def give(c: TestClient, pair: str, verdict: str) -> None:
        page = c.get(f"/?pair={pair}")
        _, left, csrf = shown(page.text)
        choice = review.choice_for(verdict, left)
        assert c.post("/verdict", data={"pair": pair, "left": left, "choice": choice, "csrf": csrf},
                      follow_redirects=False).status_code == 303

    # pair: method, judge, label -- 000 revision; 001 ai 0.65; 002 contrastive; 004 best-of-n 0.95; 006 ai 0.65
    give(ann, "pair-000", "chosen")
    give(ann, "pair-001", "rejected")
    give(bob, "pair-001", "rejected")
    give(ann, "pair-002", "both-bad")
    give(ann, "pair-004", "chosen")
    give(bob, "pair-004", "tie")
    give(ann, "pair-006", "rejected")
    give(ann, "pair-006", "chosen")  # ann changes her mind: the later verdict counts
    give(bob, "pair-009", "skip")
    out = CliRunner().invoke(cli, ["review", "stats", "--json"])
    assert out.exit_code == 0, out.output
    st = json.loads(out.output)
    # counted by hand: latest non-skip verdicts are 000 C, 001 R R, 002 B, 004 C T, 006 C -> 7 verdicts
    assert st["rows"] == 9 and st["skips"] == 1 and st["reviewers"] == ["ann", "bob"]
    o = st["overall"]
    assert (o["verdicts"], o["pairs"], o["tie"], o["both_bad"]) == (7, 5, 1, 1)
    assert (o["agreement"]["k"], o["agreement"]["n"]) == (3, 5)  # C R R C C
    assert o["agreement"]["low"] == pytest.approx(0.2307, abs=1e-4) and o["agreement"]["high"] == pytest.approx(
        0.8824, abs=1e-4)  # Wilson 3/5
    by_method = {m: (g["agreement"]["k"], g["agreement"]["n"]) for m, g in st["by_method"].items()}
    assert by_method == {"ai": (1, 3), "best-of-n": (1, 1), "contrastive": (0, 0), "revision": (1, 1)}
    assert st["by_principle"]["safer"]["agreement"]["n"] == 3 and st["by_principle"]["harm"]["verdicts"] == 1
    by_judge = {m: g["verdicts"] for m, g in st["by_judge"].items()}
    assert by_judge == {review.NO_JUDGE: 2, "tiny-judge": 3, "tiny-reward": 2}
    hh = st["human_human"]
    assert (hh["pairs"], hh["k"], hh["n"]) == (2, 1, 2)  # 001 R=R agree; 004 C vs T disagree
    cal = {tuple(c["bin"]): (c["k"], c["n"]) for c in st["calibration"]}
    assert cal == {(0.6, 0.7): (1, 3), (0.9, 1.0): (1, 1)}
    shown_text = CliRunner().invoke(cli, ["review", "stats"])
    assert shown_text.exit_code == 0 and "60.0 %" in shown_text.output and "[23.1, 88.2]" in shown_text.output


def test_export_and_import_round_trip(sqlite_url, tmp_path, monkeypatch):
    seed(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    ann = client(sqlite_url)
    judge(ann, "left", "?pair=pair-001", note="close call")
    out = tmp_path / "records.jsonl"
    res = CliRunner().invoke(cli, ["review", "export", "--out", str(out), "--method", "ai"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["pair-001", "pair-006"]
    r = records[0]
    assert set(r) == {"id", "fields", "metadata", "suggestions", "responses", "vectors"}
    assert r["suggestions"]["preference"]["score"] == 0.65 and r["suggestions"]["preference"]["agent"] == "tiny-judge"
    assert r["responses"]["preference"][0]["user_id"] == "ann" and r["responses"]["note"][0]["value"] == "close call"
    # elsewhere, carol answers both records and ann's answer comes back unchanged
    for rec in records:
        rec["responses"].setdefault("preference", []).append({"value": "tie", "user_id": "carol",
                                                              "status": "submitted"})
    back = tmp_path / "back.jsonl"
    back.write_text("".join(json.dumps(x) + "\n" for x in records))
    res = CliRunner().invoke(cli, ["review", "import", str(back)])
    assert res.exit_code == 0, res.output
    assert "3 verdicts: 2 added, 1 already stored" in res.output
    carol = [x for x in rows(sqlite_url) if x.reviewer == "carol"]
    assert {(x.pair_id, x.verdict, x.source) for x in carol} == {("pair-001", "tie", "import:back.jsonl"),
                                                                  ("pair-006", "tie", "import:back.jsonl")}
    res = CliRunner().invoke(cli, ["review", "import", str(back)])
    assert "0 added, 3 already stored" in res.output and len(rows(sqlite_url)) == 3
    # a bad line: nothing is imported, the line is named
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "pair-404"}) + "\n")
    res = CliRunner().invoke(cli, ["review", "import", str(bad)])
    assert res.exit_code == 2 and f"{bad}:2: id 'pair-404': no such preference pair" in res.output


def _verdicts_for_selection(url: str) -> None:
    """pair-001 (ai) agreed by two people, pair-006 (ai) flipped by two, pair-004 (best-of-n) tied, pair-005
    (revision) both bad; the rest unreviewed."""
    ann, bob = client(url), client(url, reviewer="bob")
    for c in (ann, bob):
        for pair, verdict in (("pair-001", "chosen"), ("pair-006", "rejected")):
            page = c.get(f"/?pair={pair}")
            _, left, csrf = shown(page.text)
            c.post("/verdict", data={"pair": pair, "left": left, "choice": review.choice_for(verdict, left),
                                     "csrf": csrf})
    for pair, verdict in (("pair-004", "tie"), ("pair-005", "both-bad")):
        judge(ann, verdict, f"?pair={pair}")


def test_export_keeps_only_what_people_confirmed_and_can_use_their_order(sqlite_url, tmp_path, monkeypatch):
    from flows.export import build_export, build_rows, make_config, select_for_export
    from flows.publish import write_export

    seed(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    _verdicts_for_selection(sqlite_url)
    with session_scope(sqlite_url) as s:
        def ids(**kw) -> list[str]:
            return [p.id for p in select_for_export(s, make_config(constitution="harmless", out=tmp_path / "x",
                                                              **kw)).pairs]

        everything = ids()
        assert "pair-006" in everything and "pair-003" not in everything  # the gated pair is out anyway
        assert ids(reviewed="agreed") == ["pair-001"]
        assert set(ids(reviewed="not-rejected")) == set(everything) - {"pair-004", "pair-005", "pair-006"}
        assert ids(reviewed="agreed", people_order=True) == ["pair-001", "pair-006"]
        cfg = make_config(constitution="harmless", out=tmp_path / "x", reviewed="agreed", people_order=True,
                          test_fraction=0)
        sel = select_for_export(s, cfg)
        assert sel.removed["reviewed agreed (not reviewed)"] == len(everything) - 4
        prefs = build_rows(s, sel, 0)["train_prefs"]
        flipped = next(r for r in prefs if r["id"] == "pair-006")
        assert flipped["chosen"][0]["content"] == "bad answer 6"
        assert flipped["rejected"][0]["content"] == "good answer 6"
        assert flipped["label_prob"] == 1.0  # both people preferred the factory's rejected reply
        data, facts = build_export(s, cfg)
        assert facts["review"]["flipped"] == 1 and facts["selection"]["reviewed"] == "agreed"
    with session_scope(sqlite_url) as s:  # the stored pair is as it was
        p = s.get(PreferencePair, "pair-006")
        assert (p.chosen_id, p.rejected_id, p.label_prob) == ("resp-006-a", "resp-006-b", 0.65)
    out = tmp_path / "export"
    write_export(data, facts, out, "jsonl")
    card = (out / "README.md").read_text()
    assert "## People's review" in card and "People checked 4 of the" in card
    assert "they agreed with the factory's label in 2 of 4 verdicts (50.0 %" in card
    assert "`--reviewed agreed`" in card and "1 pairs people flipped are exported in their order" in card
    assert "ann" not in card and "bob" not in card
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["review"]["stats"]["reviewers"] == 2


def test_training_reads_the_same_selection(sqlite_url):
    from flows.pair_selection import load_examples

    seed(sqlite_url)
    _verdicts_for_selection(sqlite_url)
    cfg = TrainConfig(database_url=sqlite_url, statuses=["ok"], reviewed="agreed", people_order=True)
    examples, _ = load_examples(cfg, sqlite_url)
    assert [(e.id, e.chosen, e.label_prob) for e in examples] == [("pair-001", "good answer 1", 0.65),
                                                                  ("pair-006", "bad answer 6", 1.0)]
    cfg = TrainConfig(database_url=sqlite_url, reviewed="not-rejected")
    examples, _ = load_examples(cfg, sqlite_url)
    assert {"pair-004", "pair-005", "pair-006"}.isdisjoint(e.id for e in examples) and len(examples) == 6
    with pytest.raises(UserError, match="reviewed agreed"):
        load_examples(TrainConfig(database_url=sqlite_url, reviewed="agreed", methods=["contrastive"]), sqlite_url)


def test_the_report_shows_agreement_and_calibration(sqlite_url, tmp_path):
    from flows.report import make_report

    seed(sqlite_url)
    _verdicts_for_selection(sqlite_url)
    data = make_report(ReportConfig(database_url=sqlite_url, out=tmp_path / "report"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>People&#x27;s review</h2>" in page
    assert "agreement with the factory" in page and "review_calibration.png" in page
    assert (tmp_path / "report" / "review_calibration.png").exists()
    # decisive verdicts: 001 C C, 006 R R (004's tie and 005's both-bad are counted beside them)
    assert (data["review"]["overall"]["agreement"]["k"], data["review"]["overall"]["agreement"]["n"]) == (2, 4)
    assert (data["review"]["human_human"]["k"], data["review"]["human_human"]["n"]) == (2, 2)


@pytest.mark.slow
def test_a_store_of_100k_pairs_answers_quickly(sqlite_url):
    """The page reads a page of the queue, never the whole store."""
    import sqlalchemy as sa

    from store.db import get_engine

    seed(sqlite_url, n=2)
    eng = get_engine(sqlite_url)
    n = 100_000
    with eng.begin() as conn:
        pair = {c.name: None for c in PreferencePair.__table__.columns}
        base = conn.execute(sa.select(PreferencePair.__table__).where(PreferencePair.id == "pair-001")).mappings().one()
        pair.update(base)
        conn.execute(PreferencePair.__table__.insert(), [
            pair | {"id": f"bulk-{i:06d}", "label_prob": (i % 100) / 100, "method": ("ai", "helpful")[i % 2]}
            for i in range(n)])
    c = client(sqlite_url)
    for path in ("/", "/?method=ai&label_max=0.3&queue=unreviewed", "/queue?queue=all", "/?principle=safer"):
        t0 = time.perf_counter()
        page = c.get(path)
        took = time.perf_counter() - t0
        assert page.status_code == 200 and ("data-pair" in page.text or "<td>" in page.text), path
        assert took < 5, f"{path} took {took:.2f} s on {n} pairs"
    judge(c, "left", "?method=ai&label_max=0.3")
    assert len(rows(sqlite_url)) == 1


def test_the_cli_refuses_a_port_it_cannot_use(sqlite_url, monkeypatch):
    import socket

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        res = CliRunner().invoke(cli, ["review", "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
    assert res.exit_code == 2 and "cannot listen there" in res.output

