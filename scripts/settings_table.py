"""Print the configuration reference (every setting, its variable and default) as Markdown.

The README's table is this script's output; tests/code/test_docs.py checks they agree, so the
documentation cannot fall behind ``src/settings.py``.
"""

from __future__ import annotations

from src.settings import Settings


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        rows.append(f"| `URBANSOUND_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
