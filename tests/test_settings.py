"""The settings table is the one place a default, a choice list or a rule is written."""

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.settings import COMMANDS, SETTINGS, TRAIN_DEFAULTS, command_settings, read_settings, write_settings
from kdcache.settings.files import file_keys
from kdcache.settings.table import GROUPS, REQUIRED, settings_markdown

ROOT = Path(__file__).resolve().parents[1]
#: Settings whose table default is a value (not "not given"), by name.
VALUED = {s.name for s in SETTINGS.values() if any(u.default not in (None, REQUIRED) for u in s.uses.values())}


def _literal(node: ast.expr | None) -> bool:
    """A default written out as a value: a number, text, True/False or a tuple of them (None means not given)."""
    if isinstance(node, ast.Constant):
        return node.value is not None
    if isinstance(node, ast.UnaryOp):
        return _literal(node.operand)
    if isinstance(node, ast.BinOp):
        return _literal(node.left) and _literal(node.right)
    return isinstance(node, ast.Tuple) and all(_literal(e) for e in node.elts)


def _written_again(path: Path) -> list[str]:
    """Places in ``path`` that write a setting's default themselves: parameter defaults, dataclass fields and
    click options."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            pairs = list(zip(args.args[::-1], args.defaults[::-1], strict=False))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            found += [f"{node.name}({a.arg}=...)" for a, d in pairs if a.arg in VALUED and _literal(d)]
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                named = isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                if named and item.target.id in VALUED and _literal(item.value):
                    found.append(f"{node.name}.{item.target.id}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "option":
            found += [f"click option default={ast.unparse(k.value)}" for k in node.keywords if k.arg == "default"]
    return [f"{path.relative_to(ROOT)}: {where}" for where in found]


def test_each_default_is_written_once():
    files = [p for folder in ("pipeline", "cli") for p in sorted((ROOT / folder).rglob("*.py"))]
    found = [w for p in files if p.name != "table.py" for w in _written_again(p)]
    assert found == []


def test_the_check_finds_a_default_written_again(tmp_path):
    code = "def f(*, epochs: int = 240, lr=None):\n    pass\nclass C:\n    batch_size: int = 64\n"
    (tmp_path / "m.py").write_text(code)
    found = _written_again_at(tmp_path / "m.py")
    assert found == ["f(epochs=...)", "C.batch_size"]


def _written_again_at(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return [w.split(": ", 1)[1] for w in _written_again(path)]
    finally:
        ROOT = saved


def test_every_setting_is_described_and_grouped():
    for setting in SETTINGS.values():
        assert setting.group in GROUPS, setting.name
        assert set(setting.uses) <= set(COMMANDS), setting.name
        for command in setting.uses:
            assert setting.help_for(command).strip(), (setting.name, command)
        if setting.choices:
            assert all(setting.default(c) in (None, *setting.choices) for c in setting.uses), setting.name


def _command(name: str):
    command = main
    for part in name.split():
        command = command.commands[part]
    return command


@pytest.mark.parametrize("name", COMMANDS)
def test_the_command_line_is_the_table(name):
    """Every option of a command comes from the table, with the table's default and help, and nothing else."""
    params = {p.name: p for p in _command(name).params if p.param_type_name == "option" and not p.hidden}
    params.pop("help", None)
    assert set(params) == {s.name for s in command_settings(name)}
    for setting in command_settings(name):
        option = params[setting.name]
        assert option.help.startswith(setting.help_for(name)), setting.name
        if setting.kind in ("int", "float") and setting.default(name) is not None:
            assert option.type.convert(option.default, option, None) == setting.default(name)


@pytest.mark.parametrize("name", ["dump-logits", "train-student"])
def test_config_keys_are_the_table(name):
    expected = {s.key for s in command_settings(name) if s.name not in ("config", "base_temp")}
    aliases = {a.lstrip("-") for s in command_settings(name) for a in s.uses[name].aliases}
    assert set(file_keys(name)) == expected | aliases


def test_library_defaults_are_the_table():
    import inspect

    import kdcache

    assert kdcache.TrainConfig(student="resnet8").epochs == TRAIN_DEFAULTS.epochs == 240
    loader = inspect.signature(kdcache.DistillLoader.__init__).parameters
    assert loader["batch_size"].default == TRAIN_DEFAULTS.batch_size
    assert inspect.signature(kdcache.dump_logits).parameters["batch_size"].default == 256


def test_help_lists_options_under_their_groups():
    result = CliRunner().invoke(main, ["train-student", "--help"])
    assert result.exit_code == 0
    sections = [line for line in result.output.splitlines() if line.endswith(" options:")]
    groups = [g for g in GROUPS if any(s.group == g for s in command_settings("train-student"))]
    assert sections == [f"{g} options:" for g in groups] + ["Other options:"]  # --help itself


def test_an_old_flag_works_and_says_it_is_deprecated(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "dump-logits",
            "--seed",
            "-1",
            "--teacher",
            "resnet8",
            "--dataset",
            "digits",
            "--augment",
            "cifar",
            "--views",
            "1",
            "--out",
            str(tmp_path / "c.zarr"),
        ],
    )
    assert result.exit_code == 2
    assert "warning: --seed is deprecated: use --view-seed" in result.output
    assert "error: --view-seed must be in 0 .. 2**64 - 1, got -1" in result.output
    both = CliRunner().invoke(main, ["dump-logits", "--seed", "1", "--view-seed", "1"])
    assert both.exit_code == 2 and "given twice" in both.output


def test_an_old_key_in_a_config_file_still_loads(tmp_path):
    path = tmp_path / "dump.yaml"
    path.write_text("seed: 3\nviews: 2\n")
    with pytest.warns(FutureWarning, match="seed .* is deprecated: use view-seed"):
        assert read_settings(path, "dump-logits") == {"view_seed": 3, "views": 2}
    path.write_text("seed: 3\nview-seed: 4\n")
    with pytest.raises(Exception, match="view-seed is given twice"), pytest.warns(FutureWarning):
        read_settings(path, "dump-logits")


def test_a_written_config_reads_back(tmp_path):
    settings = {"epochs": 3, "lr_milestones": (1, 2), "cache": ["a.zarr"], "cache_memory": 1 << 20, "plot": ""}
    assert read_settings(write_settings(settings, tmp_path / "c.yaml"), "train-student") == {
        **settings,
        "lr_milestones": (1, 2),
    }


def test_the_settings_doc_is_the_table():
    doc = ROOT / "docs" / "settings.md"
    assert doc.read_text() == settings_markdown(), (
        'docs/settings.md is out of date: python -c "from kdcache.settings.table import settings_markdown as m; '
        "print(m(), end='')\" > docs/settings.md"
    )
