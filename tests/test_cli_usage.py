"""``clproxy usage``: the JSON shape exactly, the table, --by/--since, a missing or busy ledger."""

import io
import json
import os
import subprocess
import sys

from twisted.internet import task

from clproxy.cli import main as cli_main
from clproxy.cli import usage as usage_cli
from clproxy.team.usage import UsageLedger, UsageRow, ledger_path

DAY = 86400.0
T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z
FIELDS = ["requests", "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
          "cost_usd"]


def fill(home, *, stop=True):
    ledger = UsageLedger(ledger_path(str(home)), task.Clock())
    ledger.open()
    ledger.record(UsageRow("alice", "acct1", "claude-sonnet-4-5", 10, 20, 3, 4, 100, 0.25, 200, 1.0, T0))
    ledger.record(UsageRow("bob", "acct2", "claude-opus-4-5", 1, 2, 0, 0, 0, None, 200, 1.0, T0 + DAY))
    ledger.sync()
    if stop:
        ledger.stop()
    return ledger


def run(argv, home, now=T0 + 2 * DAY):
    out, err = io.StringIO(), io.StringIO()
    code = usage_cli.main(argv, stdout=out, stderr=err, environ={"CLPROXY_HOME": str(home)}, now=lambda: now)
    return code, out.getvalue(), err.getvalue()


def test_json_shape_exactly(tmp_path):
    """{"rows": [{BY_FIELD, requests, input_tokens, output_tokens, cache_creation_input_tokens,
    cache_read_input_tokens, cost_usd}]} and nothing else, for every --by."""
    fill(tmp_path)
    for by in ("key", "account", "model", "day"):
        code, out, err = run(["--by", by, "--format", "json"], tmp_path)
        assert code == 0, err
        document = json.loads(out)
        assert list(document) == ["rows"]
        assert len(document["rows"]) == 2
        for row in document["rows"]:
            assert list(row) == [by] + FIELDS
    code, out, _ = run(["--by", "key", "--format", "json"], tmp_path)
    assert json.loads(out)["rows"] == [
        {"key": "alice", "requests": 1, "input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 7,
         "cache_read_input_tokens": 100, "cost_usd": 0.25},
        {"key": "bob", "requests": 1, "input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 0, "cost_usd": None},
    ]
    code, out, _ = run(["--by", "day", "--format", "json"], tmp_path)
    assert [row["day"] for row in json.loads(out)["rows"]] == ["2026-05-28", "2026-05-29"]


def test_since(tmp_path):
    """--since YYYY-MM-DD and Nd select rows from then on; a bad value is one line, exit 2."""
    fill(tmp_path)
    _, out, _ = run(["--since", "2026-05-29", "--format", "json"], tmp_path)
    assert [row["key"] for row in json.loads(out)["rows"]] == ["bob"]
    _, out, _ = run(["--since", "1d", "--format", "json"], tmp_path, now=T0 + 1.5 * DAY)
    assert [row["key"] for row in json.loads(out)["rows"]] == ["bob"]
    code, out, err = run(["--since", "last week"], tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--since" in err


def test_table(tmp_path):
    """Text output: a header, one line per row, a total; unpriced cost shown as '-'."""
    fill(tmp_path)
    code, out, _ = run(["--by", "model"], tmp_path)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "REQUESTS"]
    assert lines[1].split()[0] == "claude-opus-4-5" and lines[1].split()[-1] == "-"
    assert lines[2].split()[-1] == "0.2500"
    assert lines[3].split()[0] == "TOTAL" and lines[3].split()[1] == "2"


def test_no_ledger_yet(tmp_path):
    """No database: empty rows (and none is created)."""
    code, out, _ = run(["--format", "json"], tmp_path)
    assert code == 0 and json.loads(out) == {"rows": []}
    assert not os.path.exists(ledger_path(str(tmp_path)))
    code, out, _ = run([], tmp_path)
    assert code == 0 and "no usage recorded" in out


def test_bad_by(tmp_path):
    """An unknown --by is a usage error, exit 2."""
    code, _, err = run(["--by", "colour"], tmp_path)
    assert code == 2 and "--by" in err


def test_registered_in_clproxy_main(tmp_path, monkeypatch, capsys):
    """``clproxy usage`` is a top-level command."""
    fill(tmp_path)
    monkeypatch.setenv("CLPROXY_HOME", str(tmp_path))
    assert cli_main.main(["usage", "--format", "json", "--by", "account"]) == 0
    assert [row["account"] for row in json.loads(capsys.readouterr().out)["rows"]] == ["acct1", "acct2"]


def test_reads_while_a_writer_has_it_open(tmp_path):
    """The command (a separate process) reads the ledger while the daemon's ledger holds it open."""
    ledger = fill(tmp_path, stop=False)
    try:
        ledger.record(UsageRow("carol", "acct1", "m", 1, 1, 0, 0, 0, None, 200, 1.0, T0))
        ledger.sync()
        env = dict(os.environ, CLPROXY_HOME=str(tmp_path), PYTHONPATH=os.getcwd())
        done = subprocess.run([sys.executable, "-m", "clproxy", "usage", "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert [row["key"] for row in json.loads(done.stdout)["rows"]] == ["alice", "bob", "carol"]
    finally:
        ledger.stop()
