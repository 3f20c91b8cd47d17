#!/usr/bin/env python3
"""Print the README's environment-variable table from train_gpt.py's SETTINGS (the one declaration).

    python3 tools/settings_table.py            # print the markdown table
    python3 tools/settings_table.py --update   # rewrite the table between the markers in README.md
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402

BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def shown(value) -> str:
    return f"`{int(value) if isinstance(value, bool) else value}`"


def table() -> str:
    """One row per setting: its default, the value each PRESET gives it where that differs, its help."""
    rows = ["| variable | default | presets | what it does |", "|---|---|---|---|"]
    group = None
    for s in train_gpt.SETTINGS:
        if s.group != group:
            group = s.group
            rows.append(f"| **{group}** | | | |")
        default = "(uuid)" if s.name == "RUN_ID" else shown(s.default)
        presets = ", ".join(f"{name}: {shown(values[s.name])}" for name, values in train_gpt.PRESETS.items()
                            if s.name in values)
        choices = f" One of: {', '.join(f'`{c}`' for c in s.choices)}." if s.choices else ""
        rows.append(f"| `{s.name}` | {default} | {presets} | {s.help}.{choices} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true",
                        help="rewrite the table between the settings-table markers in README.md instead of printing it")
    args = parser.parse_args(argv)
    if not args.update:
        print(table())
        return
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        sys.exit(f"error: {readme} has no {BEGIN} ... {END} markers: put them where the table goes")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
