"""The README stays true: every setting appears in its table with its current default, and the
two quick-start commands exist in the Makefile."""
import re

from conftest import ROOT, tg


def test_readme_table_lists_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- settings-table:begin -->")[1].split("<!-- settings-table:end -->")[0]
    for s in tg.SETTINGS:
        default = int(s.default) if isinstance(s.default, bool) else s.default
        shown = "(uuid)" if s.name == "RUN_ID" else f"`{default}`"
        assert f"| `{s.name}` | {shown} |" in table, f"{s.name} missing or stale: run python3 tools/settings_table.py --update"
    assert len(re.findall(r"^\| `[A-Z_0-9]+` \|", table, re.M)) == len(tg.SETTINGS)


def test_quick_start_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("smoke", "test", "data", "train", "bench"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    readme = (ROOT / "README.md").read_text()
    assert "make smoke" in readme and "make test" in readme


def test_every_setting_has_help_and_a_unique_name():
    names = [s.name for s in tg.SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.help and s.name.isupper() for s in tg.SETTINGS)
    assert all(s.default in s.choices for s in tg.SETTINGS if s.choices)
