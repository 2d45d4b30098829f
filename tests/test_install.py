"""install.py: the PyTorch build decision (with injected nvidia-smi output), the requirement files, and the
command line (stdlib only; --dry-run shows the pip commands without installing anything)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_PY = REPO / "install.py"


def _load_install():
    spec = importlib.util.spec_from_file_location("framepack_install", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


install = _load_install()

# nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader, as printed on real machines
SMI_RTX_4060_LAPTOP_566 = "NVIDIA GeForce RTX 4060 Laptop GPU, 8.9, 566.36\n"
SMI_RTX_4090_580 = "NVIDIA GeForce RTX 4090, 8.9, 580.82.07\n"
SMI_RTX_5090_572 = "NVIDIA GeForce RTX 5090, 12.0, 572.16\n"
SMI_RTX_5090_560 = "NVIDIA GeForce RTX 5090, 12.0, 560.94\n"
SMI_RTX_5090_581 = "NVIDIA GeForce RTX 5090, 12.0, 581.29\n"
SMI_GTX_1080_581 = "NVIDIA GeForce GTX 1080, 6.1, 581.29\n"
SMI_RTX_3060_516 = "NVIDIA GeForce RTX 3060, 8.6, 516.94\n"


def choose(smi_output: str, platform: str = "linux") -> str:
    return install.choose_torch_index(install.parse_nvidia_smi(smi_output), platform)


# ------------------------------------------------------------------------------------------- torch build choice

def test_rtx_4060_laptop_driver_566_gets_cu126():
    assert choose(SMI_RTX_4060_LAPTOP_566, "win32") == "cu126"
    assert choose(SMI_RTX_4060_LAPTOP_566, "linux") == "cu126"


def test_rtx_4090_driver_580_gets_cu130():
    assert choose(SMI_RTX_4090_580) == "cu130"


def test_rtx_5090_driver_581_gets_cu130():
    assert choose(SMI_RTX_5090_581, "win32") == "cu130"


def test_rtx_5090_driver_572_fails_asking_for_driver_580():
    # PyTorch 2.13.0 has no CUDA 12.8 build; Blackwell kernels are only in the CUDA 13.0 build, which needs R580.
    with pytest.raises(install.InstallError) as caught:
        choose(SMI_RTX_5090_572, "win32")
    message = str(caught.value)
    assert "\n" not in message
    assert "572.16" in message and "580" in message and "RTX 5090" in message
    assert "--torch-index cpu" in message


def test_rtx_5090_driver_560_fails_with_clear_message():
    with pytest.raises(install.InstallError, match=r"driver 560\.94 is too old .* install driver 580 or newer"):
        choose(SMI_RTX_5090_560)


def test_gtx_1080_gets_cu126_even_on_new_driver():
    # Pascal is not in the CUDA 13 builds.
    assert choose(SMI_GTX_1080_581) == "cu126"


def test_driver_too_old_for_cuda_12_fails():
    with pytest.raises(install.InstallError, match=r"516\.94 .* 525\.60\.13 or newer"):
        choose(SMI_RTX_3060_516)


def test_windows_driver_minimum_for_cuda_12_is_527_41():
    with pytest.raises(install.InstallError, match=r"527\.41"):
        choose("NVIDIA GeForce RTX 3060, 8.6, 527.27\n", "win32")
    assert choose("NVIDIA GeForce RTX 3060, 8.6, 527.41\n", "win32") == "cu126"
    assert choose("NVIDIA GeForce RTX 3060, 8.6, 527.27\n", "linux") == "cu126"


def test_no_gpu_gets_cpu():
    assert install.choose_torch_index([], "linux") == "cpu"
    assert install.choose_torch_index([], "win32") == "cpu"


def test_macos_gets_default_pypi():
    assert install.choose_torch_index([], "darwin") == "default"


def test_two_gpus_one_blackwell_needs_cu130():
    assert choose(SMI_RTX_4090_580 + "NVIDIA GeForce RTX 5090, 12.0, 580.82.07\n") == "cu130"


def test_pascal_with_blackwell_has_no_common_build():
    with pytest.raises(install.InstallError, match="No CUDA build"):
        choose(SMI_GTX_1080_581 + SMI_RTX_5090_581)


# ------------------------------------------------------------------------------------------- nvidia-smi

def test_parse_nvidia_smi_fields():
    (gpu,) = install.parse_nvidia_smi(SMI_RTX_4060_LAPTOP_566)
    assert gpu == install.Gpu("NVIDIA GeForce RTX 4060 Laptop GPU", (8, 9), (566, 36))


def test_parse_nvidia_smi_skips_junk_and_unknown_compute_cap():
    gpus = install.parse_nvidia_smi("No devices were found\nTesla K80, [N/A], 470.57.02\n")
    assert gpus == [install.Gpu("Tesla K80", None, (470, 57, 2))]


def _fake_smi(*results):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        code, out, err = results[len(calls) - 1]
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run, calls


def test_detect_gpus_absent_nvidia_smi_means_cpu(monkeypatch):
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    monkeypatch.setattr(install.sys, "platform", "linux")
    assert install.detect_gpus() == []


def test_detect_gpus_failing_nvidia_smi_means_cpu(monkeypatch):
    monkeypatch.setattr(install.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    run, calls = _fake_smi((9, "", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."))
    assert install.detect_gpus(run) == []
    assert len(calls) == 1
    assert install.choose_torch_index([], "linux") == "cpu"


def test_detect_gpus_old_driver_without_compute_cap_field(monkeypatch):
    monkeypatch.setattr(install.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    run, calls = _fake_smi((2, 'Field "compute_cap" is not a valid field to query.\n', ""),
                           (0, "NVIDIA GeForce GTX 1080, 470.57.02\n", ""))
    gpus = install.detect_gpus(run)
    assert gpus == [install.Gpu("NVIDIA GeForce GTX 1080", None, (470, 57, 2))]
    assert calls[0][1:] == install.NVIDIA_SMI_QUERY and calls[1][1:] == install.NVIDIA_SMI_QUERY_OLD
    with pytest.raises(install.InstallError, match="too old"):
        install.choose_torch_index(gpus, "linux")


def test_detect_gpus_passes_the_documented_query(monkeypatch):
    monkeypatch.setattr(install.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    run, calls = _fake_smi((0, SMI_RTX_4060_LAPTOP_566, ""))
    assert install.detect_gpus(run)[0].compute_cap == (8, 9)
    assert calls == [["/usr/bin/nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]]


# ------------------------------------------------------------------------------------------- pip arguments

def test_torch_pip_args_per_index():
    version = install.TORCH_VERSION
    assert version == "2.13.0"
    assert install.torch_pip_args("cu126", "win32") == [
        "torch==2.13.0+cu126", "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert install.torch_pip_args("cpu", "linux") == [
        "torch==2.13.0+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert install.torch_pip_args("default", "linux") == ["torch==2.13.0"]
    assert install.torch_pip_args("default", "darwin") == ["torch==2.13.0"]


def test_torch_is_wanted_compares_the_build_tag():
    wanted = install.torch_is_wanted
    assert wanted("2.13.0+cu126", "cu126", "linux")
    assert not wanted("2.13.0+cpu", "cu126", "linux")  # a CPU build must be replaced by the CUDA one
    assert not wanted("2.12.1+cu126", "cu126", "linux")
    assert not wanted("", "cpu", "linux")
    assert wanted("2.13.0+cpu", "default", "linux")
    assert wanted("2.13.0", "default", "win32")
    assert wanted("2.13.0", "cpu", "darwin")


def test_triton_windows_only_beside_a_cuda_build_on_windows_for_a_gpu_triton_supports():
    assert install.triton_requirement("cu126", "win32") == install.TRITON_WINDOWS
    assert install.triton_requirement("cu130", "win32") == install.TRITON_WINDOWS
    assert install.triton_requirement("cpu", "win32") is None  # nothing to compile for
    assert install.triton_requirement("default", "win32") is None  # PyPI's Windows torch is the CPU build
    assert install.triton_requirement("cu126", "linux") is None  # torch's Linux wheels bring triton
    assert install.triton_requirement("default", "darwin") is None
    laptop = install.parse_nvidia_smi(SMI_RTX_4060_LAPTOP_566)
    assert install.triton_requirement("cu126", "win32", laptop) == install.TRITON_WINDOWS
    pascal = install.parse_nvidia_smi(SMI_GTX_1080_581)  # 6.1: Triton generates nothing for it
    assert install.triton_requirement("cu126", "win32", pascal) is None
    assert install.triton_requirement("cu126", "win32", pascal + laptop) == install.TRITON_WINDOWS


def test_the_triton_windows_pin_admits_the_release_torch_was_built_with_and_its_fixes_only():
    # torch 2.13.0's Linux wheels require triton==3.7.1 (their METADATA); triton-windows publishes the same releases
    # (3.7.1.post27); "~=3.7.1" is >= 3.7.1 and == 3.7.*: not 3.8, which pairs with a later torch
    assert install.TORCH_VERSION == "2.13.0"
    assert install.TRITON_WINDOWS == "triton-windows~=3.7.1"
    try:  # where this venv's torch names its Triton, the pin must pair with it
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    pinned = [re.search(r"triton==(\d+)\.(\d+)\.(\d+)", r) for r in requires]
    for match in filter(None, pinned):
        assert "~=%s.%s.%s" % match.groups() in install.TRITON_WINDOWS


def _run_install_as(monkeypatch, capsys, platform: str, *args: str) -> str:
    """install.main in this process with sys.platform injected (Windows cannot run here): what it printed."""
    monkeypatch.setattr(install.sys, "platform", platform)
    assert install.main(list(args)) == 0
    return capsys.readouterr().out


def test_dry_run_on_windows_with_a_cuda_build_installs_triton_windows_after_torch(tmp_path, monkeypatch, capsys):
    # untested on Windows itself: the platform is injected
    out = _run_install_as(monkeypatch, capsys, "win32", "--dry-run", "--install-only", "--no-requirements",
                          "--venv", str(tmp_path / "v"), "--torch-index", "cu126")
    torch_at, triton_at = out.index("torch==2.13.0+cu126"), out.index(" triton-windows~=3.7.1")
    assert torch_at < triton_at
    assert re.search(r"would run: \S*Scripts\S*python\.exe -m pip install --disable-pip-version-check "
                     r"triton-windows~=3\.7\.1\n", out), out


@pytest.mark.parametrize("platform, index", [("linux", "cu126"), ("win32", "cpu")])
def test_no_triton_windows_on_linux_or_for_a_cpu_build(tmp_path, monkeypatch, capsys, platform, index):
    out = _run_install_as(monkeypatch, capsys, platform, "--dry-run", "--install-only", "--no-requirements",
                          "--venv", str(tmp_path / "v"), "--torch-index", index)
    assert "torch==2.13.0+" + index in out
    assert "triton-windows" not in out


class _FailingRunner(install.Runner):
    def __init__(self):
        super().__init__(dry_run=False)
        self.commands = []

    def run(self, command, failure, env=None):
        self.commands.append(command)
        raise install.InstallError("%s (exit code 1; the messages above say why)." % failure)


def test_a_failed_triton_windows_install_is_said_and_not_retried_each_start_until_forced(tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.setattr(install.sys, "platform", "win32")
    runner = _FailingRunner()
    install.install_triton(tmp_path / "python.exe", tmp_path, "cu126", (), False, runner)  # does not raise
    out = capsys.readouterr().out
    assert len(runner.commands) == 1 and install.TRITON_WINDOWS in runner.commands[0]
    assert "Installing %s failed" % install.TRITON_WINDOWS in out and "runs without torch.compile" in out
    install.install_triton(tmp_path / "python.exe", tmp_path, "cu126", (), False, runner)  # the next start
    assert len(runner.commands) == 1 and "'install.py --force' tries again" in capsys.readouterr().out
    install.install_triton(tmp_path / "python.exe", tmp_path, "cu126", (), True, runner)  # --force
    assert len(runner.commands) == 2


def test_an_installed_triton_windows_is_not_installed_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install.sys, "platform", "win32")
    install.write_stamp(tmp_path, {"runtime": "abc", "triton": install.TRITON_WINDOWS})
    runner = _FailingRunner()
    install.install_triton(tmp_path / "python.exe", tmp_path, "cu126", (), False, runner)
    assert runner.commands == []
    assert "already installed" in capsys.readouterr().out
    install.write_stamp(tmp_path, {"triton": "triton-windows~=3.6.0"})  # another torch's pairing: replaced
    install.install_triton(tmp_path / "python.exe", tmp_path, "cu126", (), False, runner)
    assert len(runner.commands) == 1


def test_chromium_action():
    assert install.chromium_action("linux", True, False, True) == ("ok", "")
    assert install.chromium_action("linux", False, True, True) == ("apt", "")
    action, message = install.chromium_action("linux", False, False, True)
    assert action == "tell" and "sudo apt-get install -y chromium" in message and "\n" not in message
    action, message = install.chromium_action("win32", False, False, False)
    assert action == "tell" and "/usr/bin/chromium" in message and "playwright install'" not in message


def test_pytest_exit_5_is_reported_as_failure():
    assert install.pytest_failure_message(0) is None
    assert "no tests" in install.pytest_failure_message(5) and "FAILED" in install.pytest_failure_message(5)
    assert "FAILED" in install.pytest_failure_message(1)


# ------------------------------------------------------------------------------------------- requirement files

def _requirement_names(path: Path) -> list:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_requirements_have_no_torch_and_pin_diffusers():
    text = (REPO / "requirements.txt").read_text(encoding="utf-8")
    names = _requirement_names(REPO / "requirements.txt")
    assert not [name for name in names if name.startswith("torch")], names
    assert re.search(r"^diffusers==0\.42\.1$", text, re.M)
    for name in ("transformers", "accelerate", "safetensors", "gradio", "huggingface-hub", "av", "psutil",
                 "nvidia-ml-py", "pillow", "numpy"):
        assert name in names


def test_requirements_dev_includes_runtime_and_test_tools():
    text = (REPO / "requirements-dev.txt").read_text(encoding="utf-8")
    assert re.search(r"^-r requirements\.txt$", text, re.M)
    assert {"pytest", "playwright"} <= set(_requirement_names(REPO / "requirements-dev.txt"))
    assert not [n for n in _requirement_names(REPO / "requirements-dev.txt") if n.startswith("torch")]


# ------------------------------------------------------------------------------------------- command line

def _install_py(*args: str, timeout: float = 60, env_index: str = "") -> subprocess.CompletedProcess:
    # -I -S: no PYTHON* variables, no user or venv site-packages: proves install.py needs only the stdlib.
    env = {k: v for k, v in os.environ.items() if k != install.TORCH_INDEX_ENV}
    if env_index:
        env[install.TORCH_INDEX_ENV] = env_index
    return subprocess.run([sys.executable, "-I", "-S", str(INSTALL_PY), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=env)


def test_install_py_parses_as_python_3_11():
    ast.parse(INSTALL_PY.read_text(encoding="utf-8"), feature_version=(3, 11))


def test_help_runs_with_the_stdlib_only():
    result = _install_py("--help")
    assert result.returncode == 0, result.stderr
    assert "--torch-index {auto,cpu,cu126,cu130,default}" in result.stdout
    for option in ("--venv", "--dev", "--test", "--run", "--install-only", "--no-requirements", "--dry-run"):
        assert option in result.stdout


def test_dry_run_fresh_dev_install_prints_the_pip_commands(tmp_path):
    venv = tmp_path / "venv"
    result = _install_py("--dry-run", "--install-only", "--dev", "--venv", str(venv), "--torch-index", "cu126")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "-m venv " + str(venv) in out
    bin_dir = "Scripts" if sys.platform == "win32" else "bin"
    assert re.search(r"would run: \S*%s\S*python\S* -m pip install --disable-pip-version-check "
                     r"torch==2\.13\.0\+cu126 --index-url https://download\.pytorch\.org/whl/cu126" % bin_dir, out)
    assert "--disable-pip-version-check -r %s" % (REPO / "requirements-dev.txt") in out
    assert "-m pytest" not in out
    assert not venv.exists()


def test_dry_run_test_mode_runs_pytest_on_tests_with_passthrough(tmp_path):
    result = _install_py("--dry-run", "--test", "--venv", str(tmp_path / "v"), "--torch-index", "default",
                         "--", "-k", "smoke")
    assert result.returncode == 0, result.stderr
    assert "torch==2.13.0\n" in result.stdout  # default: no --index-url, pip's own indexes choose
    assert re.search(r"would run: \S+ -m pytest -q tests -k smoke$", result.stdout, re.M)


def test_dry_run_test_mode_with_test_paths_runs_only_those(tmp_path):
    result = _install_py("--dry-run", "--test", "--venv", str(tmp_path / "v"), "--torch-index", "default",
                         "--", "tests/test_install.py::test_no_gpu_gets_cpu")
    assert result.returncode == 0, result.stderr
    assert re.search(r"would run: \S+ -m pytest -q tests/test_install\.py::test_no_gpu_gets_cpu$", result.stdout, re.M)


def test_dry_run_app_mode_passes_unknown_options_to_app(tmp_path):
    result = _install_py("--dry-run", "--venv", str(tmp_path / "v"), "--torch-index", "cpu", "--no-requirements",
                         "--inbrowser", "--port", "7861")
    assert result.returncode == 0, result.stderr
    assert "requirements" not in result.stdout
    assert re.search(r"would run: \S+ \S*app\.py --inbrowser --port 7861$", result.stdout, re.M)


def test_torch_index_from_environment_variable(tmp_path):
    result = _install_py("--dry-run", "--install-only", "--no-requirements", "--venv", str(tmp_path / "v"),
                         env_index="cu130")
    assert result.returncode == 0, result.stderr
    assert "torch==2.13.0+cu130 --index-url https://download.pytorch.org/whl/cu130" in result.stdout
    flag_wins = _install_py("--dry-run", "--install-only", "--no-requirements", "--venv", str(tmp_path / "v"),
                            "--torch-index", "cpu", env_index="cu130")
    assert "torch==2.13.0+cpu " in flag_wins.stdout
    bad = _install_py("--dry-run", "--install-only", "--venv", str(tmp_path / "v"), env_index="cu999")
    assert bad.returncode == 1 and "FRAMEPACK_TORCH_INDEX=cu999" in bad.stderr


def test_install_only_rejects_app_arguments(tmp_path):
    result = _install_py("--dry-run", "--install-only", "--venv", str(tmp_path / "v"), "--inbrowser")
    assert result.returncode == 1
    assert "unexpected arguments" in result.stderr


def _current_torch() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""


@pytest.mark.skipif(sys.prefix == sys.base_prefix or not _current_torch().startswith("2.13.0"),
                    reason="needs to run inside a venv holding torch 2.13.0")
def test_dry_run_on_this_venv_keeps_the_installed_torch():
    # Fast re-runs: run.sh/run.bat call install.py on every start. --dry-run only reads the venv.
    started = time.monotonic()
    result = _install_py("--dry-run", "--install-only", "--no-requirements", "--venv", sys.prefix,
                         "--torch-index", "default")
    assert result.returncode == 0, result.stderr
    assert "torch %s already installed" % _current_torch() in result.stdout
    assert "would run" not in result.stdout
    assert time.monotonic() - started < 10


def test_real_install_creates_a_venv_where_torch_imports(tmp_path):
    venv = tmp_path / "venv"
    result = _install_py("--install-only", "--no-requirements", "--venv", str(venv), "--torch-index", "default",
                         timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    python = install.venv_python(venv, sys.platform)
    check = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True, timeout=120)
    assert check.stdout.startswith("2.13.0"), check.stderr
    again = _install_py("--install-only", "--no-requirements", "--venv", str(venv), "--torch-index", "default")
    assert "already installed" in again.stdout
