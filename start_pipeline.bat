@echo off
rem Starts the live noise suppressor on Windows: microphone -> pipeline -> VB-Audio Virtual Cable.
rem
rem   start_pipeline.bat               the ML pipeline (ml_denoiser_pipeline.py); double-clicking does this
rem   start_pipeline.bat fast          the ML pipeline with the 32 ms low-latency model (--low-latency)
rem   start_pipeline.bat b             the lightweight DSP pipeline (dsp_filter_pipeline.py)
rem   start_pipeline.bat list          list the sound devices (list_devices.py)
rem   start_pipeline.bat b --mic USB   any other flag goes to the pipeline (see its --help)
rem   start_pipeline.bat install       start it at login (a launcher in the Startup folder), with any flags
rem   start_pipeline.bat uninstall     stop starting it at login; "status" says whether it does
rem
rem Install VB-Audio Virtual Cable first (https://vb-audio.com/Cable/, then reboot). The pipeline writes to
rem "CABLE Input"; in Zoom/Teams pick "CABLE Output" as the microphone. Ctrl+C stops.
rem First run: creates the virtual environment .venv and installs requirements.txt (needs internet once; no
rem torch). Starting again stops the instance already running, through the PID file this launcher wrote
rem (never by killing every python.exe). Edit the settings below, or the constants at the top of the pipelines.
rem Set DENOISER_PYTHON=C:\path\to\python.exe to use that interpreter instead of .venv (no set-up).
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0"

rem ---- settings ------------------------------------------------------------------------------------------------
rem virtual environment, relative to this folder
set "VENV_DIR=.venv"
rem holds the PID of the running pipeline
set "PID_FILE=.cache\pipeline.pid"
rem once this exists, the "pick CABLE Output in your call app" advice is not repeated
set "FIRST_RUN_FILE=.cache\first_run_shown"

rem A double-clicked window closes when the script ends: keep it open on errors and after "list".
set "DOUBLE_CLICKED="
echo %cmdcmdline% | findstr /i /c:"%~nx0" >nul && set "DOUBLE_CLICKED=1"

rem ---- which script --------------------------------------------------------------------------------------------
set "SCRIPT=ml_denoiser_pipeline.py"
set "FIRST=%~1"
set "VERB="
if /i "%FIRST%"=="b" goto verb_b
if /i "%FIRST%"=="list" goto verb_list
if /i "%FIRST%"=="fast" goto verb_fast
if /i "%FIRST%"=="install" set "VERB=install"
if /i "%FIRST%"=="uninstall" set "VERB=uninstall"
if /i "%FIRST%"=="status" set "VERB=status"
if defined VERB (
    shift
    goto verb_done
)
if "%FIRST%"=="" goto verb_done
if "%FIRST:~0,1%"=="-" goto verb_done
set "MSG=unknown verb '%FIRST%': use nothing (ML pipeline), 'fast' (low latency), 'b' (DSP pipeline), 'list', 'install', 'uninstall' or 'status'"
goto fail
:verb_b
set "SCRIPT=dsp_filter_pipeline.py"
shift
goto verb_done
:verb_list
set "SCRIPT=list_devices.py"
shift
:verb_done
set "ARGS="
goto collect
:verb_fast
shift
set "ARGS= --low-latency"
:collect
if "%~1"=="" goto collected
set ARGS=%ARGS% %1
shift
goto collect
:collected

rem ---- Python and first-run set-up -----------------------------------------------------------------------------
if defined DENOISER_PYTHON (
    set "PY=%DENOISER_PYTHON%"
    goto have_python
)
set "PY=%VENV_DIR%\Scripts\python.exe"
if not exist "%PY%" goto create_venv
fc /b requirements.txt "%VENV_DIR%\requirements.installed" >nul 2>&1 && goto have_python
goto install
:create_venv
echo first run: creating %VENV_DIR% and installing requirements.txt (once; needs internet)
set "BASE="
where py >nul 2>&1 && set "BASE=py -3"
if not defined BASE where python >nul 2>&1 && set "BASE=python"
set "MSG=Python 3 not found: install it from https://www.python.org and tick 'Add python.exe to PATH'"
if not defined BASE goto fail
%BASE% -m venv "%VENV_DIR%"
if not errorlevel 1 goto install
rmdir /s /q "%VENV_DIR%" 2>nul
set "MSG=could not create %VENV_DIR% with '%BASE% -m venv'"
goto fail
:install
"%PY%" -m pip install -r requirements.txt
set "MSG=installing requirements.txt failed, see above; fix it and run this again"
if errorlevel 1 goto fail
copy /y requirements.txt "%VENV_DIR%\requirements.installed" >nul
:have_python

if not defined VERB goto no_verb
if "%VERB%"=="install" ("%PY%" autostart.py install "%~f0" %ARGS%) else ("%PY%" autostart.py %VERB%)
set "RC=%errorlevel%"
if defined DOUBLE_CLICKED pause
exit /b %RC%
:no_verb
if not "%SCRIPT%"=="list_devices.py" goto run_pipeline
"%PY%" %SCRIPT% %ARGS%
set "RC=%errorlevel%"
if defined DOUBLE_CLICKED pause
exit /b %RC%

rem ---- one instance at a time, then run ------------------------------------------------------------------------
:run_pipeline
if not exist ".cache" mkdir ".cache"
if exist "%FIRST_RUN_FILE%" goto first_run_done
echo first run: in Zoom, Teams, Meet or Discord pick "CABLE Output" as the microphone and turn the app's own
echo noise suppression off (two suppressors fight and speech comes out choppy).
type nul > "%FIRST_RUN_FILE%"
:first_run_done
set "DENOISER_PY=%PY%"
set "DENOISER_ARGS=%SCRIPT%%ARGS%"
set "DENOISER_PID_FILE=%PID_FILE%"
rem Stop the previous instance only if the PID in the file is really one of the pipelines (a PID reused by
rem another program is left alone); /T also ends the interpreter the venv's python.exe started.
if exist "%PID_FILE%" powershell -NoProfile -ExecutionPolicy Bypass -Command ^
  "try { $id = [int]((Get-Content -LiteralPath $env:DENOISER_PID_FILE -TotalCount 1).Trim());" ^
  "$p = Get-CimInstance Win32_Process -Filter ('ProcessId=' + $id) -ErrorAction SilentlyContinue;" ^
  "if ($p -and $p.CommandLine -match '_pipeline\.py') { Write-Host ('stopping the previous instance (PID ' + $id + ')');" ^
  "taskkill /PID $id /T /F | Out-Null; Wait-Process -Id $id -Timeout 10 -ErrorAction SilentlyContinue } } catch { }"
if exist "%PID_FILE%" del "%PID_FILE%"
rem Start the pipeline in this console (Ctrl+C reaches it), note its PID, wait, and remove the PID file if it
rem is still ours.
powershell -NoProfile -ExecutionPolicy Bypass -Command ^
  "$p = Start-Process -FilePath $env:DENOISER_PY -ArgumentList $env:DENOISER_ARGS -NoNewWindow -PassThru;" ^
  "$null = $p.Handle; Set-Content -LiteralPath $env:DENOISER_PID_FILE -Value $p.Id; $p.WaitForExit();" ^
  "if ((Test-Path -LiteralPath $env:DENOISER_PID_FILE) -and ((Get-Content -LiteralPath $env:DENOISER_PID_FILE -TotalCount 1).Trim() -eq [string]$p.Id)) { Remove-Item -LiteralPath $env:DENOISER_PID_FILE };" ^
  "exit $p.ExitCode"
set "RC=%errorlevel%"
if not "%RC%"=="0" if defined DOUBLE_CLICKED pause
exit /b %RC%

:fail
echo error: %MSG% 1>&2
if defined DOUBLE_CLICKED pause
exit /b 1
