"""Named sets of zero-shot classification prompt templates, kept as data beside this module.

Each set is `<name>.txt`: one template a line, `{}` where the class name goes.
`openai_imagenet` holds the 80 templates of CLIP's ImageNet evaluation, in the order CLIP
and CLIP_benchmark list them, so that class embeddings (their mean) match published ones.
"""

from __future__ import annotations

from importlib import resources

from vlp.errors import ConfigError


def template_set_names() -> list[str]:
    """The names of the template sets shipped with vlp."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name.removesuffix(".txt") for f in files if f.name.endswith(".txt"))


def template_set(name: str, key: str) -> list[str]:
    """The templates of the set `name`; ConfigError naming `key` and the sets if unknown."""
    names = template_set_names()
    if name not in names:
        raise ConfigError(
            f"{key}: {name!r} is not a template file or one of the named sets: {', '.join(names)}"
        )
    text = resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
