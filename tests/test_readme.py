"""Numbers and tables in the README and docs/ come from the code: recompute them."""

from __future__ import annotations

import re
from pathlib import Path

import fxblur
from fxblur.inspect import parser
from fxblur.models import build

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PLACEMENTS_GUIDE = ROOT / "docs" / "placements.md"
PLACEMENTS = {
    "blur before (default)": {},
    "blur after (`blur_first=False`)": {"blur_first": False},
    "past the nonlinearity (`past_nonlinearity=True`)": {"past_nonlinearity": True},
    '`preset="composer"`': {"preset": "composer"},
    '`preset="zhang2019"`': {"preset": "zhang2019"},
    "polyphase, phase before (`polyphase=True`)": {"polyphase": True},
    "polyphase, published form (`polyphase=True, blur_first=False`)": {"polyphase": True, "blur_first": False},
}


def table_rows(marker: str, document: Path = README) -> list[list[str]]:
    text = document.read_text()
    block = re.search(f"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, re.S).group(1)
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in block.strip().splitlines()[2:]]


def test_placement_cost_table_matches_the_report():
    rows = table_rows("placement-costs", PLACEMENTS_GUIDE)
    assert [row[0] for row in rows] == list(PLACEMENTS)
    for label, extra_macs, overhead, memory in rows:
        report = fxblur.report(
            fxblur.transform(build("resnet50"), verbose=False, **PLACEMENTS[label]), (1, 3, 224, 224)
        )
        extra_bytes = sum(row.extra_bytes for row in report.rows)
        assert extra_macs == f"{(report.macs_after - report.macs_before) / 1e6:.1f}M", label
        assert overhead == f"{report.overhead:+.2%}", label
        assert memory == f"{extra_bytes / 2**20:.1f} MiB", label


def test_quick_start_excerpt_is_real_output(capsys):
    from fxblur.inspect import main

    assert main(["resnet50"]) == 0
    printed = capsys.readouterr().out.splitlines()
    excerpt = README.read_text().split("```\ntarget")[1].split("```")[0]
    for line in ("target" + excerpt).strip().splitlines():
        assert line == "..." or line in printed, line


def test_cli_table_names_every_option_of_inspect_and_no_other():
    documented = set()
    for row in table_rows("cli"):
        documented |= set(re.findall(r"`(--[a-z-]+)", row[0]))
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", parser().format_help())) - {"--help"}
    assert documented == options
