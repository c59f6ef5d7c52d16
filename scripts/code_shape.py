"""The shape of the package: the largest modules and functions, and lines per top-level package.

    python scripts/code_shape.py [ROOT]      # ROOT defaults to ./drctl

Used for the "One house" figures in docs/design.md (run it on two checkouts to compare).
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "drctl")
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    per_package: Counter[str] = Counter()
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        name = str(path.relative_to(root.parent))
        modules.append((lines, name))
        parts = path.relative_to(root).parts
        per_package[parts[0] if len(parts) > 1 else "(top level)"] += lines
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    total = sum(n for n, _ in modules)
    print(f"{len(modules)} modules, {total:,} lines")
    print("largest modules:")
    for n, name in sorted(modules, reverse=True)[:5]:
        print(f"  {n:5d}  {name}")
    print("largest functions:")
    for n, name in sorted(functions, reverse=True)[:5]:
        print(f"  {n:5d}  {name}")
    print("lines per package:")
    for package, n in per_package.most_common():
        print(f"  {n:6,d}  {100 * n / total:4.1f} %  {package}")


if __name__ == "__main__":
    main()
