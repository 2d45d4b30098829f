#!/usr/bin/env python3
"""Set up FramePack UI and start it: a virtual environment, the right PyTorch build, the requirements.

Standard library only, so it runs with any Python 3.11+ before anything is installed. run.sh and run.bat call it
on every start: the first run installs everything; later runs check and finish in well under a second.

    python install.py                       set up (fast when already done), then start app.py
    python install.py --inbrowser           options install.py does not know go to app.py (or after "--")
    python install.py --install-only        set up only
    python install.py --test                set up with the dev requirements, then run pytest on tests/
    python install.py --dry-run ...         print what would be run; change nothing
    FRAMEPACK_TORCH_INDEX=default python install.py --test     (CI: let pip's configured indexes pick torch)

PyTorch build (--torch-index auto). PyTorch 2.13.0 ships CPU, CUDA 12.6, CUDA 13.0 and (experimental) CUDA 13.2
builds; there is no CUDA 12.8 build of 2.13 (PyTorch dropped 12.8 in 2.12). The choice is made from
`nvidia-smi --query-gpu=name,compute_cap,driver_version`:

    macOS                                         default (PyPI: the Apple-silicon build, with MPS)
    no NVIDIA GPU, or nvidia-smi missing/failing  cpu   (PyPI's Linux torch is a multi-GB CUDA build)
    every GPU supported by cu130 (Turing 7.5 to
      Blackwell 12.x) and driver >= 580           cu130 (CUDA 13.x needs driver R580+)
    else every GPU supported by cu126 (Maxwell
      5.0 to Hopper 9.0) and driver >= 525.60.13
      (Windows >= 527.41)                         cu126 (native from 560; 525-559 by CUDA minor-version compat.)
    otherwise                                     error, one line: which driver to install, or --torch-index cpu

So an RTX 50-series (Blackwell, compute capability 12.0) needs driver 580 or newer; an RTX 40/30/20 gets cu130
on a 580+ driver and cu126 on an older one; GTX 10/9 series (Pascal/Maxwell, dropped from CUDA 13) get cu126.

Triton (torch.compile's GPU code generator): torch's Linux wheels bring it; its Windows wheels do not, so on Windows
with a CUDA build this also installs `triton-windows`, the release that pairs with this torch (TRITON_WINDOWS). Where
that fails the app still runs, uncompiled, and its memory plan says so.
"""

from __future__ import annotations

# Keep this file parseable by old Pythons (no match statements, no 3.10+ syntax at run time) so that an old
# interpreter reaches the version check in main() and prints a clear message instead of a SyntaxError.

import argparse
import hashlib
import json
import os
import platform as platform_module
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

TORCH_VERSION = "2.13.0"
# The Triton this torch was built with: torch 2.13.0's Linux wheels require triton==3.7.1. triton-windows publishes
# the same releases for Windows (3.7.1.post27 and later fixes); a newer minor would not pair with this torch.
TRITON_WINDOWS = "triton-windows~=3.7.1"  # 3.7.1 or a later 3.7 fix; no shell metacharacters in a printed command
TRITON_MIN_CAPABILITY = (7, 0)  # Triton generates code for Volta and later; torch.compile refuses older GPUs
# torch 2.13.0 publishes wheels for CPython 3.10-3.14; diffusers 0.42.1 needs 3.11 or newer.
MIN_PYTHON = (3, 11)
MAX_PYTHON = (3, 14)
TORCH_INDEX_URL = "https://download.pytorch.org/whl/{index}"
TORCH_INDEX_CHOICES = ("auto", "cpu", "cu126", "cu130", "default")
TORCH_INDEX_ENV = "FRAMEPACK_TORCH_INDEX"  # the default for --torch-index (CI sets it to 'default')

