"""The shipped prompt sets (msdda.pipelines.prompt_sets) and `msdda prompts`."""

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msdda.cli import app
from msdda.errors import MSDDAError
from msdda.pipelines.cli import _read_prompt_file
from msdda.pipelines.prompt_sets import (
    COLORS,
    OBJECTS,
    PROMPT_SETS,
    PromptSetError,
    color_object_prompts,
    color_objects_file_text,
    format_prompts,
    load_prompt_set,
    parse_prompts,
    prompt_set_file,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT_DIR = ROOT / "src" / "msdda" / "pipelines" / "prompts"
COUNTS = {"colors": 25, "color-objects": 64}


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _text(output: str) -> str:
    """typer's error box flattened to one line of words."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


def test_names_and_counts():
    assert PROMPT_SETS == ("colors", "color-objects")
    assert {name: len(load_prompt_set(name)) for name in PROMPT_SETS} == COUNTS


@pytest.mark.parametrize("name", ["colors", "color-objects"])
def test_prompts_are_unique_clean_lines(name):
    prompts = load_prompt_set(name)
    assert len(set(prompts)) == len(prompts)
    assert len({p.lower() for p in prompts}) == len(prompts)
    for p in prompts:
        assert p == p.strip() and p and "\n" not in p and not p.startswith("#")
        assert re.fullmatch(r"[a-z][a-z ]*[a-z]", p), p  # lower-case words and single spaces
        assert "  " not in p
        assert re.match(r"(a [^aeiou]|an [aeiou])", p), p  # the article fits the next word
    # every prompt states at least one colour
    colour_words = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown",
                    "gray", "silver", "gold"}
    assert all(colour_words & set(p.split()) for p in prompts)


def test_colors_set_values():
    prompts = load_prompt_set("colors")
    assert prompts[0] == "a yellow teapot on a green table"
    assert prompts[-1] == "a yellow banana and a blue mug"
    # the shipped file holds exactly these prompts after its comment header
    lines = (PROMPT_DIR / "colors.txt").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if not line.startswith("#")] == prompts


def test_color_object_rule_values():
    assert color_object_prompts(count=4) == [
        "a red car and a yellow chair",
        "an orange car and a blue cup",
        "a yellow car and a white bench",
        "a green car and a red umbrella",
    ]
    prompts = color_object_prompts()
    assert prompts[8] == "a red chair and a green cup"  # i = 8: a = 0, b = 1, b' = 2, a' = 0 + 1 + 2 = 3
    assert prompts[-1] == "a black clock and a red car"  # i = 63: a = b = 7, b' = (7+1+0) % 8 = 0, a' = (7+1+0) % 8 = 0
    assert len(prompts) == len(COLORS) * len(OBJECTS) == 64
    assert color_object_prompts(COLORS, OBJECTS, 10) == prompts[:10]  # a count is a prefix


def _pairs(prompt: str) -> tuple[tuple[str, str], tuple[str, str]]:
    first, second = prompt.split(" and ")
    (_, c1, o1), (_, c2, o2) = first.split(" "), second.split(" ")
    return (c1, o1), (c2, o2)


def test_color_object_rule_properties():
    prompts = color_object_prompts()
    pairs = [_pairs(p) for p in prompts]
    everything = {(c, o) for c in COLORS for o in OBJECTS}
    assert {p[0] for p in pairs} == everything  # each (colour, object) is the first pair of one prompt ...
    assert {p[1] for p in pairs} == everything  # ... and the second pair of one prompt
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in pairs)  # two colours, two objects in every prompt
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # no prompt is another one's mirror image
    # first pair in the order of the rule: colour index i mod 8, object index i // 8
    assert [p[0] for p in pairs] == [(COLORS[i % 8], OBJECTS[i // 8]) for i in range(64)]


def test_color_object_rule_other_lists_and_articles():
    prompts = color_object_prompts(["amber", "teal", "indigo"], ["egg", "box"])
    assert prompts == [
        "an amber egg and an indigo box",  # i = 0: a = 0, b = 0, b' = 1, a' = (0 + 1 + 1) % 3 = 2
        "a teal egg and an amber box",
        "an indigo egg and a teal box",
        "an amber box and a teal egg",  # i = 3: a = 0, b = 1, b' = 0, a' = 1
        "a teal box and an indigo egg",
        "an indigo box and an amber egg",
    ]
    assert color_object_prompts(["red", "blue"], ["cat", "dog"], count=1) == ["a red cat and a blue dog"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"colors": ["red"]}, "colors needs at least 2"),
        ({"objects": ["car"]}, "objects needs at least 2"),
        ({"colors": "red,blue"}, "not the string"),
        ({"colors": ["red", "red", "blue"]}, r"colors repeats \['red'\]"),
        ({"objects": ["car", " cup"]}, "without surrounding spaces"),
        ({"objects": ["car", ""]}, "non-empty"),
        ({"objects": ["car", "#cup"]}, "leading '#'"),
        ({"count": 0}, r"count=0; it must be an integer in \[1, 64\]"),
        ({"count": 65}, r"\[1, 64\] \(8 colours x 8 objects\)"),
        ({"count": 2.0}, "count=2.0"),
        ({"count": True}, "count=True"),
    ],
)
def test_color_object_rule_errors(kwargs, match):
    with pytest.raises(PromptSetError, match=match) as info:
        color_object_prompts(**kwargs)
    assert isinstance(info.value, MSDDAError)


def test_shipped_color_objects_file_is_the_rule():
    """The package file equals the rule's output byte for byte (regenerate it with color_objects_file_text)."""
    text = (PROMPT_DIR / "color-objects.txt").read_text(encoding="utf-8")
    assert text == color_objects_file_text()
    assert load_prompt_set("color-objects") == color_object_prompts(COLORS, OBJECTS)
    assert "# colours: red, orange, yellow, green, blue, purple, white, black" in text.splitlines()


def test_unknown_name_is_a_typed_error_listing_the_names():
    with pytest.raises(PromptSetError, match=r"unknown prompt set 'drawbench'; choose one of colors, color-objects"):
        load_prompt_set("drawbench")
    with pytest.raises(PromptSetError, match="unknown prompt set"):
        prompt_set_file("../colors")  # no path tricks: only the listed names
    assert issubclass(PromptSetError, MSDDAError)


def test_parse_and_format_round_trip(tmp_path):
    assert parse_prompts("# header\n\n  a red cube  \n#skip\na blue ball\n") == ["a red cube", "a blue ball"]
    prompts = load_prompt_set("colors")
    assert format_prompts(prompts).endswith("a blue mug\n")
    assert parse_prompts(format_prompts(prompts)) == prompts
    (tmp_path / "p.txt").write_text(format_prompts(prompts))
    assert _read_prompt_file(tmp_path / "p.txt") == prompts  # what `msdda sample/sweep --prompt-file` reads


def test_cli_lists_sets_with_counts():
    result = _invoke("prompts")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["colors", "25", "prompts"]
    assert lines[1].split()[:3] == ["color-objects", "64", "prompts"]


@pytest.mark.parametrize("name", ["colors", "color-objects"])
def test_cli_prints_a_set_one_per_line(name):
    result = _invoke("prompts", name)
    assert result.exit_code == 0, result.output
    assert result.output == format_prompts(load_prompt_set(name))


def test_cli_writes_the_prompt_file_format(tmp_path):
    out = tmp_path / "sub" / "colors.txt"  # a missing folder is made
    result = _invoke("prompts", "colors", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote 25 prompts of 'colors' to {out}" in result.output
    assert out.read_text(encoding="utf-8") == format_prompts(load_prompt_set("colors"))
    assert _read_prompt_file(out) == load_prompt_set("colors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["colors.txt"]  # no temp file left


def test_cli_never_replaces_a_users_file_without_overwrite(tmp_path):
    out = tmp_path / "mine.txt"
    out.write_text("my own prompts\n")
    result = _invoke("prompts", "colors", "--out", str(out))
    assert result.exit_code == 2
    assert "exists; pass --overwrite" in _text(result.output)
    assert out.read_text() == "my own prompts\n"  # untouched
    result = _invoke("prompts", "color-objects", "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == format_prompts(color_object_prompts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["prompts", "nope"], "unknown prompt set 'nope'; choose one of colors, color-objects"),
        (["prompts", "--out", "x.txt"], "--out and --overwrite need a prompt set NAME"),
    ],
)
def test_cli_errors(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 2
    assert match in _text(result.output)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_refuses_a_folder_or_a_file_in_the_way(tmp_path):
    result = _invoke("prompts", "colors", "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a folder; name a file" in _text(result.output)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = _invoke("prompts", "colors", "--out", str(blocker / "colors.txt"))
    assert result.exit_code != 0
    assert "is an existing file, not a folder" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "x"


def test_entry_prints_one_error_line(tmp_path, capsys):
    from msdda.cli import entry

    entry(["prompts", "colors", "--out", str(tmp_path / "new" / "x.txt")])  # a missing folder is made
    assert _read_prompt_file(tmp_path / "new" / "x.txt") == load_prompt_set("colors")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as info:
        entry(["prompts", "colors", "--out", str(tmp_path / "f" / "x.txt")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out's folder") and err.count("\n") == 1


def test_pyproject_ships_the_prompt_files():
    """The package-data globs of pyproject.toml cover every prompt file (else a wheel would lack them)."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["msdda"]
    package = ROOT / "src" / "msdda"
    shipped = {p for pattern in data for p in package.glob(pattern)}
    assert {PROMPT_DIR / f"{name}.txt" for name in PROMPT_SETS} <= shipped
    assert sorted(p.name for p in PROMPT_DIR.iterdir()) == sorted(f"{name}.txt" for name in PROMPT_SETS)


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="building a wheel offline needs setuptools installed"
)
def test_wheel_contains_the_prompt_files(tmp_path):
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(tmp_path / "dist"), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("msdda-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in PROMPT_SETS:
            text = z.read(f"msdda/pipelines/prompts/{name}.txt").decode()
            assert parse_prompts(text) == load_prompt_set(name)
