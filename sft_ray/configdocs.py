"""The config reference, generated from the schema's field descriptions into docs/config.md
(``python -m sft_ray.configdocs --update``; a test keeps the two in step)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from sft_ray.config import RunConfig, Tagged, applies_to, union_members

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def reference_markdown() -> str:
    """The config reference as a Markdown table, generated from the field descriptions
    (docs/config.md holds it; a test keeps the two in step)."""
    rows = ["| key | default | description |", "|---|---|---|"]

    seen: set[str] = set()

    def walk(model: type[BaseModel], prefix: str, note: str = "") -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            members = union_members(ann)
            if members:  # one section per verifier type / backend: each key once, with the types that take it
                for m in members:
                    walk(m, f"{prefix}{name}.", note)
                continue
            own = note or (applies_to(model, name) if isinstance(model, type) and issubclass(model, Tagged) else "")
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.", own)
                continue
            key = f"{prefix}{name}"
            if key in seen:
                continue
            seen.add(key)
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            desc = f"*Only {own}.* {desc}" if own else desc
            rows.append(f"| `{key}` | `{default}` | {desc} |")

    walk(RunConfig, "")
    return "\n".join(rows)


def update_docs(path: str | Path = DOCS) -> None:
    """Replace the config table of docs/config.md (between its markers) with the current reference."""
    p = Path(path)
    text = p.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    p.write_text(head + START + reference_markdown() + "\n" + END + tail)


if __name__ == "__main__":
    import sys

    if "--update" in sys.argv:
        update_docs()
    else:
        print(reference_markdown())