REPO_DIR = Path(__file__).resolve().parent
REQUIREMENTS = "requirements.txt"
REQUIREMENTS_DEV = "requirements-dev.txt"
STAMP_NAME = "framepack-ui-install.json"  # inside the venv: which requirement files were installed, by hash
CHROMIUM_PATH = "/usr/bin/chromium"
DRIVER_DOWNLOAD_URL = "https://www.nvidia.com/drivers"
NVIDIA_SMI_QUERY = ["--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
# Drivers older than about R510 do not know the compute_cap field; we then ask for less.
NVIDIA_SMI_QUERY_OLD = ["--query-gpu=name,driver_version", "--format=csv,noheader"]

Version = tuple  # tuple of ints, e.g. (566, 36) or (8, 9)


class InstallError(Exception):
    """A problem the user can fix; its message is one line."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_cap: Optional[Version]  # None when nvidia-smi cannot report it (very old drivers)
    driver: Version
    driver_text: str = field(default="", compare=False)  # as nvidia-smi printed it ('580.159.04')

    def driver_label(self) -> str:
        return self.driver_text or format_version(self.driver)


@dataclass(frozen=True)
class CudaBuild:
    """One CUDA build of PyTorch TORCH_VERSION on download.pytorch.org."""

    index: str
    cuda: str
    min_cc: Version
    max_cc: Optional[Version]  # newest compute capability with kernels in the wheel; None = no upper bound
    min_driver_linux: Version
    min_driver_windows: Version


# In order of preference: the newest CUDA that covers every GPU and that the driver can run.
# Architectures from PyTorch's RELEASE.md support matrix for 2.12-2.14 (cu126: Maxwell..Hopper,
# cu130: Turing..Blackwell); driver minimums from NVIDIA's CUDA minor-version-compatibility table
# (CUDA 13.x: R580+; CUDA 12.x: 525.60.13 on Linux, 527.41 on Windows).
CUDA_BUILDS = (
    CudaBuild("cu130", "13.0", min_cc=(7, 5), max_cc=None, min_driver_linux=(580,), min_driver_windows=(580,)),
    CudaBuild("cu126", "12.6", min_cc=(5, 0), max_cc=(9, 0), min_driver_linux=(525, 60, 13),
              min_driver_windows=(527, 41)),
)


# ----------------------------------------------------------------------------------------------- pure decisions

def parse_version(text: str) -> Optional[Version]:
    """'566.36' -> (566, 36); '8.9' -> (8, 9); anything else (e.g. '[N/A]') -> None."""
    parts = text.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def format_version(version: Version) -> str:
    return ".".join(str(part) for part in version)


def parse_nvidia_smi(output: str, with_compute_cap: bool = True) -> list:
    """Parse `nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader` output.

    With with_compute_cap=False the query was name,driver_version. Lines that do not parse are skipped.
    """
    fields = 3 if with_compute_cap else 2
    gpus = []
    for line in output.splitlines():
        parts = [part.strip() for part in line.rsplit(",", fields - 1)]  # GPU names may contain commas
        if len(parts) != fields:
            continue
        driver = parse_version(parts[-1])
        if driver is None or not parts[0]:
            continue
        compute_cap = parse_version(parts[1]) if with_compute_cap else None
        gpus.append(Gpu(name=parts[0], compute_cap=compute_cap, driver=driver, driver_text=parts[-1]))
    return gpus


def _min_driver(build: CudaBuild, platform: str) -> Version:
    return build.min_driver_windows if platform == "win32" else build.min_driver_linux


def _supports(build: CudaBuild, gpu: Gpu) -> bool:
    if gpu.compute_cap is None:  # unknown: only very old drivers hide it, and those fail the driver check
        return True
    # A wheel's kernels for x.y also run on later x.z of the same major (sm_86 code runs on an 8.9 card).
    return gpu.compute_cap >= build.min_cc and (build.max_cc is None or gpu.compute_cap <= build.max_cc)


def choose_torch_index(gpus: Sequence[Gpu], platform: str) -> str:
    """The PyTorch wheel index for these GPUs: 'default' (PyPI), 'cpu' or a CUDA_BUILDS index.

    gpus: from parse_nvidia_smi (empty when there is no NVIDIA GPU); platform: a sys.platform value.
    Raises InstallError (one line) when no build fits: a driver too old, or GPUs no build covers.
    """
    if platform == "darwin":
        return "default"
    if not gpus:
        return "cpu"
    oldest = min(gpus, key=lambda gpu: gpu.driver)
    driver = oldest.driver
    covering = [build for build in CUDA_BUILDS if all(_supports(build, gpu) for gpu in gpus)]
    for build in covering:
        if driver >= _min_driver(build, platform):
            return build.index
    names = ", ".join(sorted({gpu.name for gpu in gpus}))
    if covering:
        # The GPUs need a newer driver: ask for the smallest driver that unlocks any covering build.
        needed = min(_min_driver(build, platform) for build in covering)
        builds = " or ".join("CUDA " + build.cuda for build in covering)
        raise InstallError(
            "NVIDIA driver %s is too old for PyTorch %s on %s (needs its %s build): install driver %s or newer "
            "from %s and run again (or pass --torch-index cpu)."
            % (oldest.driver_label(), TORCH_VERSION, names, builds, format_version(needed), DRIVER_DOWNLOAD_URL))
    caps = ", ".join(sorted({format_version(gpu.compute_cap) for gpu in gpus if gpu.compute_cap is not None}))
    raise InstallError(
        "No CUDA build of PyTorch %s supports all of %s (compute capability %s): pass --torch-index cpu, "
        "or pick a build with --torch-index cu126/cu130 and hide the other GPUs with CUDA_VISIBLE_DEVICES."
        % (TORCH_VERSION, names, caps))


def torch_requirement(index: str, platform: str) -> str:
    """The pip requirement for TORCH_VERSION from this index.

    The local tag (+cpu, +cu126) is part of the pin: '==2.13.0' alone is satisfied by any installed
    2.13.0 build, so pip would keep a CPU build when a CUDA one is wanted. macOS wheels carry no tag.
    """
    if index == "default" or platform == "darwin":
        return "torch==" + TORCH_VERSION
    return "torch==%s+%s" % (TORCH_VERSION, index)


def torch_pip_args(index: str, platform: str) -> list:
    """Arguments after `pip install` that install torch from the chosen index."""
    args = [torch_requirement(index, platform)]
    if index != "default":
        args += ["--index-url", TORCH_INDEX_URL.format(index=index)]
    return args


def triton_requirement(index: str, platform: str, gpus: Sequence[Gpu] = ()) -> Optional[str]:
    """What to install beside torch for torch.compile: triton-windows for a CUDA build on Windows (torch's Linux
    wheels bring Triton themselves; CPU and macOS builds compile nothing for a GPU), unless every GPU found is too
    old for Triton (GTX 10 series and older); None otherwise."""
    if platform != "win32" or not index.startswith("cu"):
        return None
    if gpus and all(gpu.compute_cap is not None and gpu.compute_cap < TRITON_MIN_CAPABILITY for gpu in gpus):
        return None
    return TRITON_WINDOWS


def torch_is_wanted(installed: Optional[str], index: str, platform: str) -> bool:
    """Whether an installed torch version string (e.g. '2.13.0+cu126') is the build wanted from index."""
    if not installed:
        return False
    public, _, local = installed.partition("+")
    if public != TORCH_VERSION:
        return False
    if index == "default":  # whatever pip's indexes chose (PyPI's, or a +cpu wheel from find-links)
        return True
    _, _, wanted_local = torch_requirement(index, platform).partition("+")
    return local == wanted_local


def chromium_action(platform: str, chromium_exists: bool, is_root: bool, has_apt: bool) -> tuple:
    """What to do for the browser the UI tests drive: ('ok', ''), ('apt', '') or ('tell', one-line message)."""
    if chromium_exists:
        return ("ok", "")
    if platform.startswith("linux") and has_apt:
        if is_root:
            return ("apt", "")
        return ("tell", "The UI tests need Chromium at %s: run 'sudo apt-get install -y chromium', "
                        "then run again (never 'playwright install')." % CHROMIUM_PATH)
    return ("tell", "The UI tests need Chromium at %s, as Debian/Ubuntu's 'chromium' package installs it "
                    "(apt-get install -y chromium); without it they cannot run here." % CHROMIUM_PATH)


def pytest_failure_message(exit_code: int) -> Optional[str]:
    """The line to print for pytest's exit code; None when it passed."""
    if exit_code == 0:
        return None
    if exit_code == 5:
        return "FAILED: pytest collected no tests (exit code 5): the test run counts as failed."
    return "FAILED: pytest exit code %d." % exit_code


def venv_python(venv_dir: Path, platform: str) -> Path:
    if platform == "win32":
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def file_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- side effects

def say(message: str) -> None:
    print("[install] " + message, flush=True)


def detect_gpus(run: Callable = subprocess.run) -> list:
    """The machine's NVIDIA GPUs from nvidia-smi; empty when it is absent or fails (then the CPU build is used)."""
    exe = shutil.which("nvidia-smi")
    if exe is None and sys.platform == "win32":
        old = Path(os.environ.get("ProgramFiles", r"C:\Program Files")) / "NVIDIA Corporation" / "NVSMI" / "nvidia-smi.exe"
        exe = str(old) if old.exists() else None
    if exe is None:
        return []
    for query, with_cc in ((NVIDIA_SMI_QUERY, True), (NVIDIA_SMI_QUERY_OLD, False)):
        try:
            result = run([exe] + query, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return []
        if result.returncode == 0:
            gpus = parse_nvidia_smi(result.stdout, with_compute_cap=with_cc)
            if not gpus:
                say("nvidia-smi reported no usable GPU; using the CPU build.")
            return gpus
        if "compute_cap" not in (result.stdout + result.stderr):  # failing for another reason: no usable GPU
            break
    reason = ((result.stderr or result.stdout).strip().splitlines() or ["exit code %d" % result.returncode])[0]
    say("nvidia-smi failed (%s); using the CPU build." % reason)
    return []


def quote_command(command: Sequence[str]) -> str:
    if sys.platform == "win32":
        return subprocess.list2cmdline([str(part) for part in command])
    return shlex.join(str(part) for part in command)


class Runner:
    """Runs commands, or with dry_run only prints them."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def run(self, command: Sequence[str], failure: str, env: Optional[dict] = None) -> None:
        if self.dry_run:
            say("would run: " + quote_command(command))
            return
        say("running: " + quote_command(command))
        code = subprocess.call([str(part) for part in command], env=env)
        if code != 0:
            raise InstallError("%s (exit code %d; the messages above say why)." % (failure, code))

    def call(self, command: Sequence[str], cwd: Path) -> int:
        """Run a foreground program (the app, pytest) and return its exit code; Ctrl+C reaches it too."""
        if self.dry_run:
            say("would run: " + quote_command(command))
            return 0
        process = subprocess.Popen([str(part) for part in command], cwd=str(cwd))
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # the child got the same Ctrl+C: let it shut down
                continue


def pip_install(python: Path, args: Sequence[str]) -> list:
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check"] + list(args)


def query_venv(python: Path) -> tuple:
    """(python version tuple, installed torch version or '') of a venv's interpreter."""
    code = ("import sys, importlib.metadata as m\n"
            "try:\n    v = m.version('torch')\nexcept m.PackageNotFoundError:\n    v = ''\n"
            "print('%d.%d.%d' % sys.version_info[:3]); print(v)")
    try:
        result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        raise InstallError("The Python in the virtual environment does not start (%s): delete %s and run again."
                           % (error, python.parent.parent))
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) < 1:
        raise InstallError("The Python in the virtual environment does not start: delete %s and run again."
                           % python.parent.parent)
    return parse_version(lines[0]) or (0,), (lines[1].strip() if len(lines) > 1 else "")


def ensure_venv(venv_dir: Path, runner: Runner) -> Path:
    python = venv_python(venv_dir, sys.platform)
    if python.exists():
        return python
    if venv_dir.exists() and any(venv_dir.iterdir()):
        raise InstallError("%s exists but holds no virtual environment: delete it, or pass --venv PATH." % venv_dir)
    say("creating the virtual environment %s (Python %s)" % (venv_dir, platform_module.python_version()))
    try:
        runner.run([sys.executable, "-m", "venv", str(venv_dir)], "Creating the virtual environment failed"
                   + ("; on Debian/Ubuntu install python3-venv" if sys.platform.startswith("linux") else ""))
    except InstallError:
        shutil.rmtree(venv_dir, ignore_errors=True)  # we created it: leave no half-made venv behind
        raise
    return python


def install_torch(python: Path, index: str, installed: str, venv_version: Version, force: bool,
                  runner: Runner) -> None:
    wanted = torch_requirement(index, sys.platform)
    if not force and torch_is_wanted(installed, index, sys.platform):
        say("torch %s already installed (wanted %s from %s)" % (installed, wanted, index))
        return
    if not runner.dry_run and not (MIN_PYTHON <= venv_version[:2] <= MAX_PYTHON):
        raise InstallError("PyTorch %s has wheels for Python %s to %s, but the virtual environment has Python %s: "
                           "delete it and run install.py with a supported Python."
                           % (TORCH_VERSION, format_version(MIN_PYTHON), format_version(MAX_PYTHON),
                              format_version(venv_version)))
    if sys.platform == "darwin" and platform_module.machine() == "x86_64":
        raise InstallError("PyTorch %s has no wheels for Intel Macs (only Apple silicon)." % TORCH_VERSION)
    say("installing %s%s" % (wanted, "" if not installed else " (replacing torch %s)" % installed))
    runner.run(pip_install(python, torch_pip_args(index, sys.platform)),
               "Installing torch failed: check the internet connection, or choose another build with "
               "--torch-index {%s}" % ",".join(TORCH_INDEX_CHOICES[1:]))


def install_triton(python: Path, venv_dir: Path, index: str, gpus: Sequence[Gpu], force: bool,
                   runner: Runner) -> None:
    """triton-windows where `triton_requirement` asks for it. Not fatal when it fails: the app runs without
    torch.compile (slower per step) and its plan says so; later starts do not try again (each try would wait on pip
    while the app starts) unless --force asks."""
    wanted = triton_requirement(index, sys.platform, gpus)
    if wanted is None:
        return
    stamp = read_stamp(venv_dir)
    if not force and stamp.get("triton") == wanted:
        say("%s already installed" % wanted)
        return
    if not force and stamp.get("triton_failed") == wanted:
        say("%s is not installed (it failed before): the app runs without torch.compile; "
            "'install.py --force' tries again" % wanted)
        return
    say("installing %s (torch.compile's GPU code generator; torch's Windows wheels have none)" % wanted)
    try:
        runner.run(pip_install(python, [wanted]), "Installing %s failed" % wanted)
    except InstallError as error:
        say("%s The app runs without torch.compile (slower per step); 'install.py --force' tries again." % error)
        if not runner.dry_run:
            write_stamp(venv_dir, dict(stamp, triton_failed=wanted))
        return
    if not runner.dry_run:
        stamp.pop("triton_failed", None)
        write_stamp(venv_dir, dict(stamp, triton=wanted))


def read_stamp(venv_dir: Path) -> dict:
    try:
        data = json.loads((venv_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def install_requirements(python: Path, venv_dir: Path, dev: bool, force: bool, runner: Runner) -> None:
    sets = {"runtime": [REPO_DIR / REQUIREMENTS]}
    if dev:
        sets["dev"] = [REPO_DIR / REQUIREMENTS, REPO_DIR / REQUIREMENTS_DEV]
    wanted = "dev" if dev else "runtime"
    for path in sets[wanted]:
        if not path.exists():
            raise InstallError("%s is missing next to install.py." % path.name)
    digests = {name: file_digest(paths) for name, paths in sets.items()}
    stamp = read_stamp(venv_dir)
    if not force and stamp.get(wanted) == digests[wanted]:
        say("requirements up to date (%s)" % sets[wanted][-1].name)
        return
    say("installing %s" % sets[wanted][-1].name)
    runner.run(pip_install(python, ["-r", str(sets[wanted][-1])]),
               "Installing %s failed" % sets[wanted][-1].name)
    if not runner.dry_run:
        stamp.update(digests)  # the dev set includes requirements.txt, so both are now satisfied
        write_stamp(venv_dir, stamp)


def write_stamp(venv_dir: Path, stamp: dict) -> None:
    (venv_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=1), encoding="utf-8")


def ensure_chromium(runner: Runner) -> None:
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    action, message = chromium_action(sys.platform, Path(CHROMIUM_PATH).exists(), is_root,
                                      shutil.which("apt-get") is not None)
    if action == "ok":
        return
    if action == "tell":
        say(message)
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say("installing Debian's chromium for the UI tests")
    try:
        runner.run(["apt-get", "install", "-y", "chromium"], "apt-get install chromium failed", env=env)
    except InstallError:  # a fresh machine may have no package lists yet
        runner.run(["apt-get", "update"], "apt-get update failed", env=env)
        runner.run(["apt-get", "install", "-y", "chromium"], "apt-get install chromium failed", env=env)


# ----------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="install.py", allow_abbrev=False,
        description="Set up FramePack UI (virtual environment, PyTorch build, requirements), then start the app "
                    "or run the tests. Options it does not know, and everything after '--', go to app.py "
                    "(or to pytest with --test).",
        epilog="PyTorch build for --torch-index auto: macOS -> PyPI; no NVIDIA GPU -> cpu; driver >= 580 and "
               "Turing or newer -> cu130; driver >= 525 (Windows 527.41) and Maxwell..Hopper -> cu126; "
               "Blackwell (RTX 50) on a driver older than 580 -> error asking for a driver update.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", dest="mode", action="store_const", const="run",
                      help="set up, then start app.py (the default)")
    mode.add_argument("--test", dest="mode", action="store_const", const="test",
                      help="set up with the dev requirements, then run 'python -m pytest -q tests' in the venv "
                           "and exit with its code (no tests collected counts as failure)")
    mode.add_argument("--install-only", dest="mode", action="store_const", const="install", help="set up only")
    parser.set_defaults(mode="run")
    parser.add_argument("--venv", metavar="PATH", help="virtual environment folder (default: .venv next to "
                                                       "install.py); created if missing")
    parser.add_argument("--torch-index", choices=TORCH_INDEX_CHOICES, default=None,
                        help="PyTorch build: auto (detect with nvidia-smi), cpu, cu126, cu130 "
                             "(download.pytorch.org), or default (whatever pip's configured indexes offer); "
                             "default: $%s, else auto" % TORCH_INDEX_ENV)
    parser.add_argument("--dev", action="store_true",
                        help="also install requirements-dev.txt (pytest, playwright) and Chromium for UI tests")
    parser.add_argument("--no-requirements", action="store_true",
                        help="install only the venv and torch (skip requirements files and Chromium)")
    parser.add_argument("--force", action="store_true",
                        help="run pip for torch and the requirements even if they look installed")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    return parser


def split_args(argv: Sequence[str]) -> tuple:
    """(install.py's own arguments, arguments passed through to app.py or pytest)."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def run(args: argparse.Namespace, passthrough: list) -> int:
    runner = Runner(args.dry_run)
    venv_dir = Path(args.venv).resolve() if args.venv else REPO_DIR / ".venv"
    dev = args.dev or args.mode == "test"
    if args.mode == "install" and passthrough:
        raise InstallError("unexpected arguments for --install-only: %s" % " ".join(passthrough))

    python = ensure_venv(venv_dir, runner)
    if python.exists():
        venv_version, installed_torch = query_venv(python)
    else:  # dry run of a fresh install
        venv_version, installed_torch = tuple(sys.version_info[:3]), ""

    gpus = []  # as nvidia-smi reports them, where --torch-index auto asked it
    if args.torch_index == "auto":
        gpus = detect_gpus()
        index = choose_torch_index(gpus, sys.platform)
        found = "; ".join("%s, compute capability %s, driver %s"
                          % (gpu.name, format_version(gpu.compute_cap) if gpu.compute_cap else "?",
                             gpu.driver_label()) for gpu in gpus)
        say("PyTorch build: %s (%s)" % (index, found or ("macOS" if sys.platform == "darwin" else "no NVIDIA GPU")))
    else:
        index = args.torch_index
        say("PyTorch build: %s (chosen with --torch-index or %s)" % (index, TORCH_INDEX_ENV))
    install_torch(python, index, installed_torch, venv_version, args.force, runner)
    install_triton(python, venv_dir, index, gpus, args.force, runner)

    if not args.no_requirements:
        install_requirements(python, venv_dir, dev, args.force, runner)
        if dev:
            ensure_chromium(runner)

    if args.mode == "install":
        say("done: %s" % venv_dir)
        return 0
    if args.mode == "test":
        # Test paths given (install.py --test -- tests/test_x.py) replace the default "tests".
        named = [arg for arg in passthrough if not arg.startswith("-") and (REPO_DIR / arg.split("::")[0]).exists()]
        code = runner.call([python, "-m", "pytest", "-q"] + ([] if named else ["tests"]) + passthrough,
                           cwd=REPO_DIR)
        message = pytest_failure_message(code)
        if message:
            say(message)
        return code
    app = REPO_DIR / "app.py"
    if not app.exists() and not runner.dry_run:
        raise InstallError("set up is done, but %s does not exist yet, so there is no app to start." % app)
    say("starting the app (Ctrl+C stops it)")
    return runner.call([python, app] + passthrough, cwd=REPO_DIR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if sys.version_info < MIN_PYTHON:
        print("install.py: error: FramePack UI needs Python %s or newer; this is Python %s (%s)."
              % (format_version(MIN_PYTHON), platform_module.python_version(), sys.executable), file=sys.stderr)
        return 1
    own, passthrough = split_args(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(own)
    if args.torch_index is None:
        args.torch_index = os.environ.get(TORCH_INDEX_ENV, "").strip() or "auto"
        if args.torch_index not in TORCH_INDEX_CHOICES:
            print("install.py: error: %s=%s is not one of %s." % (TORCH_INDEX_ENV, args.torch_index,
                                                                  ", ".join(TORCH_INDEX_CHOICES)), file=sys.stderr)
            return 1
    try:
        return run(args, unknown + passthrough)
    except InstallError as error:
        print("install.py: error: %s" % error, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("install.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
