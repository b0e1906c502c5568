"""What every check reports: the file, the key path in it, and what is wrong there."""

import difflib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    file: str
    path: str  # key path in the file, e.g. applications[0].args.tracker_max_replicas
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path + ' ' if self.path else ''}{self.message}"


def join(path: str, *keys: Any) -> str:
    """`path` extended by each key in turn: `.name`, `[index]`, or `['other key']`."""
    for key in keys:
        if isinstance(key, int):
            path = f"{path}[{key}]"
        elif isinstance(key, str) and key.isidentifier():
            path = f"{path}.{key}" if path else key
        else:
            path = f"{path}[{key!r}]"
    return path


def unknown_key(file: str, path: str, key: str, known: list[str]) -> Problem:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
    return Problem(file, join(path, key), f"is not a known key; {hint}")


def unplaced(replicas: list, offers: list[tuple[str, dict]], file: str, where: str, shown=lambda v: v) -> list[Problem]:
    """A problem for each replica (key path, deployment, ray_actor_options) that no offer holds, by
    Ray's defaults (1 CPU, no GPU); an empty offer (left to autodetection) holds any. `shown` tidies numbers."""
    problems = []
    for path, name, opts in replicas:
        need = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **(opts.get("resources") or {})}
        need = {k: shown(v) for k, v in need.items() if v}
        if not any(not offer or all(offer.get(k, 0) >= v for k, v in need.items()) for _name, offer in offers):
            problems.append(Problem(file, path, (
                f"binds {name}, which asks {need} per replica; no {where} offers that "
                f"({'; '.join(f'{n}: {o}' for n, o in offers)})")))
    return problems
