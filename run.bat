@echo off
rem Start FramePack UI on Windows (double-click this file). The first run sets up .venv (PyTorch for this
rem machine's GPU, then the requirements: several GB); later runs check that quickly and open the app in the browser.
rem Extra arguments go to install.py, which passes those it does not know on to app.py: run.bat --port 7861
setlocal
cd /d "%~dp0"

set "PY="
py -3 -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" >nul 2>&1
if not errorlevel 1 set "PY=py -3"
if not defined PY (
  python -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" >nul 2>&1
  if not errorlevel 1 set "PY=python"
)
if not defined PY (
  echo FramePack UI needs Python 3.11 or newer. Install it from https://www.python.org/downloads/ and tick "Add python.exe to PATH", then run this file again.
  pause
  exit /b 1
)

%PY% install.py --inbrowser %*
set "RC=%ERRORLEVEL%"
if not "%RC%"=="0" (
  echo.
  echo FramePack UI stopped with exit code %RC%: the messages above say why.
  pause
)
exit /b %RC%
