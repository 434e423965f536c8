"""Prompt sets that ship with msdda, for Stable Diffusion sweeps and training (`msdda prompts`).

    load_prompt_set("colors")          # 25 prompts: one or two objects with stated colours
    load_prompt_set("color-objects")   # 64 prompts: color_object_prompts(COLORS, OBJECTS)

Both lists were written for msdda (not copied from DrawBench or any other benchmark). They live as package
files, `msdda/pipelines/prompts/<name>.txt`, in the format `--prompt-file` reads: one prompt per line,
blank lines and lines starting with `#` skipped.

The colour x object rule (`color_object_prompts`), for colours c_0..c_{m-1} and objects o_0..o_{n-1}
(m, n >= 2) and prompt index i = 0, 1, ..., count - 1 (count <= m * n, default m * n):

    a = i mod m,   b = floor(i / m)                  first pair:  colour c_a,  object o_b
    b' = (b + 1 + (a mod (n - 1))) mod n              second object, never o_b
    a' = (a + 1 + (b' mod (m - 1))) mod m             second colour, never c_a
    prompt_i = "<art> c_a o_b and <art> c_a' o_b'"

"<art>" is "an" before a colour starting with a vowel letter (a, e, i, o, u), else "a". With the full count
each (colour, object) pair is the first pair of exactly one prompt and the second pair of exactly one prompt
((a, b) -> (a', b') is a bijection: b = b' - 1 - (a mod (n - 1)) once a = a' - 1 - (b' mod (m - 1)) is known),
so the prompts are distinct and every colour and object is used equally often in both places. No random
numbers are drawn: the list depends on the two word lists only, on every Python version.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from msdda.pipelines.errors import PipelineError

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
OBJECTS: tuple[str, ...] = ("car", "chair", "cup", "bench", "umbrella", "backpack", "bicycle", "clock")

PROMPT_SETS: tuple[str, ...] = ("colors", "color-objects")
DESCRIPTIONS: dict[str, str] = {
    "colors": "one or two objects with stated colours (in the style of DrawBench's colour category)",
    "color-objects": f"color_object_prompts: {len(COLORS)} colours x {len(OBJECTS)} objects, two coloured objects each",
}
PROMPT_DIR = "prompts"  # inside the msdda.pipelines package


class PromptSetError(PipelineError):
    """An unknown prompt-set name, or word lists the colour x object rule cannot use (names the fix)."""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _check_words(words: Sequence[str], what: str) -> list[str]:
    if isinstance(words, str):
        raise PromptSetError(f"{what} must be a sequence of words, not the string {words!r}")
    out = list(words)
    if len(out) < 2:
        raise PromptSetError(
            f"{what} needs at least 2 entries (got {out!r}): a prompt's second pair differs from its first"
        )
    for w in out:
        if not isinstance(w, str) or not w.strip() or w != w.strip() or "\n" in w or w.startswith("#"):
            raise PromptSetError(
                f"{what} entry {w!r} must be non-empty text without surrounding spaces, newlines or a leading '#'"
            )
    repeated = sorted({w for w in out if out.count(w) > 1})
    if repeated:
        raise PromptSetError(f"{what} repeats {repeated}; give each once")
    return out


def color_object_prompts(
    colors: Sequence[str] = COLORS, objects: Sequence[str] = OBJECTS, count: int | None = None
) -> list[str]:
    """The colour x object prompts of the module docstring's rule: `count` prompts (default
    len(colors) * len(objects)), each "a <colour> <object> and a <colour> <object>", all distinct."""
    cs = _check_words(colors, "colors")
    os_ = _check_words(objects, "objects")
    m, n = len(cs), len(os_)
    total = m * n
    if count is None:
        count = total
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise PromptSetError(f"count={count!r}; it must be an integer in [1, {total}] ({m} colours x {n} objects)")
    prompts = []
    for i in range(count):
        a, b = i % m, i // m
        b2 = (b + 1 + a % (n - 1)) % n
        a2 = (a + 1 + b2 % (m - 1)) % m
        c1, o1, c2, o2 = cs[a], os_[b], cs[a2], os_[b2]
        prompts.append(f"{_article(c1)} {c1} {o1} and {_article(c2)} {c2} {o2}")
    return prompts


def parse_prompts(text: str) -> list[str]:
    """One prompt per line, stripped; blank lines and lines starting with '#' skipped (the --prompt-file format)."""
    lines = (line.strip() for line in text.splitlines())
    return [p for p in lines if p and not p.startswith("#")]


def prompt_set_file(name: str) -> resources.abc.Traversable:
    """The package file that holds prompt set `name` (PromptSetError for an unknown name)."""
    if name not in PROMPT_SETS:
        raise PromptSetError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    return resources.files("msdda.pipelines").joinpath(PROMPT_DIR, f"{name}.txt")


def load_prompt_set(name: str) -> list[str]:
    """The prompts of set `name` (one of PROMPT_SETS), in file order."""
    path = prompt_set_file(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # a broken installation, not a user's mistake
        raise PromptSetError(
            f"prompt set {name!r}: cannot read its package file {path} ({exc}); reinstall msdda"
        ) from exc
    return parse_prompts(text)


def format_prompts(prompts: Sequence[str]) -> str:
    """The --prompt-file text of `prompts`: one per line, ending with a newline."""
    return "".join(f"{p}\n" for p in prompts)


def color_objects_file_text() -> str:
    """The exact text of the shipped prompts/color-objects.txt: a comment header, then
    color_object_prompts(COLORS, OBJECTS) one per line (a test checks the file equals it). Regenerate with
    python -c "from msdda.pipelines.prompt_sets import *; print(color_objects_file_text(), end='')" > FILE."""
    prompts = color_object_prompts(COLORS, OBJECTS)
    header = (
        f'# msdda prompt set "color-objects": {len(prompts)} prompts generated by\n'
        "# msdda.pipelines.prompt_sets.color_object_prompts(COLORS, OBJECTS) (the rule is in that module's docstring;\n"
        "# tests/test_prompt_sets.py checks this file equals color_objects_file_text()). Do not edit by hand.\n"
        f"# colours: {', '.join(COLORS)}\n"
        f"# objects: {', '.join(OBJECTS)}\n"
    )
    return header + format_prompts(prompts)


__all__ = [
    "COLORS",
    "DESCRIPTIONS",
    "OBJECTS",
    "PROMPT_SETS",
    "PromptSetError",
    "color_object_prompts",
    "color_objects_file_text",
    "format_prompts",
    "load_prompt_set",
    "parse_prompts",
    "prompt_set_file",
]
