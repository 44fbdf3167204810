"""Which distributions a script's imports need beyond a given environment (started by
tests/test_gpu_script.py, in the interpreter that runs the script).

    python import_closure.py IMAGE_JSON CARRIED_JSON SCRIPT

Imports SCRIPT as a module (its `__main__` block does not run) with its directory on the path, as
when run, and prints a JSON list of the top-level modules it loaded whose distributions are
neither in the dependency closure of the IMAGE distributions (extras left out) nor CARRIED
(installed without dependencies).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import re
import sys


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> set[str]:
    """`names` and every distribution they require, transitively, as installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [
            re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r
        ]
    return seen


def main(image: list[str], carried: list[str], script: str) -> None:
    allowed = closure(image) | {canonical(c) for c in carried}
    sys.path.insert(0, script.rsplit("/", 1)[0])
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("script", script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    distributions = md.packages_distributions()
    loaded = {m.split(".")[0] for m in set(sys.modules) - before}
    outside = {
        m
        for m in loaded
        if distributions.get(m) and not {canonical(d) for d in distributions[m]} & allowed
    }
    print(json.dumps(sorted(outside)))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])
