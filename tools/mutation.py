"""The mutation check of the core, one module at a time: mutmut against the module's own tests (setup.cfg).

    .venv/bin/python tools/mutation.py --list          # the modules and their tests
    nice -n 15 .venv/bin/python tools/mutation.py sampling [--jobs 2]
    .venv/bin/python tools/mutation.py sampling --results    # the score and the surviving mutants again
    nice -n 15 .venv/bin/python tools/mutation.py sampling --survivors   # after adding tests: re-test survivors
    nice -n 15 .venv/bin/python tools/mutation.py plan "*budgets*"       # only the mutants whose names match
    .venv/bin/mutmut show NAME                          # (inside .mutation/sampling/) one mutant's diff

Why a driver: mutmut reads one test selection from the setup.cfg in its working folder, and runs, for each
mutant, every selected test that executed the mutated function. The end-to-end tests execute nearly everything,
so one selection for the whole core would make each surviving mutant of the sampler cost the worker's minutes.
Each module gets its own working folder, .mutation/NAME/ (a copy of framepack_ui/ and tests/ with a setup.cfg of
the shared [mutmut] options, the module's files and its tests), where mutmut keeps its mutants, its record of
which test runs which function, and its results between runs (it re-tests only what changed). Linux and macOS:
mutmut forks, so not on Windows outside WSL. Standard library only.
"""
from __future__ import annotations

import argparse
import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".mutation"
COPIED = ("framepack_ui", "tests")
SECTION_PREFIX = "mutation:"


def read_config(path: Path = REPO / "setup.cfg") -> tuple[dict[str, str], dict[str, dict[str, list[str]]]]:
    """(the shared [mutmut] options, {module: {"mutate": [...], "tests": [...]}}) from setup.cfg."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    shared = dict(parser["mutmut"]) if parser.has_section("mutmut") else {}
    modules = {}
    for name in parser.sections():
        if name.startswith(SECTION_PREFIX):
            section = parser[name]
            modules[name[len(SECTION_PREFIX):]] = {
                "mutate": section["mutate"].split(),
                "tests": [line for line in section["tests"].splitlines() if line],  # one pytest argument a line
            }
    return shared, modules


def workspace_config(shared: dict[str, str], module: dict[str, list[str]]) -> str:
    """The setup.cfg mutmut reads in a module's working folder."""
    lines = ["[mutmut]", "source_paths = framepack_ui"]
    for key, value in shared.items():  # mutmut reads a value on several lines as a list, on one as itself
        values = [v for v in value.splitlines() if v]
        lines.append(f"{key} = {values[0]}" if len(values) == 1
                     else f"{key} =" + "".join(f"\n    {v}" for v in values))
    lines += ["only_mutate =" + "".join(f"\n    {p}" for p in module["mutate"]),
              "pytest_add_cli_args_test_selection =" + "".join(f"\n    {t}" for t in module["tests"])]
    return "\n".join(lines) + "\n"


def sync(work: Path) -> None:
    """Copy the sources and tests into the working folder, keeping modification times (mutmut compares them) and
    removing files that are gone from the repository."""
    for name in COPIED:
        source, target = REPO / name, work / name
        wanted = {p.relative_to(source) for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        if target.exists():
            for old in [p for p in target.rglob("*") if p.is_file() and "__pycache__" not in p.parts]:
                if old.relative_to(target) not in wanted:
                    old.unlink()
        for relative in wanted:
            src, dst = source / relative, target / relative
            if (not dst.exists() or dst.stat().st_mtime_ns != src.stat().st_mtime_ns
                    or src.read_bytes() != dst.read_bytes()):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


def mutmut_command() -> str:
    """mutmut from the same environment as this Python (the dev requirements install it into .venv)."""
    executable = Path(sys.executable).with_name("mutmut")
    return str(executable) if executable.exists() else "mutmut"


def mutmut(work: Path, *args: str) -> int:
    return subprocess.call([mutmut_command(), *args], cwd=work)


def survivors(work: Path) -> list[str]:
    """The names of the mutants that survived the last run (`mutmut results` prints "NAME: survived")."""
    out = subprocess.run([mutmut_command(), "results"], cwd=work, capture_output=True, text=True).stdout
    return [line.strip().rsplit(":", 1)[0] for line in out.splitlines() if line.strip().endswith(": survived")]


def report(name: str, work: Path) -> int:
    """Print the score and list the mutants not caught. The score is caught (killed, or timed out: the tests
    hung) of those tested; a mutant in code that no selected test runs counts as tested and not caught."""
    if mutmut(work, "export-cicd-stats") != 0:
        return 1
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    caught = stats["killed"] + stats["timeout"]
    done = caught + sum(stats[k] for k in ("survived", "no_tests", "suspicious", "segfault",
                                           "check_was_interrupted_by_user"))
    tested = done - stats["check_was_interrupted_by_user"]
    print(f"{name}: {caught} of {tested} mutants caught ({100 * caught / max(tested, 1):.1f} %), "
          f"{stats['survived']} survived, {stats['no_tests']} in code no selected test runs, "
          f"{stats['suspicious']} suspicious, {stats['total'] - stats['skipped'] - done} not run yet")
    return mutmut(work, "results")


def main(argv: list[str] | None = None) -> int:
    shared, modules = read_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", choices=sorted(modules))
    parser.add_argument("mutants", nargs="*", help="only these mutants (mutmut's names; * matches anything)")
    parser.add_argument("--list", action="store_true", help="the modules, their files and tests")
    parser.add_argument("--jobs", type=int, default=None, help="mutants tested at once (default: CPU count)")
    parser.add_argument("--results", action="store_true", help="only print the last run's score and survivors")
    parser.add_argument("--survivors", action="store_true",
                        help="re-test only the mutants that survived the last run (mutmut keeps earlier results)")
    parser.add_argument("--fresh", action="store_true", help="forget the previous runs of this module first")
    args = parser.parse_args(argv)
    if args.list or not args.module:
        for name, module in modules.items():
            print(f"{name}: {' '.join(module['mutate'])}\n    " + "\n    ".join(module["tests"]))
        return 0 if args.list else 2
    work = WORK / args.module
    if args.results:
        return report(args.module, work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    sync(work)
    (work / "setup.cfg").write_text(workspace_config(shared, modules[args.module]), encoding="utf-8")
    names = survivors(work) if args.survivors else args.mutants
    if args.survivors and not names:
        print(f"{args.module}: no surviving mutants to re-test")
        return report(args.module, work)
    code = mutmut(work, "run", *([f"--max-children={args.jobs}"] if args.jobs else []), *names)
    report(args.module, work)
    return code


if __name__ == "__main__":
    sys.exit(main())
