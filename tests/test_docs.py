"""The README stays true: every setting appears in its table with its current default, the
quick-start commands are Makefile targets, `make setup` installs every package the code imports,
and CI runs exactly the README's test command."""
import ast
import importlib.metadata
import re
import shlex
import subprocess
import sys

from conftest import ROOT, tg

sys.path.insert(0, str(ROOT / "tools"))
import settings_table  # noqa: E402

# The files `make test` and `make smoke` import: the trainer, the tests, the tools, the data tools.
CODE = [ROOT / "train_gpt.py", *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "tools").glob("*.py")),
        *sorted((ROOT / "data").glob("*.py"))]
LOCAL = {p.stem for p in CODE} | {p.parent.name for p in ROOT.glob("*/__init__.py")}  # and the project's packages
# Modules that only a GPU machine has: triton ships inside the CUDA build of torch (not the CPU one), and
# the tests that import it skip cleanly without it.
GPU_ONLY = {"triton"}


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def makefile_targets() -> set:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_readme_table_lists_every_setting_with_its_default():
    table = readme().split("<!-- settings-table:begin -->")[1].split("<!-- settings-table:end -->")[0]
    for s in tg.SETTINGS:
        default = int(s.default) if isinstance(s.default, bool) else s.default
        shown = "(uuid)" if s.name == "RUN_ID" else f"`{default}`"
        assert f"| `{s.name}` | {shown} |" in table, f"{s.name} missing or stale: run python3 tools/settings_table.py --update"
    assert len(re.findall(r"^\| `[A-Z_0-9]+` \|", table, re.M)) == len(tg.SETTINGS)
    assert table.strip() == settings_table.table(), "README table is stale: run python3 tools/settings_table.py --update"


def test_settings_table_has_a_real_help(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "settings_table.py")]
    r = subprocess.run(tool + ["--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "--update" in r.stdout
    assert "| variable |" not in r.stdout
    r = subprocess.run(tool + ["--updte"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --updte" in r.stderr
    r = subprocess.run(tool, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == settings_table.table()


def test_every_setting_has_help_and_a_unique_name():
    names = [s.name for s in tg.SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.help and s.name.isupper() for s in tg.SETTINGS)
    assert all(s.default in s.choices for s in tg.SETTINGS if s.choices)


# --- the README's commands ----------------------------------------------------------------------------


def test_quick_start_commands_are_makefile_targets():
    block = readme().split("## Quick start")[1].split("```bash")[1].split("```")[0]
    commands = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert [c[:1] for c in commands] == [["make"]] * len(commands) and len(commands) >= 2, block
    targets = makefile_targets()
    for command in commands:
        assert len(command) == 2 and command[1] in targets, f"README quick start runs `{' '.join(command)}': no such Makefile target"
    # Every `make X` in the README's code (blocks and inline spans, not prose) is a target too.
    code = "\n".join(re.findall(r"```.*?```", readme(), re.S) + re.findall(r"`[^`\n]+`", readme()))
    for target in re.findall(r"\bmake ([a-z][a-z-]*)", code):
        assert target in targets, f"README mentions `make {target}`: no such Makefile target"


def effective_commands(script: str) -> list:
    """The commands of a shell script that do something: not comments, the shebang or shell options."""
    lines = [line.split(" #")[0].strip() for line in script.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set -"))]


def test_ci_runs_exactly_the_readme_test_command():
    commands = effective_commands((ROOT / ".ci" / "run").read_text())
    assert commands == ['cd "$(dirname "$0")/.."', "make test"], commands
    assert "make test" in readme().split("## Quick start")[1].split("```")[1]


# --- `make setup` installs what the code imports ---------------------------------------------------------


def setup_requirement_files() -> list:
    """The requirements files `make setup` installs, read from its recipe, with their -r includes."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("setup:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t") and not (recipe and recipe[-1].endswith("\\")):
            break
        recipe.append(line)
    files = [ROOT / name for name in re.findall(r"pip install[^\n]*?-r (\S+)", "\n".join(recipe))]
    assert files, "make setup installs no requirements file"
    for path in files:  # follow -r includes
        for line in path.read_text().splitlines():
            if line.startswith("-r "):
                files.append(path.parent / line.split()[1])
    return files


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def required_distributions() -> set:
    names = set()
    for path in setup_requirement_files():
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.add(normalize(re.split(r"[<>=!~;\[ ]", line)[0]))
    return names


def optional_import(node, parents) -> bool:
    """An import inside `try: ... except ImportError` (ModuleNotFoundError, Exception): used when present."""
    for parent in parents.get(node, []):
        if isinstance(parent, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError", "Exception")
                for h in parent.handlers):
            return True
    return False


def imported_modules(path) -> set:
    """Top-level names of the modules a file imports, except the optional ones and relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {}
    stack = [(tree, [])]
    while stack:
        node, chain = stack.pop()
        for child in ast.iter_child_nodes(node):
            parents[child] = chain + [node]
            stack.append((child, chain + [node]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not optional_import(node, parents):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_make_setup_installs_every_imported_package():
    required = required_distributions()
    owners = importlib.metadata.packages_distributions()
    missing = []
    for path in CODE:
        for module in sorted(imported_modules(path) - LOCAL - GPU_ONLY - set(sys.stdlib_module_names) - {"__future__"}):
            dists = owners.get(module)
            if not dists:
                missing.append(f"{path.relative_to(ROOT)} imports {module}, which is not installed")
            elif not {normalize(d) for d in dists} & required:
                missing.append(f"{path.relative_to(ROOT)} imports {module} (distribution {dists[0]}), "
                               f"which no requirements file of `make setup` names")
    assert not missing, "add these to requirements-test.txt (tests) or requirements.txt (runtime):\n" + "\n".join(missing)
    assert {"torch", "pytest"} <= required


def test_the_import_check_sees_what_it_must(tmp_path):
    # The checker itself: it finds a plain import, a from-import inside a function and skips an optional one.
    path = tmp_path / "probe.py"
    path.write_text("import numpy as np\ndef f():\n    from scipy import stats\n"
                    "try:\n    import flash_attn_interface\nexcept ImportError:\n    pass\nfrom . import sibling\n")
    assert imported_modules(path) == {"numpy", "scipy"}
    assert normalize("huggingface_hub") == normalize("huggingface-hub") == "huggingface-hub"
    assert {"torch", "numpy", "sentencepiece", "brotli", "huggingface-hub", "pytest"} <= required_distributions()
