"""quick_lab.report's shape: one job per module, no command line, nothing heavy on import, and the
paper's claims cited from the paper itself."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import quick_lab.report

REPORT_DIR = Path(quick_lab.report.__file__).resolve().parent
MODULES = ("results", "style", "figures", "text", "comparison", "reproduce")


def test_the_modules_the_docstring_names_exist():
    doc = quick_lab.report.__doc__
    for name in MODULES:
        assert f"``{name}``" in doc
        assert (REPORT_DIR / f"{name}.py").is_file()


def test_importing_the_package_imports_nothing_heavy():
    code = ("import sys, quick_lab.report; "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'seaborn', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPORT_DIR.parents[1])
    assert out.stdout.strip() == "[]"


def test_no_command_line_in_the_report_package():
    for path in REPORT_DIR.glob("*.py"):
        source = path.read_text()
        assert "argparse" not in source, path.name  # quick_lab.cli builds every parser
        for name in ("def add_parser", "def cmd_reproduce", "def _measure"):
            assert name not in source, f"{path.name}: {name}"


def test_the_paper_claims_cite_the_paper():
    from quick_lab.report import style

    assert set(style.PAPER) == {"fig1", "fig2", "fig3", "fig3b", "fig4", "fig5"}
    for path in REPORT_DIR.glob("*.py"):
        assert "MISSION" not in path.read_text(), path.name  # not a file of this repository
    assert "arXiv 2402.10076" in (REPORT_DIR / "style.py").read_text()


def test_reproduce_is_draw_all_then_write_report(tmp_path, monkeypatch):
    from quick_lab.report import reproduce as rep

    calls = []
    png = tmp_path / "figures" / "f.png"
    monkeypatch.setattr(rep, "draw_all", lambda d, o=None: calls.append(("draw_all", d, o)) or {"f": png})
    monkeypatch.setattr(rep, "write_report", lambda d, f: calls.append(("write_report", d, f)) or d / "REPORT.md")
    assert rep.reproduce(tmp_path) == [png, png.with_suffix(".svg"), tmp_path / "REPORT.md"]
    assert calls == [("draw_all", tmp_path, None), ("write_report", tmp_path, {"f": png})]
